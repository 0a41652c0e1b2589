"""Non-finite training steps: found on the device, skipped exactly, reported when the host reads.

A NaN or inf loss or gradient must never reach the weights, and looking for one must not cost a
host sync per step: each sync makes the GPU idle while the host catches up with its launches.
- A non-finite micro-batch loss is turned into NaN gradients (`poison`), so the step's gradient
  norm, all-reduced across ranks, says "skip" on every rank alike.
- Optimizers that take GradScaler's `found_inf` flag (fused Adam/AdamW: transformers' default
  `adamw_torch_fused`) get the step's flag as a device tensor; the fused kernel then leaves weights,
  moments and step count unchanged. Other optimizers read the flag at once (one sync per step) and
  skip `step()`. Under DeepSpeed the engine updates inside backward: the step is reported, not
  skipped.
- The flags stay on the device until the trainer logs (it reads the loss then anyway) or ends.
  `SkippedSteps` is the trainer's side: it counts the skipped steps, stops the run past
  `max_nonfinite_batches`, and corrects the logged loss.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ChatSFTError
from .metrics import loss_of_applied_steps

_INSTALLED = "_chatsft_nonfinite_guard"
MAX_PENDING = 1000  # steps whose flags wait on the device for the next read


@dataclass(frozen=True)
class NonFiniteStep:
    step: int  # the optimizer step (1-based, as logged)
    what: str  # "loss" or "gradient norm"
    value: float


class NonFiniteGuard:
    """Per optimizer step: `poison` each micro-batch loss, `before_step` right before
    `optimizer.step()`, `read` when the host syncs anyway."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses, detached
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, [norm, loss bad, loss])
        self._found: list[NonFiniteStep] = []  # read early, not yet reported
        self._skip_on_host = False

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Let `before_step` skip this optimizer's next step (once per optimizer)."""
        if getattr(optimizer, _INSTALLED, False):
            return
        setattr(optimizer, _INSTALLED, True)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return  # reads `found_inf` itself
        step = optimizer.step
        guard = self

        def guarded_step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if guard._skip_on_host:
                guard._skip_on_host = False
                return None
            return step(*args, **kwargs)

        # A bound method: LR schedulers wrap `optimizer.step` through its __func__.
        optimizer.step = types.MethodType(guarded_step, optimizer)

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, unchanged if finite; otherwise one whose gradients are all NaN."""
        value = loss.detach()
        self._losses.append(value.float().reshape(1))
        return loss * torch.where(torch.isfinite(value), 1.0, float("nan"))

    def before_step(
        self, step: int, grad_norm: torch.Tensor | float | None, optimizer: Any
    ) -> None:
        """Record the step and, if its gradient norm is not finite, make `optimizer` skip it."""
        if isinstance(grad_norm, torch.Tensor):
            device = grad_norm.device
        else:
            device = self._losses[0].device if self._losses else torch.device("cpu")
        losses = torch.cat(self._losses) if self._losses else torch.zeros(1, device=device)
        self._losses = []
        bad_loss = ~torch.isfinite(losses)
        if grad_norm is None:  # no norm computed: a poisoned loss would have made it NaN
            norm = torch.where(bad_loss.any(), float("nan"), 0.0).to(device)
        else:
            norm = torch.as_tensor(grad_norm, device=device).float().reshape(())
        first_bad = losses.gather(0, bad_loss.int().argmax().reshape(1))[0]  # no host read
        summary = torch.stack([norm, bad_loss.any().float(), first_bad.to(norm.dtype)])
        self._pending.append((step, summary))
        if len(self._pending) >= MAX_PENDING:  # a run that rarely logs: bound what is held
            self._found += self._read_pending()
        skip = ~torch.isfinite(norm)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = skip.float()
        elif getattr(optimizer, _INSTALLED, False):
            self._skip_on_host = bool(skip)

    def read(self) -> list[NonFiniteStep]:
        """The non-finite steps since the last read (one host sync, none if nothing is pending)."""
        found, self._found = self._found + self._read_pending(), []
        return found

    def _read_pending(self) -> list[NonFiniteStep]:
        if not self._pending:
            return []
        steps = [s for s, _ in self._pending]
        rows = torch.stack([summary for _, summary in self._pending]).tolist()
        self._pending = []
        found = []
        for step, (norm, bad_loss, loss) in zip(steps, rows):
            if bad_loss:
                found.append(NonFiniteStep(step, "loss", loss))
            elif not math.isfinite(norm):
                found.append(NonFiniteStep(step, "gradient norm", norm))
        return found


def zero_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """The loss the Trainer adds up for its log: a skipped micro-batch adds 0 (see
    `SkippedSteps.logged_loss`). Checked on the device, which spares the Trainer's own NaN filter
    and its host sync (SFTConfig turns it off)."""
    return torch.where(torch.isfinite(loss), loss, 0.0)


class SkippedSteps:
    """The trainer's side of the guard: which steps were skipped, when to stop, what to log."""

    def __init__(self, max_skipped: int, say: Callable[[str | None], None]) -> None:
        self.guard = NonFiniteGuard()
        self.steps: list[int] = []  # every skipped optimizer step, in order
        self.max_skipped = max_skipped
        self.say = say
        self._since_log = 0  # optimizer steps since the last training log

    def before_step(self, step: int, grad_norm: Any, optimizer: Any, guarded: bool) -> None:
        """Right before `optimizer.step()` (accelerate's wrapper or the optimizer itself)."""
        self._since_log += 1
        if guarded:
            self.guard.before_step(step, grad_norm, getattr(optimizer, "optimizer", optimizer))

    def report(self) -> list[NonFiniteStep]:
        """Count the non-finite steps found since the last call; stop past `max_skipped`."""
        found = self.guard.read()
        for bad in found:
            self.steps.append(bad.step)
            if len(self.steps) > self.max_skipped:
                raise ChatSFTError(
                    f"the {bad.what} is {bad.value} at step {bad.step}; its update was not "
                    "applied; stopping",
                    field=bad.what,
                    hint="lower learning_rate, check the data of that step, or set "
                    "max_nonfinite_batches to skip such steps",
                )
            self.say(f"skipped step {bad.step}: its {bad.what} is {bad.value}")
        return found

    def logged_loss(self, loss: float) -> float:
        """A training log's loss over the steps applied since the last log (the host reads the
        loss then anyway, so the flags are read with it)."""
        steps, self._since_log = self._since_log, 0
        return loss_of_applied_steps(loss, steps, len(self.report()))

    def finish(self) -> None:
        """At the end of training: report what is still pending, then the run's total."""
        self.report()
        if self.steps:
            self.say(
                f"skipped {len(self.steps)} non-finite steps ({', '.join(map(str, self.steps))})"
            )
