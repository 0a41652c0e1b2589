"""What the SFTTrainer is built from: the config, the model's loading arguments, the collator, and
TRL's checks of the datasets it is given. Pure functions; the trainer only wires them."""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, set_seed

from ..config import SFTConfig
from ..data.collate import PaddedCollator, PaddingFreeCollator
from ..data.encode import PrepOptions, prep_options_of
from ..errors import ChatSFTError
from ..generation.callback import generation_eval_callback_from_config
from ..model import cpu_linear
from ..model.attention import (
    isolates_without_dense_mask,
    shared_rows_refusal,
)
from ..model.compile import compile_decoder_layers
from ..model.gguf import find_gguf, load_gguf
from ..model.load import (
    apply_peft,
    half_precision_cost,
    load_model,
    load_tokenizer,
    sync_special_tokens,
    training_init_kwargs,
)
from .model_card import MODEL_TAGS

PREPARED_COLUMNS = ("input_ids", "labels", "seq_lengths", "attention_mask", "position_ids")


def check_train_dataset(train_dataset: Any) -> None:
    """TRL's errors (same types and wording) for a missing or unsupported train_dataset."""
    if train_dataset is None:
        raise ValueError("`train_dataset` is required")
    if not isinstance(
        train_dataset,
        (datasets.Dataset, datasets.IterableDataset, torch.utils.data.Dataset),
    ) or isinstance(train_dataset, dict):
        raise TypeError(
            f"`train_dataset` must be a `Dataset` or `IterableDataset`, got "
            f"`{type(train_dataset).__name__}`; for a DatasetDict pass one split, e.g. "
            "dataset['train']"
        )


def check_no_transform(dataset: Any, name: str) -> None:
    """Preparation reads rows through Dataset.with_transform and would bake a random transform's
    one draw into the tokenized data; TRL refuses this too."""
    if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") == "custom":
        raise ChatSFTError(
            f"the {name} dataset uses Dataset.with_transform() (or set_transform): preparation "
            "would tokenize one fixed draw of a random transform",
            field="train_dataset" if name == "train" else "eval_dataset",
            hint="pass dataset_kwargs={'skip_prepare_dataset': True} with a transform that "
            "returns trainer-ready rows (input_ids, labels), or apply deterministic transforms "
            "with Dataset.map first",
        )


def check_text_only(dataset: Any) -> None:
    """chatsft trains text-only models; TRL's error (and wording) for image data."""
    columns = set(getattr(dataset, "column_names", None) or [])
    if columns & {"image", "images"}:
        raise ValueError(
            "The dataset appears to be vision-related (it has an 'image' or 'images' column), but "
            "chatsft trains text-only models, not a vision-language model: remove the image "
            "columns, or train with TRL"
        )


def check_labels_present(named: dict[str, Any]) -> None:
    """With skip_prepare_dataset nothing turns mask columns into labels: a dataset carrying masks
    but no labels would silently train on every token."""
    for name, dataset in named.items():
        sets = dataset.values() if isinstance(dataset, dict) else [dataset]
        for ds in sets:
            cols = set(getattr(ds, "column_names", None) or [])
            if "labels" not in cols and cols & {"completion_mask", "assistant_masks"}:
                raise ChatSFTError(
                    f"the {name} dataset has mask columns but no 'labels', and "
                    "skip_prepare_dataset=True skips building labels, so it would train on every "
                    "token",
                    field="dataset_kwargs",
                    hint="Add a 'labels' column (-100 for tokens not trained) or drop "
                    "skip_prepare_dataset",
                )


def as_sft_config(args: TrainingArguments | None) -> SFTConfig:
    if args is None:
        return SFTConfig()
    if isinstance(args, SFTConfig):
        return args
    # A plain TrainingArguments: keep every value the user set, add SFT defaults.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return SFTConfig(**values)


