"""Load training data: local JSON/JSONL/CSV/Parquet files or folders, or hub dataset ids."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

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


def _split_names(split: str) -> list[str]:
    """The split names in a datasets split string: `train`, `train[:100]`, `train+validation`."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _folder_splits(folder: Path) -> dict[str, list[Path]]:
    """Assign a folder's data files to splits by their names, with datasets' own rules (what
    `datasets.load_dataset(folder)` does): train/training, test/testing/eval/evaluation,
    validation/valid/dev/val in a file or sub-folder name. A folder with no such names is all
    "train"; files beside split-named ones that match no split are left out, as datasets does."""
    try:
        patterns = get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except (EmptyDatasetError, FileNotFoundError):  # an empty folder, or only hidden files
        return {}
    splits = {
        str(name): sorted(Path(f) for f in files if Path(f).suffix in BUILDERS)
        for name, files in resolved.items()
    }
    return {name: files for name, files in splits.items() if files}


def _local_files(path: Path, split: str) -> tuple[str, dict[str, list[str]]]:
    """The builder name and {split: files} for the splits named in `split`, each file checked."""
    names = _split_names(split)
    if path.is_file():
        # A single file is the train split, as datasets names it; reusing it for any other split
        # would silently evaluate on the training rows.
        splits = {"train": [path]}
    else:
        splits = _folder_splits(path)
        if not splits:
            raise ChatSFTError(
                "no .jsonl, .json, .csv or .parquet files found", source=str(path), field="dataset"
            )
    missing = [name for name in names if name not in splits]
    if missing and path.is_file():
        raise ChatSFTError(
            f"a single file is the 'train' split, so it has no {missing[0]!r} split",
            source=str(path),
            hint="give the other split as eval_dataset, or use eval_fraction",
        )
    if missing:
        raise ChatSFTError(
            f"no {missing[0]!r} split; splits found: {', '.join(sorted(splits))}",
            source=str(path),
            hint="files go to splits by name (train*, test*/eval*, validation*/valid*/dev*); "
            "set dataset_split / eval_split to a split found",
        )
    files = [p for name in dict.fromkeys(names) for p in splits[name]]
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
    return kinds.pop(), {name: [str(p) for p in splits[name]] for name in dict.fromkeys(names)}


def load_data(
    spec: str, split: str = "train", streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """A local file or folder, or a hub dataset id (`name` or `name:config`). With `streaming`,
    rows are read lazily (train with max_steps; chatsft packs them as they arrive). A folder's
    files are split by their names as datasets does; a single file is the train split."""
    path = Path(os.path.expanduser(spec))
    if path.exists():
        builder, files = _local_files(path, split)
        try:
            # Only the requested splits' files: the others are neither read nor converted.
            return datasets.load_dataset(
                builder, data_files=files, split=split, streaming=streaming
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


def dataset_spec(name: str, config: str | None) -> str:
    """load_data's spec for a dataset and its hub configuration ('name:config')."""
    return f"{name}:{config}" if config else name


Loader = Callable[[str, str, bool], Any]  # (spec, split, streaming) -> dataset


def train_and_eval(
    spec: str,
    *,
    train_split: str = "train",
    test_split: str = "test",
    streaming: bool = False,
    eval_dataset: str | None = None,
    eval_fraction: float | None = None,
    evaluate: bool = False,
    seed: int = 42,
    load: Loader | None = None,
) -> tuple[Any, Any | None]:
    """The train set and the eval set (None if the run does not evaluate), as `chatsft train`
    and `chatsft inspect` both choose them: a separate eval_dataset (its train split), else a
    held-out eval_fraction, else the test split when `evaluate` (eval_split named, or an
    eval_strategy that evaluates, as `trl sft` does). `load` replaces load_data (inspect reads
    only the first rows)."""
    load = load or (lambda s, split, stream: load_data(s, split, streaming=stream))
    train = load(spec, train_split, streaming)
    if eval_dataset:
        return train, load(eval_dataset, "train", False)
    if eval_fraction:
        if streaming:
            raise ChatSFTError(
                "eval_fraction cannot split a stream", field="eval_fraction", hint="use eval_split"
            )
        return split_eval(train, eval_fraction, seed)
    if evaluate:
        return train, load(spec, test_split, False)
    return train, None
