"""Fit the batch to the memory: the largest micro-batch whose predicted peak fits a budget, with
the effective batch kept through gradient accumulation."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ChatSFTError
from .format import human
from .predict import finish, prepare
from .results import FitResult


def parse_memory(text: str | int | float) -> int:
    """'24GiB', '24G' (GiB), '80GB' (10^9), '512MiB', or a number of bytes → bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ChatSFTError(
            f"cannot read memory size {text!r}", field="memory", hint="e.g. 24GiB, 80GB, 16000MiB"
        )
    number, unit, binary = match.groups()
    power = "BKMGT".index(unit.upper() or "B")
    # 'G' alone means GiB, as nvidia-smi and torch report; 'GB' is decimal.
    decimal = unit and not binary and str(text).strip().upper().endswith("B")
    return int(float(number) * ((1000 if decimal else 1024) ** power))


def free_device_memory() -> int | None:
    """Free memory on the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def fit_batch(
    model: Any,
    *,
    memory: int | str | None = None,
    max_length: int = 1024,
    effective_batch_size: int = 8,
    gradient_checkpointing: bool | None = None,
    every_n_layers: int = 1,
    headroom: float = 0.10,
    world_size: int = 1,
    save_total_limit: int | None = None,
    packing: bool = False,
    **kwargs: Any,
) -> FitResult:
    """The largest micro-batch that fits `memory` (bytes or '24GiB'; default: free CUDA memory),
    keeping `effective_batch_size` (over all devices) through gradient accumulation. Gradient
    checkpointing is turned on only when no micro-batch fits without it (None: the choice is
    ours; True/False: fixed). `headroom` of the budget stays free for allocator fragmentation and
    the CUDA context. Other keyword arguments go to `estimate`."""
    if memory is None:
        memory = free_device_memory()
        if memory is None:
            raise ChatSFTError(
                "no CUDA device to measure free memory on",
                field="memory",
                hint="pass --memory 24GiB",
            )
        source = "free CUDA memory"
    else:
        source = "the given budget"
    budget = parse_memory(memory)
    if effective_batch_size < 1 or effective_batch_size % world_size:
        raise ChatSFTError(
            f"effective batch size {effective_batch_size} must be a positive multiple of the "
            f"world size {world_size}",
            field="effective_batch_size",
        )
    per_rank = effective_batch_size // world_size
    usable = int(budget * (1 - headroom))
    static, settings = prepare(
        model,
        dtype=kwargs.pop("dtype", None),  # None: float32, as training loads weights
        bf16=kwargs.pop("bf16", False),
        fp16=kwargs.pop("fp16", False),
        optimizer=kwargs.pop("optimizer", "adamw_torch_fused"),
        lora=kwargs.pop("peft_config", None) or kwargs.pop("lora", None),
        lora_target_modules=kwargs.pop("lora_target_modules", None),
        save_only_model=kwargs.pop("save_only_model", False),
        world_size=world_size,
        learning_rate=kwargs.pop("learning_rate", 2e-5),
        weight_decay=kwargs.pop("weight_decay", 0.0),
        device=kwargs.pop("device", None),
    )
    if kwargs:
        raise TypeError(f"fit_batch got unexpected arguments {sorted(kwargs)}")
    divisors = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    options = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    tried: list[dict[str, Any]] = []
    for gc in options:
        for micro in divisors:
            est = finish(
                static,
                settings,
                batch_size=micro,
                every_n_layers=every_n_layers,
                max_length=max_length,
                gradient_accumulation_steps=per_rank // micro,
                gradient_checkpointing=gc,
                packing=packing,
                save_total_limit=save_total_limit,
            )
            tried.append(
                {"batch_size": micro, "gradient_checkpointing": gc, "peak_bytes": est.peak_bytes}
            )
            if est.peak_bytes <= usable:
                reason = (
                    f"micro-batch {micro} x {per_rank // micro} accumulation steps"
                    + (f" x {world_size} devices" if world_size > 1 else "")
                    + f" = effective batch {effective_batch_size}; predicted peak "
                    f"{human(est.peak_bytes)} fits {human(usable)} "
                    f"({100 - round(headroom * 100)}% of {human(budget)}, {source})"
                )
                if micro < per_rank:  # the next larger micro-batch, which did not fit
                    bigger = [t for t in tried if t["gradient_checkpointing"] == gc][-2]
                    reason += (
                        f"; micro-batch {bigger['batch_size']} would need "
                        f"{human(bigger['peak_bytes'])}"
                    )
                if gc and gradient_checkpointing is None:
                    reason += (
                        f"; gradient checkpointing on because even micro-batch 1 needs "
                        f"{human(tried[len(divisors) - 1]['peak_bytes'])} without it"
                    )
                elif gc:
                    reason += "; gradient checkpointing on as configured"
                return FitResult(micro, per_rank // micro, gc, budget, usable, est, reason, tried)
    smallest = min(t["peak_bytes"] for t in tried)
    raise ChatSFTError(
        f"even micro-batch 1{' with gradient checkpointing' if True in options else ''} needs "
        f"{human(smallest)}, more than {human(usable)} usable of {human(budget)}",
        field="memory",
        hint="use LoRA (use_peft with lora_r 16), an 8-bit optimizer, bf16 weights or a shorter "
        "max_length",
    )
