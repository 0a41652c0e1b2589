"""What a saved model folder says about itself: training_config.yaml (everything needed to re-run,
no secret) and a model card (README.md) in the Hugging Face format."""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

CONFIG_FILE = "training_config.yaml"  # `chatsft train` reads it back to re-run the training
# Tags written to the model card. "sft" is what TRL-based tooling and hub filters look for; a model
# trained by chatsft does not claim TRL's own "trl" tag.
MODEL_TAGS = ["chatsft", "sft"]
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key")
NOT_SECRET = ("eos_token", "pad_token")
# Fields TrainingArguments fills in from others; writing them back would pin machine-specific values.
DERIVED = ("logging_dir",)


def is_secret(name: str) -> bool:
    return name.endswith(SECRET_SUFFIXES) and name not in NOT_SECRET


def plain(value: Any) -> Any:
    """A value YAML and JSON can hold: enums by value, other objects as text."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def setting_changes(args: Any) -> list[tuple[str, Any, Any]]:
    """(field, value, declared default) for each dataclass field of `args` whose value differs,
    secrets and derived fields left out. Compared with the declared defaults, not with a fresh
    instance: building TrainingArguments inside a run resets accelerate's shared state."""
    out = []
    for f in dataclasses.fields(args):
        if not f.init or is_secret(f.name) or f.name in DERIVED:
            continue
        value, default = plain(getattr(args, f.name)), plain(_default(f))
        if f.name == "run_name" and value == plain(getattr(args, "output_dir", None)):
            continue  # TrainingArguments names the run after its folder
        if value != default and not _normalised(f.name, value, default):
            out.append((f.name, value, None if default is dataclasses.MISSING else default))
    return out


def _normalised(name: str, value: Any, default: Any) -> bool:
    """TrainingArguments turns some defaults into another form (None → False, "none" → [], None →
    a default AcceleratorConfig): the same setting, not a change."""
    if default in (None, "none", "") and value in (False, [], None, ""):
        return True
    if name == "accelerator_config" and default is None:
        from transformers.trainer_pt_utils import AcceleratorConfig

        return value == plain(AcceleratorConfig())
    return False


def non_default_settings(args: Any) -> dict[str, Any]:
    """The dataclass fields of `args` that differ from their declared defaults, without secrets."""
    return {name: value for name, value, _ in setting_changes(args)}


def mask_policy(args: Any) -> str:
    """Which tokens the loss trained, in words."""
    if args.last_turn_only:
        return "the last assistant turn of each conversation (with its end-of-turn token)"
    if args.assistant_only_loss:
        return "assistant turns only (with their end-of-turn tokens)"
    if args.completion_only_loss is False:
        return "every token (prompts included)"
    return "completions of prompt/completion rows; every token of text and chat rows"


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key in ("train_loss", "eval_loss", "loss", "mean_token_accuracy", "num_trained_tokens"):
            if key in entry:
                metrics[key] = entry[key]
    return metrics


def model_card(
    *,
    base_model: str | None,
    dataset: str | None,
    command: str | None,
    metrics: dict[str, float],
    policy: str,
    peft: dict[str, Any] | None,
    tags: list[str],
    settings: dict[str, Any],
) -> str:
    """README.md text: metadata the hub reads (base model, dataset, tags), then what was trained."""
    import yaml
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model if base_model else None,
        datasets=[dataset] if dataset else None,
        library_name="peft" if peft else "transformers",
        tags=tags,
        pipeline_tag="text-generation",
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {'LoRA adapter' if peft else 'Fine-tuned model'} trained with chatsft",
        "",
        f"- **Base model**: {base_model or 'unknown'}",
        f"- **Dataset**: {dataset or 'not recorded (trained from Python)'}",
        f"- **Trained tokens**: {policy}",
    ]
    if peft:
        lines.append(
            "- **LoRA**: " + ", ".join(f"{k} {v}" for k, v in peft.items() if v is not None)
        )
    if command:
        lines += ["", "## How it was trained", "", "```bash", command, "```"]
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    settings = {k: v for k, v in settings.items() if k != "output_dir"}  # a local path
    if settings:
        text = yaml.safe_dump(settings, sort_keys=True).rstrip()
        lines += ["", "## Settings (differing from the defaults)", "", "```yaml", text, "```"]
    return "\n".join(lines) + "\n"


def lora_summary(model: Any) -> dict[str, Any] | None:
    config = (getattr(model, "peft_config", None) or {}).get("default")
    if config is None:
        return None
    targets = getattr(config, "target_modules", None)  # prompt tuning has none
    return {
        "type": str(getattr(config, "peft_type", "LORA")).split(".")[-1],
        "r": getattr(config, "r", None),
        "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
    }


def write_run_files(
    output_dir: str,
    args: Any,
    *,
    record: dict[str, Any] | None,
    model: Any,
    model_name: str | None,
    command: str | None,
    log_history: list[dict[str, Any]],
) -> None:
    """training_config.yaml (the CLI's run record, or else the settings that differ from the
    defaults) and the model card README.md (replacing peft's blank template in adapter folders)."""
    import yaml

    settings = non_default_settings(args)
    record = record or {"model_name_or_path": model_name, **settings}
    with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        yaml.safe_dump(plain(record), f, sort_keys=False)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    card = model_card(
        base_model=model_name,
        dataset=record.get("dataset_name"),
        command=command,
        metrics=final_metrics(log_history),
        policy=mask_policy(args),
        peft=lora_summary(model),
        tags=list(getattr(base, "model_tags", None) or MODEL_TAGS),
        settings=settings,
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
