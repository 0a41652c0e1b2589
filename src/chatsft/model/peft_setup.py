"""LoRA from config fields (TRL's ModelConfig names), and merging an adapter into its base model."""

from __future__ import annotations

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


def adapter_base(adapter_dir: str) -> str:
    """The base model an adapter was trained on, as adapter_config.json records it."""
    import json

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise ChatSFTError(
            "no adapter_config.json here, so this is not a LoRA adapter folder", source=adapter_dir
        )
    with open(path, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ChatSFTError(
            "adapter_config.json names no base_model_name_or_path", source=path, hint="pass --base"
        )
    return base


def merge_adapter(adapter_dir: str, output_dir: str, base: str | None = None) -> str:
    """Write a standalone model folder: base + adapter merged, with the tokenizer and template.
    `base` overrides the base model recorded in adapter_config.json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recorded = adapter_base(adapter_dir)
    base = base or recorded
    if os.path.exists(output_dir):
        raise ChatSFTError("output folder already exists", source=output_dir, hint="pick a new one")
    if (base.startswith((".", "/", "~")) or os.sep in base) and not os.path.isdir(base):
        where = "given as --base" if base != recorded else "recorded in adapter_config.json"
        raise ChatSFTError(
            f"base model folder {base!r} ({where}) does not exist",
            source=os.path.join(adapter_dir, "adapter_config.json"),
            hint="pass --base PATH_OR_HUB_ID",
        )
    model = AutoModelForCausalLM.from_pretrained(base)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    has_tokenizer = os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    tmp = output_dir.rstrip("/") + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)  # the folder appears only when complete
    return output_dir
