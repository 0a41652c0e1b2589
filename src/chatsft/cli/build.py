"""From parsed command-line settings to what the library takes: from_pretrained keyword arguments,
a peft LoraConfig, a bitsandbytes quantization config, the datasets."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..config import ModelConfig, ScriptArguments, SFTConfig
from ..errors import ChatSFTError


def model_init_kwargs(model_args: ModelConfig, sft: SFTConfig) -> dict[str, Any] | None:
    """ModelConfig's loading fields, under SFTConfig.model_init_kwargs (which win, as in
    `trl sft`)."""
    kwargs: dict[str, Any] = {}
    if model_args.model_revision != "main":
        kwargs["revision"] = model_args.model_revision
    if model_args.dtype is not None:
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    kwargs.update(quantization_kwargs(model_args))
    kwargs.update(sft.model_init_kwargs or {})
    return kwargs or None


def peft_config(model_args: ModelConfig) -> Any | None:
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    # `--lora_target_modules q_proj,v_proj` and `q_proj v_proj` name the same modules.
    targets = [t for item in model_args.lora_target_modules or [] for t in item.split(",") if t]
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's keyword, not a module name
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets or None,
        target_parameters=model_args.lora_target_parameters,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def quantization_kwargs(model_args: ModelConfig) -> dict[str, Any]:
    """from_pretrained's quantization_config for QLoRA / 8-bit LoRA, with clear errors where it
    cannot run."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return {}
    import torch

    field = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise ChatSFTError(
            "quantized base weights need a CUDA GPU; bitsandbytes' kernels do not run on CPU",
            field=field,
            hint="use plain LoRA (use_peft without load_in_4bit/load_in_8bit) on this machine",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ChatSFTError(
            "bitsandbytes is not installed", field=field, hint="pip install 'chatsft[qlora]'"
        )
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    }


def datasets_of(script: ScriptArguments, sft: SFTConfig) -> tuple[Any, Any | None]:
    """The train and eval sets a `chatsft train` run names (see data.load.train_and_eval)."""
    from ..data.load import datasets_named

    assert script.dataset_name is not None
    return datasets_named(script, seed=sft.seed, eval_strategy=sft.eval_strategy)
