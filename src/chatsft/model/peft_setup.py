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


def merge_adapter(adapter_dir: str, output_dir: str) -> str:
    """Write a standalone model folder: base + adapter merged, with the tokenizer and template."""
    from ..generate import load_for_inference

    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise ChatSFTError(
            "no adapter_config.json here, so this is not a LoRA adapter folder", source=adapter_dir
        )
    if os.path.exists(output_dir):
        raise ChatSFTError("output folder already exists", source=output_dir, hint="pick a new one")
    model, tokenizer = load_for_inference(adapter_dir, device="cpu")
    tmp = output_dir.rstrip("/") + ".partial"
    model.merge_and_unload().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)  # the folder appears only when complete
    return output_dir
