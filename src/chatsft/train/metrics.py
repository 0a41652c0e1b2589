"""The numbers logged next to the loss: trained-token counts and accuracy, the MoE router loss,
and the loss itself corrected for skipped steps.

Each micro-batch adds its counts as device tensors (no host sync per step); they are read, summed
over ranks, once per log line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Reduce = Callable[[torch.Tensor, str], torch.Tensor]  # (tensor, "sum" | "mean") over ranks


class RunMetrics:
    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self.aux: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self.aux_logged: list[float] = []
        self.num_trained_tokens = 0

    def add(self, mode: str, num_tokens: torch.Tensor, num_correct: torch.Tensor) -> None:
        self.sums[mode].append(torch.stack([num_tokens, num_correct]).detach())

    def add_aux(self, mode: str, aux: torch.Tensor) -> None:
        self.aux[mode].append(aux.detach().float())

    def fill(self, logs: dict[str, float], reduce: Reduce, history: list[dict[str, Any]]) -> None:
        """Add this log line's metrics to `logs` (train or eval, told apart by its keys)."""
        is_eval = any(k.startswith("eval_") for k in logs)
        mode = "eval" if is_eval else "train"
        if self.aux[mode]:
            mean = reduce(torch.stack(self.aux[mode]).mean(), "mean").item()
            logs["eval_aux_loss" if is_eval else "aux_loss"] = mean
            if not is_eval:
                self.aux_logged.append(mean)
            self.aux[mode].clear()
        if "train_loss" in logs and self.aux_logged:  # the run's summary, as TRL logs it
            logs["aux_loss"] = sum(self.aux_logged) / len(self.aux_logged)
        if not self.sums[mode]:
            return
        tokens, correct = (int(x) for x in reduce(torch.stack(self.sums[mode]).sum(0), "sum"))
        self.sums[mode].clear()
        accuracy = correct / max(tokens, 1)
        if is_eval:
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss")), "eval_")
            logs[f"{prefix}mean_token_accuracy"] = accuracy
            return
        if not self.num_trained_tokens:  # after --resume: continue the logged count
            self.num_trained_tokens = next(
                (e["num_trained_tokens"] for e in reversed(history) if "num_trained_tokens" in e),
                0,
            )
        self.num_trained_tokens += tokens
        logs["num_trained_tokens"] = self.num_trained_tokens
        logs["mean_token_accuracy"] = accuracy


def reduce_over_ranks(accelerator: Any) -> Reduce:
    """`Reduce` over the ranks of `accelerator` (no collective call for a single process)."""

    def reduce(tensor: torch.Tensor, how: str) -> torch.Tensor:
        if accelerator.num_processes > 1:
            return accelerator.reduce(tensor, reduction=how)
        return tensor

    return reduce


def loss_of_applied_steps(loss: float, steps: int, skipped: int) -> float:
    """The Trainer averages a log's loss over every step of its window, and a skipped step added 0
    (`nonfinite.zero_if_nonfinite`): the mean over the applied steps instead (NaN if none was)."""
    if not skipped:
        return loss
    applied = steps - skipped
    return loss * steps / applied if applied else math.nan