def model_init_kwargs(
    args: SFTConfig, model: Any, quantization_config: Any | None
) -> dict[str, Any] | None:
    """from_pretrained's keyword arguments: model_init_kwargs, plus TRL's quantization_config
    argument and trust_remote_code field."""
    kwargs = dict(args.model_init_kwargs or {})
    if isinstance(model, str):
        kwargs = training_init_kwargs(kwargs)
    if quantization_config is not None:
        if not isinstance(model, str):
            raise ChatSFTError(
                "quantization_config only applies when model is a hub id or a path",
                field="quantization_config",
                hint="quantize the model yourself, or pass it by name",
            )
        if "quantization_config" in kwargs:
            raise ChatSFTError(
                "quantization_config is set both as an SFTTrainer argument and in "
                "model_init_kwargs",
                field="quantization_config",
                hint="set it in one place",
            )
        kwargs["quantization_config"] = quantization_config
    if args.trust_remote_code and isinstance(model, str):
        kwargs.setdefault("trust_remote_code", True)
    return kwargs or None


def prep_options(args: SFTConfig, tokenizer: Any) -> PrepOptions:
    return prep_options_of(args, tokenizer.eos_token)


def default_collator(args: SFTConfig, model: torch.nn.Module, tokenizer: Any) -> Callable:
    """Padding-free rows when asked (packing, padding_free) and where the model keeps documents
    apart in them; by default (padding_free None) wherever that is strictly better: same loss, no
    pad compute."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if args.packing or args.eval_packing or args.padding_free:
        why = shared_rows_refusal(model)
        if why is not None:
            raise ChatSFTError(
                f"packing and padding_free put several documents in one row, but {why}",
                field="packing" if args.packing or args.eval_packing else "padding_free",
                hint="set packing: false and padding_free: false (padded rows keep documents "
                "apart)",
            )
        return PaddingFreeCollator(pad_id, args.pad_to_multiple_of)
    auto = args.padding_free is None and isolates_without_dense_mask(model)
    if auto and shared_rows_refusal(model) is None:
        return PaddingFreeCollator(pad_id, args.pad_to_multiple_of)
    return PaddedCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def activation_kind(args: SFTConfig, model: torch.nn.Module) -> tuple[str, torch.dtype | None]:
    """(device type, dtype) that attention will see in training, for the log line."""
    if args.bf16:
        return args.device.type, torch.bfloat16
    if args.fp16:
        return args.device.type, torch.float16
    return args.device.type, next(model.parameters(), torch.empty(0)).dtype


def model_name(model: torch.nn.Module) -> str | None:
    """The hub id or folder a model was loaded from (None for a module built in memory)."""
    config = getattr(base_model(model), "config", None)
    return getattr(config, "_name_or_path", None) or None


def with_run_callbacks(
    callbacks: list | None,
    args: SFTConfig,
    eval_dataset: Any,
    tokenizer: Any,
    formatting_func: Callable | None,
) -> tuple[list | None, TrainerCallback | None]:
    """The given callbacks plus chatsft's: the training report (also returned: the trainer tells
    it the dataset's name) and generation_eval's sampler (its prompts cut from the raw eval rows,
    so this runs before preparation)."""
    report = None
    if args.training_report:
        from .report import TrainingReportCallback

        report = TrainingReportCallback()
        callbacks = [*(callbacks or []), report]
    if args.generation_eval is not None:
        if args.eval_strategy == "no":
            warnings.warn(
                "generation_eval samples at each evaluation, but eval_strategy is 'no'; set "
                "eval_strategy: steps (with eval_steps) or call trainer.evaluate()",
                stacklevel=3,  # this function, SFTTrainer.__init__, then the caller's line
            )
        sampler = generation_eval_callback_from_config(
            args.generation_eval,
            eval_dataset,
            tokenizer,
            dataset_format=args.dataset_format,
            column_map=args.column_map,
            dataset_text_field=args.dataset_text_field,
            prompt_template=args.prompt_template,
            formatting_func=formatting_func,
        )
        callbacks = [*(callbacks or []), sampler]
    return callbacks, report


def compile_layers(args: SFTConfig, model: torch.nn.Module) -> str | None:
    """torch_compile: compile the decoder layers in place (regional, dynamic length), unless
    FSDP/DeepSpeed wrap the model, where accelerate's own compile path applies. Returns the log
    line, None where nothing was compiled here."""
    if not args.torch_compile or args.fsdp or args.deepspeed:
        return None
    return compile_decoder_layers(model, args.torch_compile_backend, args.torch_compile_mode)


def cpu_linears(args: SFTConfig, model: torch.nn.Module, compiled: bool) -> tuple[bool, str | None]:
    """Whether fp32 linear layers train through oneDNN (model/cpu_linear.py), and the log line.
    Sharded weights (FSDP, DeepSpeed) keep PyTorch's path."""
    if args.fsdp or args.deepspeed:
        return False, None
    device_type, dtype = activation_kind(args, model)
    return cpu_linear.choose(device_type, dtype, compiled, args.gradient_checkpointing)


