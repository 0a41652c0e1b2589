"""Checkpoints that can be trusted: saved into a staging folder and renamed once complete, found in
order, checked before a resume (complete, readable, trained by the same run), and a save that fails
names the folder and the space it needed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from transformers.trainer_utils import rotate_checkpoints

from ..errors import ChatSFTError
from ..files import safetensors_problem

RUN_FILE = "chatsft_run.json"  # the settings of the run that wrote a checkpoint
STAGING_DIR = ".checkpoint-in-progress"  # checkpoint-N is written in here, then moved out
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# Settings that decide what a run trains: a resume with others would continue a different run.
# (max_steps, epochs, saving, logging and evaluation may change between a run and its resume.)
SAME_RUN_KEYS = (
    "model_name_or_path",
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "max_length",
    "packing",
    "packing_strategy",
    "assistant_only_loss",
    "completion_only_loss",
    "last_turn_only",
    "prompt_template",
    "chat_template_path",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "seed",
)


def checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit():
            steps.append(int(step))
    return [os.path.join(output_dir, f"checkpoint-{n}") for n in sorted(steps)]


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The highest checkpoint-N whose save finished: the Trainer writes trainer_state.json last,
    after the weights, optimizer and RNG state, so a folder without it was cut short."""
    for folder in reversed(checkpoints(output_dir)):
        weights = any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES)
        if weights and os.path.exists(os.path.join(folder, "trainer_state.json")):
            return folder
    return None


def newest_to_resume(output_dir: str) -> str:
    """`resume_from_checkpoint=True`: the newest complete checkpoint (transformers would take the
    highest-numbered folder even if a crash cut it short)."""
    folder = newest_complete_checkpoint(output_dir)
    if folder is None:
        raise ChatSFTError("no complete checkpoint to resume from", source=output_dir)
    return folder


def unsafe_checkpoint(err: BaseException, folder: str) -> ChatSFTError:
    """For a checkpoint file that torch.load(weights_only=True) refused to unpickle."""
    return ChatSFTError(
        "refused to load a checkpoint file that holds objects other than tensors and numbers "
        f"(unsafe to unpickle): {str(err).splitlines()[0][:200]}",
        source=folder,
        hint="resume only from checkpoints you trust, or train without --resume",
    )


def _torch_file_problem(path: str, safe_load: bool) -> str | None:
    """A torch file (a zip archive) that is cut short; with `safe_load`, one that does not load as
    plain tensors and numbers (optimizer.pt must; rng_state.pth holds numpy's RNG objects)."""
    import pickle
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"its member {bad} is damaged"
    except (zipfile.BadZipFile, OSError):
        return "it is not a complete torch archive (truncated?)"
    if not safe_load:
        return None
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "it holds objects that are not plain tensors and numbers (refused: unsafe to load)"
    except (RuntimeError, EOFError, OSError) as err:
        return f"it does not load ({str(err).splitlines()[0][:120]})"
    return None


def check_checkpoint(folder: str) -> str | None:
    """Why this folder cannot be resumed from, or None."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.exists(state):
        return "no trainer_state.json: it is not a checkpoint, or its save was cut short"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is damaged (not JSON)"
    weights = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))]
    if not weights:
        return "it holds no weights (model.safetensors or adapter_model.safetensors)"
    for name in weights:
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, name))
            if problem:
                return f"{name}: {problem}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            problem = _torch_file_problem(path, safe_load=name == "optimizer.pt")
            if problem:
                return f"{name}: {problem}"
    return None


def write_run_file(folder: str, record: dict[str, Any] | None) -> None:
    if record is None:
        return
    from .model_card import plain

    with open(os.path.join(folder, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump(plain(record), f, indent=1, sort_keys=True)


def same_run(folder: str, record: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint that another run's settings trained; name what differs."""
    from .model_card import plain

    path = os.path.join(folder, RUN_FILE)
    if not os.path.exists(path):
        return  # written by the Python API or an older chatsft: nothing to compare
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    now = plain(record)
    differ = [k for k in SAME_RUN_KEYS if saved.get(k) != now.get(k)]
    if differ:

        def shown(value: Any) -> str:  # a setting left out of a run record was its default
            return "the default" if value is None else repr(value)

        what = ", ".join(
            f"{k}: {shown(saved.get(k))} then, {shown(now.get(k))} now" for k in differ
        )
        raise ChatSFTError(
            f"this checkpoint was trained with other settings ({what})",
            source=folder,
            field="resume",
            hint="resume with the same settings, or train into a new output_dir",
        )


def _nbytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_failed(err: BaseException, folder: str, what: str, model: Any) -> ChatSFTError:
    """One line for a save that failed; for a full disk, the space it needed."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    if not full:
        return ChatSFTError(f"saving {what} failed ({err})", source=folder)
    need = _nbytes(model)
    size = f"{need / 2**30:,.1f} GiB" if need >= 2**30 else f"{need / 2**20:,.1f} MiB"
    return ChatSFTError(
        f"no space left on the device while saving {what} (about {size} of weights, plus about "
        "twice that for AdamW's state in a checkpoint)",
        source=folder,
        hint="free disk space, then continue with --resume (the last complete checkpoint is "
        "intact)",
    )


def staging_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STAGING_DIR)


def stage(
    save: Callable[[], None],
    run_dir: str,
    name: str,
    record: dict[str, Any] | None,
    model: Any,
    should_save: bool,
) -> None:
    """Run `save`, which writes checkpoint `name` under `staging_dir(run_dir)`, and add the run
    file. A failed save leaves no staging folder behind and says what it needed (save_failed)."""
    staging = staging_dir(run_dir)
    try:
        save()
        if should_save:
            write_run_file(os.path.join(staging, name), record)
    except (OSError, RuntimeError) as err:  # a full disk: safetensors raises its own error
        shutil.rmtree(staging, ignore_errors=True)
        raise save_failed(err, os.path.join(run_dir, name), name, model) from None


def publish(run_dir: str, name: str, best: str | None, save_total_limit: int | None) -> str | None:
    """Move the staged checkpoint `name` into `run_dir` (every rank has finished writing it), then
    rotate by save_total_limit. Returns `best` (the best model's checkpoint) moved along."""
    staging = staging_dir(run_dir)
    final = os.path.join(run_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)  # a stale folder from an earlier run at the same step
    os.replace(os.path.join(staging, name), final)
    shutil.rmtree(staging, ignore_errors=True)
    if best and best.startswith(staging):
        best = os.path.join(run_dir, os.path.basename(best))
    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=best,
        use_mtime=True,
    )
    return best
