"""An output folder belongs to one run: it is not the model being trained from, it holds no other
run's results unless told to replace them, two live runs never write it at once, and a final save
that did not finish never looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from typing import Any

from ..errors import ChatSFTError

LOCK_FILE = ".chatsft.lock"
# Written last by a finished run: a folder with weights but without it was cut short.
COMPLETE_FILE = "training_config.yaml"
# Files a run writes into output_dir (transformers, peft, chatsft): what --overwrite_output_dir
# replaces. Anything else in the folder is the user's and is left alone.
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "config.json",
    "generation_config.json",
    "training_args.bin",
    "trainer_state.json",
    "training_config.yaml",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "report.html",
    "loss.png",
    "learning_rate.png",
    "tokens_per_second.png",
    "trained_tokens.png",
    "generations.jsonl",
)
RUN_PREFIXES = ("checkpoint-", "model-0", ".checkpoint-in-progress", ".saving")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def run_files(folder: str) -> list[str]:
    """Names in `folder` that a training run wrote."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        name for name in os.listdir(folder) if name in RUN_FILES or name.startswith(RUN_PREFIXES)
    )


def same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def claim(output_dir: str, model: str | None, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output_dir that would destroy something, before anything is loaded."""
    if model and os.path.isdir(os.path.expanduser(model)) and same_folder(output_dir, model):
        raise ChatSFTError(
            "output_dir is the model folder being trained from: saving would overwrite its weights",
            source=output_dir,
            field="output_dir",
            hint="pick a new output_dir",
        )
    found = run_files(output_dir)
    if not found or resume:
        return
    if not overwrite:
        finished = os.path.exists(os.path.join(output_dir, COMPLETE_FILE))
        what = "a finished run" if finished else "an unfinished run"
        raise ChatSFTError(
            f"output_dir holds {what} ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''})",
            source=output_dir,
            field="output_dir",
            hint="pick a new output_dir, continue it with --resume, or replace it with "
            "--overwrite_output_dir",
        )
    for name in found:  # stale adapters or weights of the earlier run must not be loaded later
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock file in output_dir for the life of a run (main process only). A lock
    left by a process that no longer runs on this host is taken over."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False

    def __enter__(self) -> OutputLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    os.remove(self.path)  # stale: its process is gone
                    continue
                raise ChatSFTError(
                    f"another run (pid {owner.get('pid')} on {owner.get('host')}) is writing "
                    "this output_dir",
                    source=os.path.dirname(self.path),
                    field="output_dir",
                    hint=f"wait for it, pick another output_dir, or delete {LOCK_FILE} if that "
                    "run is gone",
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ChatSFTError("could not take the output_dir lock", source=self.path)

    def _owner(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
