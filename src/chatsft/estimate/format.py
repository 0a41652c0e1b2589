"""How a prediction reads: human sizes, the table `chatsft estimate` prints, the note on what
fills a checkpoint, and JSON."""

from __future__ import annotations

import json
import re
import textwrap
from typing import TYPE_CHECKING, Any

from .optimizer import EIGHT_BIT_OPTIMIZERS, eight_bit_state

if TYPE_CHECKING:
    from .predict import Static
    from .results import Estimate, FitResult

GiB = 2**30
WIDTH = 100  # the table's line width (the note is wrapped to it)


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def wrap(text: str, width: int = WIDTH, indent: str = "        ") -> str:
    # Keep "1.84 GiB" on one line: a no-break space between number and unit while wrapping.
    text = re.sub(r"(\d) (GiB|MiB|KiB|B)\b", "\\1\u00a0\\2", text)
    return textwrap.fill(text, width=width, subsequent_indent=indent).replace("\u00a0", " ")


def to_json(result: Estimate | FitResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str)


def _checkpointing_words(settings: dict[str, Any]) -> str:
    every = settings.get("every_n_layers") or 1
    if not settings["gradient_checkpointing"]:
        return "off"
    return "on" if every == 1 else f"on for 1 decoder layer in {every}"


def format_estimate(est: Estimate) -> str:
    s = est.settings
    lines = [
        f"chatsft estimate: {est.model}",
        f"  parameters      {est.total_params:,} total, {est.trainable_params:,} trainable"
        f" ({100 * est.trainable_params / max(est.total_params, 1):.2f}%),"
        f" weights {est.weight_dtype}",
        f"  run             micro-batch {s['batch_size']} x {s['max_length']} tokens,"
        f" accumulation {s['gradient_accumulation_steps']}, {s['world_size']} device(s),"
        f" optimizer {s['optimizer']}, mixed precision {s['mixed_precision'] or 'off'},"
        f" gradient checkpointing {_checkpointing_words(s)}"
        + (f", LoRA r={s['lora_r']}" if s["lora_r"] else ""),
        "",
        "  memory per device",
    ]
    labels = {
        "weights": "weights",
        "gradients": "gradients",
        "optimizer_state": "optimizer state",
        "optimizer_step_temporaries": "optimizer step temporaries",
        "autocast_weight_copies": "autocast half weight copies",
        "ddp_gradient_buckets": "DDP gradient buckets",
        "activations": "activations (saved for backward)",
        "backward_working_set": "backward working set",
        "loss_buffers": "chunked loss buffers",
    }
    for key, label in labels.items():
        value = est.memory[key]
        if value or key in ("weights", "optimizer_state", "activations"):
            lines.append(f"    {label:<36}{human(value):>12}")
    other = "with" if not s["gradient_checkpointing"] else "without"
    other_bytes = (
        est.activations_with_checkpointing
        if other == "with"
        else est.activations_without_checkpointing
    )
    lines.append(f"    {'(activations ' + other + ' checkpointing)':<36}{human(other_bytes):>12}")
    lines.append(f"    {'estimated peak (' + est.peak_phase + ')':<36}{human(est.peak_bytes):>12}")
    lines += ["", "  checkpoint-N/ folder"]
    for f in est.checkpoint_files:
        size = human(f.bytes) if f.exact else "~" + human(f.bytes)
        lines.append(f"    {f.name:<36}{size:>12}")
    lines.append(f"    {'total per checkpoint':<36}{human(est.checkpoint_bytes):>12}")
    if est.total_disk_bytes is not None:
        lines.append(
            f"    {f'disk: {est.checkpoints_kept} kept + final model':<36}"
            f"{human(est.total_disk_bytes):>12}"
        )
    else:
        lines.append(
            f"    {'disk: no save_total_limit':<36}"
            f"{'+' + human(est.checkpoint_bytes) + ' per save':>12}"
        )
    lines += ["", wrap("  note: " + est.note)]
    for w in est.warnings:
        lines.append(f"  ! {w}")
    return "\n".join(lines)


def explain_checkpoint(st: Static, checkpoint_bytes: int) -> str:
    """Why optimizer.pt is as large as it is, and what would shrink the checkpoints."""
    m = st.model
    weights = next((f.bytes for f in st.files if "safetensors" in f.name), 0)
    n = m.trainable_params
    if st.optimizer_file is None:
        opt_line = (
            "save_only_model is on, so checkpoints hold no optimizer.pt (and cannot resume the "
            "optimizer exactly)."
        )
    elif st.optimizer in ("adamw_torch", "adamw_torch_fused"):
        per = st.optimizer_bytes / max(n, 1)
        # The moments take the parameters' dtype: fp32 master weights give 8 B per parameter.
        dtypes = {d for _, _, d in m.trainable}
        dtype = "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        size = st.optimizer_file.bytes
        opt_line = (
            f"optimizer.pt is {human(size)} ({size / max(weights, 1):.1f}x the "
            f"{'adapter' if m.is_peft else 'model'} file) because AdamW keeps two {dtype} moment "
            f"tensors, exp_avg and exp_avg_sq, for every trainable parameter: {n:,} x "
            f"{per:.0f} B = {human(st.optimizer_bytes)}."
        )
    else:
        opt_line = (
            f"optimizer.pt holds {st.optimizer}'s state for {n:,} trainable parameters: "
            f"{human(st.optimizer_file.bytes)}."
        )
    s = m.shape
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    lora16 = (
        s.layers * 16 * ((s.hidden + q) * 2 + (s.hidden + kv) * 2 + (s.hidden + s.intermediate) * 3)
    )
    shrink = []
    if not m.is_peft:
        shrink.append(
            "LoRA trains adapters only (r=16 on all linear layers: "
            f"~{lora16 / 1e6:.1f}M parameters, "
            f"optimizer.pt ~{human(lora16 * 8)})"
        )
    if st.optimizer not in EIGHT_BIT_OPTIMIZERS:
        shrink.append(
            "an 8-bit AdamW (optim: adamw_bnb_8bit) stores ~2 B per parameter "
            f"(~{human(eight_bit_state(m))})"
        )
    if st.optimizer_file is not None:
        shrink.append("save_only_model: true drops optimizer.pt from checkpoints (no exact resume)")
    shrink.append(
        f"save_total_limit: k keeps only the last k checkpoints ({human(checkpoint_bytes)} each)"
    )
    return opt_line + " What shrinks it: " + "; ".join(shrink) + "."
