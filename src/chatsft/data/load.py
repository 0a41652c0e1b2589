"""Load training data: local JSON/JSONL/CSV/Parquet files or folders, or hub dataset ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from ..errors import ChatSFTError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_jsonl(path: Path) -> None:
    """datasets' JSON reader reports a broken line as a pyarrow error with no line number."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ChatSFTError(
                        f"malformed JSON ({err.msg} at column {err.colno})",
                        source=str(path),
                        row=lineno,
                        hint="each line must be one JSON object",
                    ) from None
                if not isinstance(value, dict):
                    raise ChatSFTError(
                        f"expected a JSON object, got {type(value).__name__}",
                        source=str(path),
                        row=lineno,
                    )
    except UnicodeDecodeError as err:
        raise ChatSFTError(
            f"not UTF-8 text ({err.reason} at byte {err.start})",
            source=str(path),
            hint="re-encode the file as UTF-8",
        ) from None


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in BUILDERS)
    if not files:
        raise ChatSFTError(
            "no .jsonl, .json, .csv or .parquet files found", source=str(path), field="dataset"
        )
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ChatSFTError(
            f"cannot load files of type {sorted(p.suffix for p in files)}",
            source=str(path),
            field="dataset",
            hint="use .jsonl, .json, .csv or .parquet files, all of one type",
        )
    for p in files:
        if p.stat().st_size == 0:
            raise ChatSFTError("file is empty", source=str(p), field="dataset")
        if p.suffix == ".jsonl":
            _check_jsonl(p)
    return kinds.pop(), [str(p) for p in files]


def load_data(
    spec: str, split: str = "train", streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """A local file or folder, or a hub dataset id (`name` or `name:config`). With `streaming`,
    rows are read lazily (train with max_steps; chatsft packs them as they arrive)."""
    path = Path(os.path.expanduser(spec))
    if path.exists():
        builder, files = _local_files(path)
        try:
            return datasets.load_dataset(
                builder, data_files=files, split="train", streaming=streaming
            )
        except Exception as err:  # pyarrow schema errors and friends
            raise ChatSFTError(
                f"could not read the data: {err}", source=str(path), field="dataset"
            ) from err
    if spec.startswith((".", "/", "~")) or path.suffix in BUILDERS:
        raise ChatSFTError("file or folder not found", source=spec, field="dataset")
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown id, missing split
        raise ChatSFTError(
            f"could not load it as a local path or hub dataset ({type(err).__name__}: {err})",
            source=spec,
            field="dataset",
            hint="check the path, or the hub id and your network",
        ) from None


def split_eval(
    dataset: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if not 0 < eval_fraction < 1:
        raise ChatSFTError(
            f"eval_fraction must be between 0 and 1, got {eval_fraction}", field="eval_fraction"
        )
    parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]
