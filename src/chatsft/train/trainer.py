"""SFTTrainer: a thin transformers.Trainer that wires chatsft's data pipeline and loss."""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Callable
from typing import Any

import datasets
import torch
from transformers import Trainer, TrainingArguments

from ..config import SFTConfig
from ..data.collate import PaddingFreeCollator
from ..log import logger, set_verbosity
from ..model.attention import use_document_attention
from ..model.cpu_linear import OneDNNLinears
from ..model.loss import supervised_loss
from ..model.moe import router_aux_coef, router_loss
from . import checkpoints
from .build import (
    PREPARED_COLUMNS,
    activation_kind,
    as_sft_config,
    check_text_only,
    check_train_dataset,
    compile_layers,
    cpu_linears,
    default_collator,
    forward_keys,
    load_for_training,
    split_batch,
    with_run_callbacks,
)
from .metrics import RunMetrics, reduce_over_ranks
from .model_card import write_run_files
from .nonfinite import SkippedSteps, zero_if_nonfinite
from .prepare import DataPrep

__all__ = ["PRIVATE_TRAINER_METHODS", "SFTTrainer"]

# The private transformers.Trainer methods chatsft overrides or replaces, with the parameters they
# had when verified (transformers 5.0 to 5.25; pyproject.toml allows >=5,<6).
# tests/test_structure.py fails loudly when a transformers release changes one of them.
PRIVATE_TRAINER_METHODS = {
    "_build_accelerator_args": ("self", "kwargs"),  # no accelerate compile of pre-compiled layers
    "_set_signature_columns_if_needed": ("self",),  # keep seq_lengths for the collator
    "_get_grad_norm": ("self", "model", "grad_norm"),  # the non-finite guard, before step()
    "_save_checkpoint": ("self", "model", "trial"),  # staged checkpoint folders
    "_get_output_dir": ("self", "trial"),  # the staging folder while a checkpoint is saved
}


