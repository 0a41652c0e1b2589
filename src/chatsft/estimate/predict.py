"""estimate(): the model, optimizer and files (once per model), then memory by component and the
peak for one batch shape (again for every batch fit_batch tries)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ChatSFTError
from .activations import activation_parts, loss_buffers, precision_mode
from .files import SMALL_FILES, model_files
from .format import explain_checkpoint
from .meta_model import MetaModel, build_model, load_model_config, lora_config, resolve_dtype
from .meta_model import target_names as lora_target_names
from .optimizer import EIGHT_BIT_OPTIMIZERS, OPTIMIZERS, eight_bit_state, torch_optimizer_state
from .results import CheckpointFile, Estimate


@dataclass
class Static:
    """Batch-independent parts: computed once per model/optimizer, reused by fit_batch."""

    model: MetaModel
    optimizer: str
    optimizer_bytes: int
    optimizer_file: CheckpointFile | None
    step_temporaries: int
    files: list[CheckpointFile]
    final_files: list[CheckpointFile]


def _static(
    model: MetaModel,
    optimizer: str,
    mixed: str | None,
    save_only_model: bool,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
) -> Static:
    if optimizer not in OPTIMIZERS:
        close = difflib.get_close_matches(optimizer, OPTIMIZERS, n=1)
        raise ChatSFTError(
            f"unsupported optimizer {optimizer!r}",
            field="optim",
            hint=f"did you mean '{close[0]}'?" if close else f"one of {', '.join(OPTIMIZERS)}",
        )
    if optimizer in EIGHT_BIT_OPTIMIZERS:
        opt_bytes = eight_bit_state(model)
        # torch.save overhead: a zip record and pickle entry per state tensor (~6 per parameter).
        opt_file = CheckpointFile("optimizer.pt", opt_bytes + 600 * len(model.trainable), False)
    else:
        opt_bytes, file_bytes = torch_optimizer_state(model, optimizer, learning_rate, weight_decay)
        exact = file_bytes is not None
        opt_file = CheckpointFile(
            "optimizer.pt", file_bytes if exact else opt_bytes + 250 * len(model.trainable), exact
        )
    # Non-fused torch AdamW (foreach) builds sqrt(exp_avg_sq) for all parameters at once.
    step_tmp = opt_bytes // 2 if optimizer == "adamw_torch" else 0
    files = list(model_files(model))
    files.append(CheckpointFile("training_args.bin", SMALL_FILES["training_args.bin"], False))
    files.append(CheckpointFile("training_config.yaml", SMALL_FILES["training_config.yaml"], False))
    final_files = list(files)
    if not save_only_model:
        files.append(opt_file)
        files.append(CheckpointFile("scheduler.pt", SMALL_FILES["scheduler.pt"], False))
        if mixed == "fp16":
            files.append(CheckpointFile("scaler.pt", SMALL_FILES["scaler.pt"], False))
        if world_size == 1:
            files.append(CheckpointFile("rng_state.pth", SMALL_FILES["rng_state.pth"], False))
        else:  # one per rank
            files.append(
                CheckpointFile(
                    f"rng_state_0..{world_size - 1}.pth ({world_size} files)",
                    world_size * SMALL_FILES["rng_state.pth"],
                    False,
                )
            )
    files.append(CheckpointFile("trainer_state.json", SMALL_FILES["trainer_state.json"], False))
    return Static(
        model,
        optimizer,
        opt_bytes,
        opt_file if not save_only_model else None,
        step_tmp,
        files,
        final_files,
    )


def _memory(
    st: Static,
    *,
    batch_size: int,
    max_length: int,
    gradient_accumulation_steps: int,
    gradient_checkpointing: bool,
    mixed: str | None,
    packing: bool,
    world_size: int,
    every_n_layers: int = 1,
) -> tuple[dict[str, int], int, int, int, str]:
    """Memory components and the peak for one micro-batch size."""
    m = st.model
    mode = precision_mode(m.weight_dtype, mixed is not None)
    tokens = batch_size * max_length
    # Padded batches reach transformers' SDPA with a mask, which repeats the KV heads; packed rows
    # go to chatsft's document attention, which uses SDPA's native GQA.
    repeat_kv = not packing and m.shape.kv_heads < m.shape.heads
    every_n = every_n_layers if gradient_checkpointing else 1
    acts = activation_parts(m, mode, tokens, max_length, repeat_kv, every_n)
    loss_fwd, loss_bwd = loss_buffers(m, tokens, mode)
    # Under autocast every Linear weight gets a half copy, cached until the forward ends; without
    # checkpointing each copy is also saved for backward, with it only the recomputed layer's.
    autocast = 2 * m.linear_weight_params if mode == "autocast" else 0
    kept_copies = m.shape.layers - -(-m.shape.layers // every_n) + 1  # layers 0, n, 2n, ...
    autocast_saved = (
        autocast * kept_copies // m.shape.layers if gradient_checkpointing else autocast
    )
    head_grad = m.lm_head_params * 4 if m.lm_head_trainable else 0
    held_grads = m.grad_bytes if gradient_accumulation_steps > 1 else 0
    # DDP allocates its own gradient buckets (gradient_as_bucket_view is off by default in
    # accelerate): a second copy of the gradients for the whole run.
    buckets = m.grad_bytes if world_size > 1 else 0
    if gradient_checkpointing:
        at_loss_saved, in_backward = acts["checkpoint_inputs"], acts["checkpointed"]
    else:
        at_loss_saved = in_backward = acts["all_layers"]
    base = m.weight_bytes + st.optimizer_bytes + held_grads + buckets
    # Four moments compete for the peak: the loss forward (chatsft computes it inside the LM
    # head's forward, so the autocast cache is still alive), the loss backward, the first layer
    # backward (activations plus the gradients flowing through it) and the optimizer step.
    at_loss = base + at_loss_saved + max(autocast + loss_fwd, autocast_saved + loss_bwd)
    at_layer = base + in_backward + autocast_saved + acts["backward"] + head_grad
    at_step = m.weight_bytes + m.grad_bytes + st.optimizer_bytes + st.step_temporaries + buckets
    peak = max(at_loss, at_layer, at_step)
    phase = "optimizer step" if peak == at_step else "forward/backward"
    memory = {
        "weights": m.weight_bytes,
        "gradients": m.grad_bytes,
        "optimizer_state": st.optimizer_bytes,
        "optimizer_step_temporaries": st.step_temporaries,
        "autocast_weight_copies": autocast,
        "ddp_gradient_buckets": buckets,
        "activations": in_backward,
        "backward_working_set": acts["backward"],
        "loss_buffers": max(loss_fwd, loss_bwd),
    }
    return memory, acts["all_layers"], acts["checkpointed"], peak, phase


def estimate(
    model: Any,
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    packing: bool = False,
    dtype: str | torch.dtype | None = None,
    bf16: bool = False,
    fp16: bool = False,
    optimizer: str = "adamw_torch_fused",
    gradient_checkpointing: bool = False,
    every_n_layers: int = 1,
    lora: int | dict[str, Any] | Any | None = None,
    lora_target_modules: str | list[str] | None = None,
    peft_config: Any | None = None,
    save_total_limit: int | None = None,
    save_only_model: bool = False,
    world_size: int = 1,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    device: str | None = None,
) -> Estimate:
    """Predict per-device peak memory and checkpoint sizes for a chatsft training run.

    `model`: a folder with config.json, a hub id (needs the network or the hub cache) or a
    transformers config. `dtype`: the weights' dtype as loaded (None: float32, as the trainer
    loads them; "auto": the config's, like from_pretrained); `bf16`/`fp16`: mixed precision
    (autocast) as in SFTConfig. `lora`: a rank, a dict of LoraConfig fields or a peft config
    (`peft_config` is the same, by TRL's name); a rank takes chatsft's YAML defaults (alpha 2r,
    dropout 0.05, all linear layers). `device`: "cuda" or "cpu", where the run trains (default:
    CUDA if this machine has it). `every_n_layers`: with gradient checkpointing, only every n-th
    decoder layer is checkpointed (transformers' `activation_checkpointing_kwargs:
    {every_n_layers: n}`). Every position is assumed trained and every row full (max_length
    tokens): an upper bound."""
    static, settings = prepare(
        model,
        dtype=dtype,
        bf16=bf16,
        fp16=fp16,
        optimizer=optimizer,
        lora=peft_config if peft_config is not None else lora,
        lora_target_modules=lora_target_modules,
        save_only_model=save_only_model,
        world_size=world_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        device=device,
    )
    return finish(
        static,
        settings,
        batch_size=batch_size,
        max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        every_n_layers=every_n_layers,
        packing=packing,
        save_total_limit=save_total_limit,
    )


def prepare(
    model: Any,
    *,
    dtype: Any,
    bf16: bool,
    fp16: bool,
    optimizer: str,
    lora: Any,
    lora_target_modules: Any,
    save_only_model: bool,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
    device: str | None,
) -> tuple[Static, dict[str, Any]]:
    """The batch-independent parts of a prediction and the settings that describe them."""
    if bf16 and fp16:
        raise ChatSFTError("bf16 and fp16 are exclusive", field="bf16", hint="set only one")
    if world_size < 1:
        raise ChatSFTError(f"world_size must be >= 1, got {world_size}", field="world_size")
    config, name, folder = load_model_config(model)
    weight_dtype = resolve_dtype(dtype, config, folder)
    peft = lora_config(lora, lora_target_modules)
    targets = lora_target_names(peft)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ChatSFTError(f"device must be cuda or cpu, got {device!r}", field="device")
    built = build_model(config, name, folder, weight_dtype, peft, device)
    mixed = "bf16" if bf16 else "fp16" if fp16 else None
    static = _static(
        built, optimizer, mixed, save_only_model, world_size, learning_rate, weight_decay
    )
    settings = {
        "dtype": str(weight_dtype).replace("torch.", ""),
        "mixed_precision": mixed,
        "optimizer": optimizer,
        "lora_r": built.lora_r or None,
        "lora_target_modules": targets,
        "save_only_model": save_only_model,
        "world_size": world_size,
        "device": device,
    }
    return static, settings


def finish(
    st: Static,
    settings: dict[str, Any],
    *,
    batch_size: int,
    max_length: int,
    gradient_accumulation_steps: int,
    gradient_checkpointing: bool,
    packing: bool,
    save_total_limit: int | None,
    every_n_layers: int = 1,
) -> Estimate:
    """The Estimate for one batch shape on top of the batch-independent parts."""
    for key, value in (
        ("max_length", max_length),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("every_n_layers", every_n_layers),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ChatSFTError(f"{key} must be a positive integer, got {value!r}", field=key)
    mixed = settings["mixed_precision"]
    memory, act_full, act_gc, peak, phase = _memory(
        st,
        batch_size=batch_size,
        max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        mixed=mixed,
        packing=packing,
        world_size=settings["world_size"],
        every_n_layers=every_n_layers,
    )
    m = st.model
    ckpt = sum(f.bytes for f in st.files)
    final = sum(f.bytes for f in st.final_files)
    kept = save_total_limit if save_total_limit and save_total_limit > 0 else None
    out_settings = {
        "max_length": max_length,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "effective_batch_size": batch_size * gradient_accumulation_steps * settings["world_size"],
        "packing": packing,
        "gradient_checkpointing": gradient_checkpointing,
        "every_n_layers": every_n_layers if gradient_checkpointing else None,
        "save_total_limit": kept,
        **settings,
    }
    notes = []
    s = m.shape
    if s.eager_attention:
        notes.append("eager attention keeps [heads, T, T] probabilities per layer")
    if not m.llama_like:
        notes.append(
            "the decoder layers are not Llama/Qwen-shaped (q/k/v/o, gate/up/down projections): "
            "activations are approximate"
        )
    text = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        notes.append("mixture-of-experts: activations count one dense MLP per token (approximate)")
    if settings["world_size"] > 1:
        notes.append(
            "DDP assumed (replicated weights and optimizer, plus gradient buckets); FSDP and "
            "DeepSpeed ZeRO shard them and are not modelled"
        )
    if st.optimizer in EIGHT_BIT_OPTIMIZERS:
        notes.append("8-bit optimizer state is computed from bitsandbytes' block layout (approx.)")
    return Estimate(
        model=m.name,
        settings=out_settings,
        total_params=m.total_params,
        trainable_params=m.trainable_params,
        weight_dtype=settings["dtype"],
        memory=memory,
        activations_without_checkpointing=act_full,
        activations_with_checkpointing=act_gc,
        peak_bytes=peak,
        peak_phase=phase,
        checkpoint_files=list(st.files),
        checkpoint_bytes=ckpt,
        checkpoints_kept=kept,
        final_model_bytes=final,
        total_disk_bytes=kept * ckpt + final if kept else None,
        note=explain_checkpoint(st, ckpt),
        warnings=notes,
    )