def forward_keys(model: torch.nn.Module) -> set[str] | None:
    """For plain modules, the batch keys their forward accepts (None: pass everything)."""
    base = base_model(model)
    if isinstance(base, PreTrainedModel):
        return None
    params = inspect.signature(base.forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def split_batch(
    inputs: dict[str, torch.Tensor], keys: set[str] | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the forward's inputs, labels): a plain module gets only the keys it takes (forward_keys)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    if keys is not None:
        inputs = {k: v for k, v in inputs.items() if k in keys}
    return inputs, labels


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Any
    name: str | None  # the hub id, folder or GGUF file it came from (for the model card)
    log: list[str]


def load_for_training(
    model: str | torch.nn.Module,
    args: SFTConfig,
    processing_class: Any | None,
    quantization_config: Any | None,
    peft_config: Any | None,
) -> Loaded:
    """The model and tokenizer a run trains, as TRL loads them: by name in float32 (or a GGUF
    file), the tokenizer's pad/EOS mirrored into the model's configs, seeded before peft draws its
    adapter weights, tagged for the model card. Returns the log lines to print."""
    log: list[str] = []
    if isinstance(model, str) and os.path.isdir(os.path.expanduser(model)):
        # Recorded in adapter_config.json and the model card: valid from any folder.
        model = os.path.abspath(os.path.expanduser(model))
    if args.model_init_kwargs and not isinstance(model, str):
        raise ChatSFTError(
            "model_init_kwargs only apply when model is a hub id or a path",
            field="model_init_kwargs",
            hint="remove them or pass the model by name",
        )
    gguf_file = find_gguf(model) if isinstance(model, str) else None
    if gguf_file is not None:
        dtype = training_init_kwargs(args.model_init_kwargs)["dtype"]
        model, gguf_tokenizer = load_gguf(gguf_file, dtype)
        processing_class = processing_class if processing_class is not None else gguf_tokenizer
        log.append(
            f"model: {gguf_file} read through transformers, dequantized to {dtype}; tokenizer "
            "and chat template from the file (`chatsft import-gguf` saves it once as a folder, "
            "so later runs skip this step)"
        )
    tokenizer = load_tokenizer(
        model,
        processing_class,
        chat_template_path=args.chat_template_path,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        trust_remote_code=args.trust_remote_code,
        revision=(args.model_init_kwargs or {}).get("revision"),
    )
    set_seed(args.seed)  # peft draws its adapter weights at random: a run is reproducible
    model = load_model(model, model_init_kwargs(args, model, quantization_config))
    log.append(sync_special_tokens(model, tokenizer, args.eos_token is not None) or "")
    model = apply_peft(model, peft_config)
    if hasattr(model, "add_model_tags"):  # into the model card on save / push_to_hub
        model.add_model_tags(MODEL_TAGS)
    optim = str(getattr(args.optim, "value", args.optim))
    log.append(half_precision_cost(model, optim, args.learning_rate) or "")
    if peft_config is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.append(f"peft: {trainable:,} trainable of {total:,} parameters")
    name = gguf_file or model_name(model)
    return Loaded(model, tokenizer, name, [line for line in log if line])
