"""LoRA from config fields (TRL's ModelConfig names), and merging an adapter into its base model."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ChatSFTError


def lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = "all-linear",
    modules_to_save: list[str] | None = None,
) -> Any:
    from peft import LoraConfig

    if r < 1:
        raise ChatSFTError(f"lora_r must be >= 1, got {r}", field="lora_r")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )


def is_adapter_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def load_adapter_model(adapter_dir: str, **model_kwargs: Any) -> Any:
    """Base model (from the adapter's base_model_name_or_path) with the adapter applied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ChatSFTError(
            "adapter_config.json names no base_model_name_or_path",
            source=adapter_dir,
            hint="set it to the base model's hub id or folder",
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **model_kwargs)
    except OSError as err:
        raise ChatSFTError(
            f"could not load the base model {base!r}: {err}", source=adapter_dir
        ) from None
    return PeftModel.from_pretrained(model, adapter_dir)


def merge_adapter(adapter_dir: str, output_dir: str) -> str:
    """Write a standalone model folder: base + adapter merged, with the tokenizer and template."""
    from transformers import AutoTokenizer

    if not is_adapter_dir(adapter_dir):
        raise ChatSFTError(
            "no adapter_config.json here, so this is not a LoRA adapter folder", source=adapter_dir
        )
    merged = load_adapter_model(adapter_dir).merge_and_unload()
    tmp = output_dir.rstrip("/") + ".partial"
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    if os.path.exists(output_dir):
        raise ChatSFTError("output folder already exists", source=output_dir, hint="pick a new one")
    os.replace(tmp, output_dir)  # the folder appears only when complete
    return output_dir