class SFTTrainer(Trainer):
    """Drop-in replacement for `trl.SFTTrainer`."""

    def __init__(
        self,
        model: str | torch.nn.Module,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: Any | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config: Any | None = None,
        peft_config: Any | None = None,
        formatting_func: Callable | None = None,
        tokenizer: Any | None = None,  # TRL's older name for processing_class
    ) -> None:
        args = as_sft_config(args)
        set_verbosity(str(args.log_level))
        check_train_dataset(train_dataset)
        check_text_only(train_dataset)
        # What saved folders record: the CLI sets the settings it parsed and its command line.
        self.run_record: dict[str, Any] | None = None
        self.run_command: str | None = None
        say = functools.partial(self._say, args)
        given = processing_class if processing_class is not None else tokenizer
        loaded = load_for_training(model, args, given, quantization_config, peft_config)
        model, tokenizer, self._model_name = loaded.model, loaded.tokenizer, loaded.name
        for line in loaded.log:
            say(line)
        # TRL's attribute names: the router loss weight, and whether it is on.
        self.router_aux_loss_coef = router_aux_coef(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)
        self._data = DataPrep(args, tokenizer, formatting_func, say)
        self.prep_stats = self._data.stats
        self._eval_prep = self._data.eval_recipe  # (tokenizer, opts, kwargs)
        # Before preparation: generation_eval cuts its prompts from the raw eval rows.
        callbacks, self._report = with_run_callbacks(
            callbacks, args, eval_dataset, tokenizer, formatting_func
        )
        train_dataset = self._data.train(train_dataset)
        eval_dataset = self._data.eval(eval_dataset)
        if data_collator is None:
            data_collator = default_collator(args, model, tokenizer)
            if isinstance(data_collator, PaddingFreeCollator):
                say(use_document_attention(model, *activation_kind(args, model)))
        line = compile_layers(args, model)  # None: accelerate compiles the model, if asked
        self._compiled_layers = line is not None
        say(line)
        onednn, line = cpu_linears(args, model, self._compiled_layers)
        self._linears = OneDNNLinears if onednn else contextlib.nullcontext
        say(line)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss below normalises by the step's trained-token count itself, so the Trainer
        # must count those tokens (num_items_in_batch) and must not divide by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._forward_keys = forward_keys(model)
        # Sharded weights (FSDP, ZeRO-3) only exist inside their module's forward: plain path.
        self._chunked_loss = not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self.metrics = RunMetrics()
        self._skipped = SkippedSteps(args.max_nonfinite_batches, say)
        self._checkpoint_root: str | None = None  # where _get_output_dir points during a save

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # A dataset passed here (a held-out test set) is prepared like the one given at init; a str
        # names one of the eval sets prepared at init.
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._data.eval(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    @staticmethod
    def _say(args: SFTConfig, line: str | None) -> None:
        if line and args.process_index == 0:
            logger.info(line.removeprefix("[chatsft] "))

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self._compiled_layers:  # the layers are compiled: accelerate must not compile it all
            accelerator_args.pop("dynamo_plugin", None)
        return accelerator_args

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.args.world_size > 1 and hasattr(loader, "__len__"):
            # Every rank says what it got, so a rank that drops data is visible in the log.
            logger.info(
                f"rank {self.args.process_index} of {self.args.world_size}: "
                f"{len(loader)} batches of {self.args.per_device_train_batch_size} rows per epoch",
            )
        return loader

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer would drop columns the model's forward does not name (seq_lengths); our
        # collators consume them.
        if self._signature_columns is None:
            self._signature_columns = list(PREPARED_COLUMNS)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs, labels = split_batch(inputs, self._forward_keys)
        parts, outputs = supervised_loss(
            model,
            inputs,
            labels,
            chunked=self._chunked_loss,
            dft=self.args.loss_type == "dft",
            # compute_metrics gets logits aligned with the labels, as with TRL (evaluation only).
            all_logits=self.compute_metrics is not None and not model.training,
        )
        # THE normalisation: sum of token losses / trained tokens of the whole optimizer step.
        # num_items_in_batch counts every micro-batch of the step (and, with
        # average_tokens_across_devices, every rank); DDP then averages gradients over ranks, which
        # the world-size factor undoes so the update is a sum over all ranks' tokens / global count.
        if num_items_in_batch is None:
            loss = parts.loss_sum / parts.num_tokens.clamp(min=1)
        else:
            loss = parts.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        aux = getattr(outputs, "aux_loss", None) if self.router_aux_loss_coef else None
        if aux is not None:
            accumulated = model.training and num_items_in_batch is not None
            steps = self.current_gradient_accumulation_steps if accumulated else 1
            loss = loss + router_loss(aux, self.router_aux_loss_coef, steps)
            self.metrics.add_aux(mode, aux)
        if model.training and self._guards_nonfinite():
            loss = self._skipped.guard.poison(loss)
        self.metrics.add(mode, parts.num_tokens, parts.num_correct)
        return (loss, outputs) if return_outputs else loss

    def _guards_nonfinite(self) -> bool:
        # fp16's GradScaler skips overflowing steps itself (expected while it calibrates).
        return self.accelerator.scaler is None

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._linears():  # the forward; checkpointed layers keep PyTorch's path (cpu_linear)
            loss = super().training_step(model, inputs, num_items_in_batch)
        return zero_if_nonfinite(loss) if self._guards_nonfinite() else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self._skipped.guard.install(optimizer)
        return optimizer

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        # Runs right before optimizer.step(): the step is skipped there if this norm is not finite.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        self._skipped.before_step(step, grad_norm, self.optimizer, self._guards_nonfinite())
        return grad_norm

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            # transformers would take the highest-numbered folder even if a crash cut it short.
            resume_from_checkpoint = checkpoints.newest_to_resume(self.args.output_dir)
        if self._report is not None and self.run_record:
            self._report.dataset_name = self.run_record.get("dataset_name")
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a file
            raise checkpoints.unsafe_checkpoint(err, str(resume_from_checkpoint)) from None
        self._skipped.finish()
        return result

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Our outputs hold logits for trained positions only; without compute_metrics there is
        # nothing to gather, so skip collecting them.
        only_loss = prediction_loss_only or self.compute_metrics is None
        with self._linears():
            return super().prediction_step(model, inputs, only_loss, ignore_keys)

    @property
    def num_trained_tokens(self) -> int:
        return self.metrics.num_trained_tokens

    @property
    def nonfinite_steps(self) -> list[int]:
        """The optimizer steps skipped for a non-finite loss or gradient norm."""
        return self._skipped.steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            logs["loss"] = self._skipped.logged_loss(logs["loss"])
        self.metrics.fill(logs, reduce_over_ranks(self.accelerator), self.state.log_history)
        super().log(logs, start_time)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write checkpoint-N into a staging folder and rename it when every rank has finished:
        a crash mid-save never leaves a checkpoint-N that looks complete."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        self._checkpoint_root = checkpoints.staging_dir(run_dir)
        save = functools.partial(super()._save_checkpoint, model, trial)
        try:
            checkpoints.stage(save, run_dir, name, self.run_record, model, self.args.should_save)
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.state.best_model_checkpoint = checkpoints.publish(
                run_dir, name, self.state.best_model_checkpoint, self.args.save_total_limit
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial: Any) -> str:
        # The Trainer writes a checkpoint under this folder: the staging one during our save.
        return self._checkpoint_root or super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_run_files(
                output_dir or self.args.output_dir,
                self.args,
                record=self.run_record,
                model=self.model,
                model_name=self._model_name,
                command=self.run_command,
                log_history=self.state.log_history,
            )
