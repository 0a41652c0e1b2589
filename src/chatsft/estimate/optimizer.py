"""Optimizer state: its bytes in memory and the size of the optimizer.pt a checkpoint holds."""

from __future__ import annotations

import math
import re
import warnings

import torch

from .files import torch_save_size
from .meta_model import MetaModel

# Default AdamW in transformers 5 is the fused torch kernel; these are the optimizers we model.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
OPTIMIZERS = TORCH_OPTIMIZERS + EIGHT_BIT_OPTIMIZERS
# bitsandbytes 8-bit optimizers: block-wise quantisation with one fp32 absmax per 256 values, and
# tensors under 4096 elements stay in fp32 (bnb's min_8bit_size).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


def torch_optimizer_state(
    model: MetaModel, optimizer: str, learning_rate: float, weight_decay: float
) -> tuple[int, int | None]:
    """(bytes of optimizer state, bytes of optimizer.pt): one real step of the Trainer's optimizer
    class on fake tensors on the run's device (state tensors and their pickled locations follow
    it), then the exact size of torch.save for that state."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Trainer, TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(
            output_dir="unused", optim=optimizer, learning_rate=learning_rate, report_to="none"
        )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    decay = _decay_names(model)
    device = model.device  # fake CUDA tensors need no GPU
    with FakeTensorMode():
        params = {}
        for name, shape, dtype in model.trainable:
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            p.grad = torch.empty_like(p)
            params[name] = p
        groups = [
            {"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
        ]
        opt = cls(groups, **kwargs)
        opt.step()
        state = opt.state_dict()
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in state["state"].values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
    for group in state["param_groups"]:
        group["initial_lr"] = kwargs.get("lr", learning_rate)  # added by the LR scheduler
    try:
        file_bytes: int | None = torch_save_size(state, "optimizer.pt")
    except Exception:  # skip_data and fake tensors are young torch APIs: fall back to arithmetic
        file_bytes = None
    return state_bytes, file_bytes


def _decay_names(model: MetaModel) -> set[str]:
    # Same rule as Trainer.get_decay_parameter_names: only the param_groups layout depends on it.
    pattern = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    return {n for n, _, _ in model.trainable if not pattern.search(n)}


def eight_bit_state(model: MetaModel) -> int:
    """Bytes of a bitsandbytes 8-bit AdamW's state, from its block layout."""
    total = 0
    for _, shape, _ in model.trainable:
        n = math.prod(shape)
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:  # two uint8 moments, an fp32 absmax per block for each, two 256-entry fp32 maps
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * 4 * 256
    return total
