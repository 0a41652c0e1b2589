"""What the estimator returns: the predicted memory and files of one run, and a fitted batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckpointFile:
    name: str
    bytes: int
    exact: bool  # False: a typical size, not computed for this model


@dataclass
class Estimate:
    """Everything `estimate` predicts. Memory figures are bytes per device."""

    model: str
    settings: dict[str, Any]
    total_params: int
    trainable_params: int
    weight_dtype: str
    # weights, gradients, optimizer_state, optimizer_step_temporaries, autocast_weight_copies,
    # ddp_gradient_buckets, activations, backward_working_set, loss_buffers
    memory: dict[str, int]
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    peak_bytes: int
    peak_phase: str  # when the peak happens: "forward/backward" or "optimizer step"
    checkpoint_files: list[CheckpointFile]
    checkpoint_bytes: int  # one checkpoint-N folder
    checkpoints_kept: int | None  # save_total_limit; None = every checkpoint stays
    final_model_bytes: int  # what save_model writes to output_dir at the end
    total_disk_bytes: int | None  # kept checkpoints + final model; None when unbounded
    note: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        from .format import format_estimate

        return format_estimate(self)


@dataclass
class FitResult:
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    memory_budget: int
    usable_bytes: int
    estimate: Estimate
    reason: str
    tried: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
