"""Supervised-only cross-entropy.

The objective is ordinary teacher-forced next-token cross-entropy over the trained tokens. Only the
positions whose next token is trained are projected through the LM head (`logits_to_keep` with a
boolean mask), so logits for prompts, padding and system text are never materialised.
The *sum* is returned; dividing by the step's global trained-token count happens in the trainer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # scalar, differentiable
    num_tokens: torch.Tensor  # scalar int, trained tokens in this micro-batch
    num_correct: torch.Tensor  # scalar int, greedy predictions equal to the target


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "module", None)  # DDP / accelerate wrappers
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if hasattr(model, "get_base_model"):  # peft
            return model.get_base_model()
        return model


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] → [batch, seq]: target of position t is labels[t + 1]; the last has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits


def supervised_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[LossParts, Any]:
    """Forward the model and return the summed loss over trained tokens, plus the raw outputs."""
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    if accepts_logits_to_keep(model):
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = _logits(outputs).reshape(-1, _logits(outputs).shape[-1])
    else:
        outputs = model(**inputs)
        logits = _logits(outputs)[keep]
    target = targets[keep]
    loss_sum = F.cross_entropy(logits.float(), target, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == target).sum()
    return LossParts(loss_sum, keep.sum(), correct), outputs
