"""SFTTrainer: a thin transformers.Trainer that wires chatsft's data pipeline and loss."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import datasets
import torch
import yaml
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from ..config import SFTConfig
from ..data.collate import PaddingFreeCollator
from ..data.prepare import prepare_for_training
from ..data.streaming import ConstantLengthDataset
from ..errors import ChatSFTError
from ..log import logger, set_verbosity
from ..model.attention import (
    use_document_attention,
)
from ..model.compile import compile_decoder_layers
from ..model.loss import supervised_loss
from ..model.moe import router_aux_coef
from .build import (
    MODEL_TAGS,
    PREPARED_COLUMNS,
    activation_kind,
    as_sft_config,
    base_model,
    check_labels_present,
    check_no_transform,
    check_text_only,
    check_train_dataset,
    default_collator,
    forward_keys,
    generation_eval_callback,
    load_for_training,
    lora_summary,
    prep_options,
)
from .checkpoints import newest_complete_checkpoint, save_failed, write_run_file
from .metrics import RunMetrics
from .model_card import final_metrics, mask_policy, model_card, non_default_settings, plain
from .nonfinite import NonFiniteGuard, NonFiniteStep

CONFIG_FILE = "training_config.yaml"
STAGING_DIR = ".checkpoint-in-progress"

# The private transformers.Trainer methods chatsft overrides or replaces, with the parameters they
# had when verified (transformers 5.0 to 5.25; pyproject.toml allows >=5,<6).
# tests/test_structure.py fails loudly when a transformers release changes one of them.
PRIVATE_TRAINER_METHODS = {
    "_build_accelerator_args": ("self", "kwargs"),  # no accelerate compile of pre-compiled layers
    "_set_signature_columns_if_needed": ("self",),  # keep seq_lengths for the collator
    "_get_grad_norm": ("self", "model", "grad_norm"),  # the non-finite guard, before step()
    "_save_checkpoint": ("self", "model", "trial"),  # staged checkpoint folders
    "_get_output_dir": ("self", "trial"),  # pointed at the staging folder during a save
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
        self._report: Any = None
        given = processing_class if processing_class is not None else tokenizer
        loaded = load_for_training(model, args, given, quantization_config, peft_config)
        model, tokenizer, self._model_name = loaded.model, loaded.tokenizer, loaded.name
        for line in loaded.log:
            self._say(args, line)
        # TRL's attribute names: the router loss weight, and whether it is on.
        self.router_aux_loss_coef = router_aux_coef(model, args.router_aux_loss_coef)
        self.aux_loss_enabled = bool(self.router_aux_loss_coef)
        self.prep_stats: dict[str, Any] = {}
        self._prepared_sets: list[Any] = []
        extra = dict(args.dataset_kwargs or {})
        skip_prepare = bool(extra.pop("skip_prepare_dataset", False))
        if extra:
            warnings.warn(
                f"dataset_kwargs {sorted(extra)} are not used by chatsft; remove them", stacklevel=2
            )
        self._skip_prepare = skip_prepare
        self._formatting_func = formatting_func
        opts = prep_options(args, tokenizer)
        if args.training_report:
            from .report import TrainingReportCallback

            self._report = TrainingReportCallback()
            callbacks = [*(callbacks or []), self._report]
        if args.generation_eval is not None:
            # Before preparation: the prompts are cut from the raw eval rows.
            sampler = generation_eval_callback(args, eval_dataset, tokenizer, formatting_func)
            callbacks = [*(callbacks or []), sampler]
        prep_kwargs = dict(
            packing=args.packing,
            packing_strategy=args.packing_strategy,
            formatting_func=formatting_func,
            num_proc=args.dataset_num_proc,
            column_map=args.column_map,
        )
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        self._eval_prep = (tokenizer, opts, {**prep_kwargs, "packing": eval_packing})
        if skip_prepare:
            check_labels_present({"train": train_dataset, "eval": eval_dataset})
        else:
            train_dataset = self._prepare(
                train_dataset, tokenizer, opts, "train", args, prep_kwargs
            )
            eval_dataset = self._prepare_eval(eval_dataset, args)
        if data_collator is None:
            data_collator = default_collator(args, model, tokenizer)
            if isinstance(data_collator, PaddingFreeCollator):
                self._say(args, use_document_attention(model, *activation_kind(args, model)))
        # torch_compile: compile the decoder layers ourselves (regional, dynamic length) unless
        # FSDP/DeepSpeed wrap the model, where accelerate's own compile path applies.
        self._compiled_layers = False
        if args.torch_compile and not (args.fsdp or args.deepspeed):
            line = compile_decoder_layers(
                model, args.torch_compile_backend, args.torch_compile_mode
            )
            self._compiled_layers = line is not None
            self._say(args, line)
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
        self.nonfinite_steps: list[int] = []
        self._nonfinite = NonFiniteGuard()
        self._steps_since_log = 0

    def _prepare_eval(self, eval_dataset: Any, args: SFTConfig) -> Any:
        """A raw eval set (Dataset, IterableDataset, DatasetDict or dict of them) prepared as the
        training data is; a prepared one as it is."""
        tokenizer, opts, kwargs = self._eval_prep
        if isinstance(eval_dataset, dict):
            return {
                key: self._prepare(ds, tokenizer, opts, f"eval_{key}", args, kwargs)
                for key, ds in eval_dataset.items()
            }
        if eval_dataset is None:
            return None
        return self._prepare(eval_dataset, tokenizer, opts, "eval", args, kwargs)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        # A dataset passed here (a held-out test set) is prepared like the one given at init; a str
        # names one of the eval sets prepared at init.
        if isinstance(eval_dataset, str) or eval_dataset is None:
            pass
        elif self._skip_prepare:
            check_labels_present({"eval": eval_dataset})
        else:
            eval_dataset = self._prepare_eval(eval_dataset, self.args)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _prepare(self, dataset, tokenizer, opts, name, args, prep_kwargs):
        if any(dataset is done for done in self._prepared_sets):
            return dataset  # evaluate() re-enters with the sets prepared here
        check_no_transform(dataset, name)
        if name == "train" and args.shuffle_dataset and hasattr(dataset, "shuffle"):
            dataset = dataset.shuffle(seed=args.seed)  # before packing: rows mix the whole set
        if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
            if isinstance(dataset, ConstantLengthDataset):
                return dataset
            if prep_kwargs.get("column_map"):
                dataset = dataset.rename_columns(prep_kwargs["column_map"])
            # Streaming: tokenize and pack as rows arrive; counts grow in .stats as it runs.
            return ConstantLengthDataset(
                dataset,
                tokenizer,
                opts,
                packing=prep_kwargs["packing"],
                packing_strategy=prep_kwargs["packing_strategy"],
                formatting_func=prep_kwargs["formatting_func"],
            )
        # Rank 0 prepares first and fills datasets' cache; the other ranks then read it.
        with args.main_process_first(desc=f"{name} data preparation"):
            prepared, stats = prepare_for_training(
                dataset, tokenizer, opts, name=name, **prep_kwargs
            )
        if stats is not None:
            self.prep_stats[name] = stats
            self._say(args, stats.summary(name))
        self._prepared_sets.append(prepared)
        return prepared

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
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self._forward_keys is not None:
            inputs = {k: v for k, v in inputs.items() if k in self._forward_keys}
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
            # A per-micro-batch mean (DDP averages it over ranks): averaged over the step's
            # micro-batches, so that accumulation leaves its weight unchanged (as TRL does).
            steps = (
                self.current_gradient_accumulation_steps
                if model.training and num_items_in_batch is not None
                else 1
            )
            loss = loss + self.router_aux_loss_coef * aux / steps
            self.metrics.add_aux(mode, aux)
        if model.training and self._guards_nonfinite():
            loss = self._nonfinite.poison(loss)
        self.metrics.add(mode, parts.num_tokens, parts.num_correct)
        return (loss, outputs) if return_outputs else loss

    def _guards_nonfinite(self) -> bool:
        # fp16's GradScaler skips overflowing steps itself (expected while it calibrates).
        return self.accelerator.scaler is None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._guards_nonfinite():
            return loss
        # The logged loss leaves out skipped micro-batches (see log); checking here on the device
        # spares the Trainer's own NaN filter, and its host sync (SFTConfig turns it off).
        return torch.where(torch.isfinite(loss), loss, 0.0)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self._nonfinite.install(optimizer)
        return optimizer

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        # Runs right before optimizer.step(): the step is skipped there if this norm is not finite.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._steps_since_log += 1
        if self._guards_nonfinite():
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
            self._nonfinite.before_step(self.state.global_step + 1, grad_norm, optimizer)
        return grad_norm

    def _report_nonfinite(self) -> list[NonFiniteStep]:
        """Count the non-finite steps found since the last call; stop past max_nonfinite_batches."""
        found = self._nonfinite.read()
        for bad in found:
            self.nonfinite_steps.append(bad.step)
            if len(self.nonfinite_steps) > self.args.max_nonfinite_batches:
                raise ChatSFTError(
                    f"the {bad.what} is {bad.value} at step {bad.step}; its update was not "
                    "applied; stopping",
                    field=bad.what,
                    hint="lower learning_rate, check the data of that step, or set "
                    "max_nonfinite_batches to skip such steps",
                )
            self._say(self.args, f"skipped step {bad.step}: its {bad.what} is {bad.value}")
        return found

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            # transformers would take the highest-numbered folder even if a crash cut it short.
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ChatSFTError(
                    "no complete checkpoint to resume from", source=self.args.output_dir
                )
        if self._report is not None and self.run_record:
            self._report.dataset_name = self.run_record.get("dataset_name")
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a file
            raise ChatSFTError(
                "refused to load a checkpoint file that holds objects other than tensors and "
                f"numbers (unsafe to unpickle): {str(err).splitlines()[0][:200]}",
                source=str(resume_from_checkpoint),
                hint="resume only from checkpoints you trust, or train without --resume",
            ) from None
        self._report_nonfinite()
        if self.nonfinite_steps:
            steps = ", ".join(map(str, self.nonfinite_steps))
            self._say(self.args, f"skipped {len(self.nonfinite_steps)} non-finite steps ({steps})")
        return result

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Our outputs hold logits for trained positions only; without compute_metrics there is
        # nothing to gather, so skip collecting them.
        only_loss = prediction_loss_only or self.compute_metrics is None
        return super().prediction_step(model, inputs, only_loss, ignore_keys)

    @property
    def num_trained_tokens(self) -> int:
        return self.metrics.num_trained_tokens

    def _reduce(self, tensor: torch.Tensor, how: str) -> torch.Tensor:
        if self.accelerator.num_processes > 1:
            return self.accelerator.reduce(tensor, reduction=how)
        return tensor

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the host reads the loss now anyway
            skipped = len(self._report_nonfinite())
            if skipped:  # the Trainer averaged over every step of the window; skipped ones add 0
                applied = self._steps_since_log - skipped
                logs["loss"] = (
                    logs["loss"] * self._steps_since_log / applied if applied else math.nan
                )
            self._steps_since_log = 0
        self.metrics.fill(logs, self._reduce, self.state.log_history)
        super().log(logs, start_time)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write checkpoint-N into a staging folder and rename it when every rank has finished:
        a crash mid-save never leaves a checkpoint-N that looks complete."""
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"checkpoint-{self.state.global_step}"
        self._get_output_dir = lambda trial=None: staging  # the Trainer saves under this root
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                write_run_file(os.path.join(staging, name), self.run_record)
        except (OSError, RuntimeError) as err:  # a full disk: safetensors raises its own error
            shutil.rmtree(staging, ignore_errors=True)
            raise save_failed(err, os.path.join(run_dir, name), name, model) from None
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)  # a stale folder from an earlier run at the same step
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._write_run_files(output_dir or self.args.output_dir)

    def _write_run_files(self, output_dir: str) -> None:
        """training_config.yaml (what re-runs this training: `chatsft train` reads it back) and
        the model card README.md (replacing peft's blank template in adapter folders)."""
        settings = non_default_settings(self.args)
        record = self.run_record or {"model_name_or_path": self._model_name, **settings}
        with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            yaml.safe_dump(plain(record), f, sort_keys=False)
        card = model_card(
            base_model=self._model_name,
            dataset=record.get("dataset_name"),
            command=self.run_command,
            metrics=final_metrics(self.state.log_history),
            policy=mask_policy(self.args),
            peft=lora_summary(self.model),
            tags=list(getattr(base_model(self.model), "model_tags", None) or MODEL_TAGS),
            settings=settings,
        )
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
