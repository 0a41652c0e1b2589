"""A training run from YAML plus command-line overrides: where the data and model come from, and an
SFTConfig. Unknown keys are errors with a did-you-mean, never silently ignored."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any

import yaml

from .config import SFTConfig
from .errors import ChatSFTError


@dataclass
class RunConfig:
    model: str
    dataset: str
    sft: SFTConfig
    dataset_split: str = "train"
    eval_dataset: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = None
    streaming: bool = False
    resume: bool | str = False  # True: the newest checkpoint in output_dir; or a checkpoint path
    # LoRA (TRL's ModelConfig names)
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str | None = "all-linear"
    lora_modules_to_save: list[str] | None = None
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base weights (bitsandbytes, CUDA only)


RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)} - {"sft"}
SFT_FIELDS = {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}
SFT_KEYS = set(SFT_FIELDS)


def _coerce_numbers(values: dict[str, Any]) -> None:
    """YAML 1.1 reads `1e-4` (no dot) as a string and `no` as False; give fields their type."""
    for key, value in values.items():
        f = SFT_FIELDS.get(key)
        if f is None:
            continue
        kind = str(f.type)
        if value is False and "bool" not in kind:
            values[key] = "no"  # `save_strategy: no` in YAML 1.1 is False
            continue
        if not isinstance(value, str):
            continue
        try:
            if "float" in kind:
                values[key] = float(value)
            elif kind.startswith("int"):
                values[key] = int(value)
        except ValueError:
            pass  # SFTConfig reports the bad value with its field name


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` or a bare `--flag` (true). Values are read as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ChatSFTError(
                f"unexpected argument {tok!r}", hint="overrides look like --learning_rate 1e-4"
            )
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value  # e.g. a prompt template with braces: plain text
        if isinstance(parsed, bool) and value.lower() not in ("true", "false"):
            parsed = value  # YAML 1.1 reads `no`/`on` as booleans; `--save_strategy no` is text
        if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")):
            parsed = value  # "question: {query} answer: " is text, not a mapping
        out[key.replace("-", "_")] = parsed
        i += 1
    return out


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = RUN_KEYS | SFT_KEYS
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ChatSFTError(
                "unknown setting",
                source=source,
                field=key,
                hint=f"did you mean '{close[0]}'?" if close else "see `chatsft train --help`",
            )


def read_config_file(path: str) -> dict[str, Any]:
    """A run's YAML as a dict of known keys (unknown keys are errors with a did-you-mean)."""
    if not os.path.exists(path):
        raise ChatSFTError("config file not found", source=path)
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ChatSFTError(f"invalid YAML: {err}", source=path) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ChatSFTError("expected a mapping of settings at the top level", source=path)
    values = dict(loaded or {})
    _check_keys(values, path)
    return values


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    values = read_config_file(path) if path is not None else {}
    cli = parse_overrides(overrides or [])
    _check_keys(cli, "command line")
    values.update(cli)
    for key in ("model", "dataset"):
        if not values.get(key):
            raise ChatSFTError(
                "is required", source=path or "command line", field=key, hint=f"add {key}: ..."
            )
    run = {k: values.pop(k) for k in list(values) if k in RUN_KEYS}
    _coerce_numbers(values)
    try:
        sft = SFTConfig(**values)
    except (TypeError, ValueError) as err:
        raise ChatSFTError(
            f"invalid training setting: {err}", source=path or "command line"
        ) from None
    return RunConfig(sft=sft, **run)


def quantization_kwargs(run: RunConfig) -> dict[str, Any]:
    """model_init_kwargs for QLoRA, or {} — with clear errors where it cannot run."""
    if not run.load_in_4bit:
        return {}
    import importlib.util

    import torch

    if not run.use_peft:
        raise ChatSFTError(
            "4-bit weights cannot be trained directly",
            field="load_in_4bit",
            hint="add use_peft: true",
        )
    if not torch.cuda.is_available():
        raise ChatSFTError(
            "QLoRA (load_in_4bit) needs a CUDA GPU; bitsandbytes' 4-bit kernels do not run on CPU",
            field="load_in_4bit",
            hint="use plain LoRA (use_peft without load_in_4bit) on this machine",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ChatSFTError(
            "bitsandbytes is not installed",
            field="load_in_4bit",
            hint="pip install 'chatsft[qlora]'",
        )
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }


def peft_config_of(run: RunConfig) -> Any:
    if not run.use_peft:
        return None
    from .model.peft_setup import lora_config

    return lora_config(
        run.lora_r,
        run.lora_alpha,
        run.lora_dropout,
        run.lora_target_modules,
        run.lora_modules_to_save,
    )
