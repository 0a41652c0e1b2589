"""Raw dataset → rows the collator takes: encode every row in one batched datasets.map (counted),
then optionally pack.

The map uses `dataset_num_proc` processes and datasets' on-disk cache: a second run over the same
files with the same settings reuses the result. Streaming (data/streaming.py) encodes its buffers
with the same `prepare_batch` and counts them with the same `PrepStats.add`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

from ..errors import ChatSFTError
from .encode import KEPT, PrepOptions, encode
from .formats import Example, apply_formatting_func, detect_format, normalize
from .packing import pack_dataset
from .tokenize import num_trained

# Per-row columns prepare_batch adds for counting; removed before the dataset is returned.
BOOKKEEPING = ("_status", "_row", "_tokens", "_trained")


@dataclass
class PrepStats:
    """What preparation did; printed as one line so nothing is dropped silently."""

    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    split: int = 0  # examples cut into several rows by overlong_policy="split"
    total_tokens: int = 0
    trained_tokens: int = 0

    def summary(self, name: str = "train") -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "0"
        return (
            f"[chatsft] {name} data: {self.rows_read} rows read, {self.kept} kept, dropped: "
            f"{dropped}; {self.truncated} truncated"
            + (f", {self.split} split" if self.split else "")
            + f"; {self.total_tokens} tokens, {self.trained_tokens} trained"
        )

    def add(self, book: Mapping[str, Sequence[Any]]) -> list[int]:
        """Count a batch's BOOKKEEPING columns (one entry per output row; a dropped example has a
        placeholder row carrying its reason). Returns the positions of the rows to keep."""
        # One outcome per source row (a split example yields several output rows).
        outcome: dict[int, str] = {}
        for row, why in zip(book["_row"], book["_status"]):
            outcome.setdefault(row, why)
        counts = Counter(outcome.values())
        self.rows_read += len(outcome)
        self.truncated += counts.pop("truncated", 0)
        self.split += counts.pop("split", 0)
        counts.pop("", None)
        for why, n in counts.items():
            self.dropped[why] = self.dropped.get(why, 0) + n
        self.kept = self.rows_read - sum(self.dropped.values())
        keep = [i for i, why in enumerate(book["_status"]) if why in KEPT]
        # Counted inside the (parallel) map: reading the token columns back here would be a
        # Python loop over every token.
        self.total_tokens += sum(book["_tokens"][i] for i in keep)
        self.trained_tokens += sum(book["_trained"][i] for i in keep)
        return keep


def row_format(
    columns: Sequence[str],
    first_row: Callable[[], Mapping[str, Any]],
    opts: PrepOptions,
    formatting_func: Callable | None,
    first_index: int = 1,
) -> str:
    """The format of a dataset's rows: from the columns, or, with a formatting_func, from what it
    returns for the first row (a string, or a one-element list of one, is text)."""
    if formatting_func is None:
        return detect_format(columns, opts.dataset_text_field, opts.dataset_format)
    first = apply_formatting_func(first_row(), formatting_func, first_index)
    return "text" if "text" in first else "messages"


def examples_of(
    batch: Mapping[str, list],
    indices: Sequence[int],
    *,
    opts: PrepOptions,
    fmt: str,
    formatting_func: Callable | None,
    source: str | None,
) -> Iterator[Example]:
    """A batch of raw rows (datasets' column layout) as validated Examples, one at a time (a bad
    row fails when reached); `indices` are 0-based."""
    text_field = "text" if formatting_func is not None else opts.dataset_text_field
    names = list(batch)
    columns = [batch[k] for k in names]
    for index, values in zip(indices, zip(*columns)):
        row: Mapping[str, Any] = dict(zip(names, values))
        if formatting_func is not None:
            row = apply_formatting_func(row, formatting_func, index + 1)
        yield normalize(
            row,
            fmt,
            row_index=index + 1,
            source=source,
            dataset_text_field=text_field,
            prompt_template=opts.prompt_template,
        )


def prepare_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    opts: PrepOptions,
    fmt: str,
    formatting_func: Callable | None,
    source: str | None,
    code_version: str = "",  # only part of datasets' cache fingerprint (see data_code_version)
) -> dict[str, list]:
    """Raw rows → encoded rows (input_ids, labels) plus the BOOKKEEPING columns PrepStats.add
    counts. The batched datasets.map function, and streaming's per-buffer step."""
    examples = examples_of(
        batch, indices, opts=opts, fmt=fmt, formatting_func=formatting_func, source=source
    )
    rows = [i + 1 for i in indices]
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", *BOOKKEEPING)}
    for row, encoded in zip(rows, encode(examples, tokenizer, opts, rows=rows, source=source)):
        kept = encoded.rows() or [([], [])]  # a placeholder row carrying the drop reason
        for ids, labels in kept:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_status"].append(encoded.status)
            out["_row"].append(row - 1)
            out["_tokens"].append(len(ids))
            out["_trained"].append(num_trained(labels))
    return out


def prepare_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    opts: PrepOptions,
    *,
    formatting_func: Callable | None = None,
    num_proc: int | None = None,
    source: str | None = None,
    name: str = "train",
) -> tuple[datasets.Dataset, PrepStats]:
    """Encode a raw dataset. Returns the kept rows (input_ids, labels) and the counts."""
    if len(dataset) == 0:
        raise ChatSFTError(f"the {name} dataset is empty", source=source)
    fmt = row_format(dataset.column_names, lambda: dataset[0], opts, formatting_func)
    processes = _processes(num_proc, len(dataset))
    with _frozen_heap():
        encoded = dataset.map(
            prepare_batch,
            batched=True,
            with_indices=True,
            batch_size=500,
            num_proc=processes,
            cache_file_name=_shard_file_name(dataset, processes),
            remove_columns=dataset.column_names,
            fn_kwargs={
                "tokenizer": tokenizer,
                "opts": opts,
                "fmt": fmt,
                "formatting_func": formatting_func,
                "source": source,
                "code_version": data_code_version(),
            },
            desc=f"Tokenizing {name} data",
        )
    # One read of the small columns: encoded["_status"] is a lazy column that formats one row
    # per item, several times slower than the whole map on short chats.
    stats = PrepStats()
    keep = stats.add(encoded.select_columns(list(BOOKKEEPING)).to_dict())
    if not keep:
        raise ChatSFTError(
            f"every row of the {name} data was dropped ({stats.summary(name)})",
            source=source,
            hint="check max_length, overlong_policy and the loss-mask options",
        )
    if len(keep) < len(encoded):
        encoded = encoded.select(keep)
    return encoded.remove_columns(list(BOOKKEEPING)), stats


@functools.cache
def data_code_version() -> str:
    """A hash of the data package's source. datasets fingerprints the map function's own code but
    not what it calls (formats, templates, ...): without this, rows prepared by an older chatsft
    (another column layout, fewer checks) would come back from the cache after an upgrade."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def _shard_file_name(dataset: datasets.Dataset, processes: int | None) -> str | None:
    """Where worker processes write their part of an in-memory dataset: datasets' temporary cache
    directory, deleted at exit. Without a file each part travels back pickled through a manager
    process, 5% of the preparation time. Datasets with files of their own cache beside them."""
    if processes is None or dataset.cache_files:
        return None
    name = f"cache-{generate_random_fingerprint()}.arrow"  # datasets' own name for such files
    return os.path.join(get_temporary_cache_files_directory(), name)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """The garbage collector walks every object that existed before preparation (models, datasets,
    an earlier trainer's leftovers) each time it runs, and in forked map workers it also copies
    every page it touches: preparation was up to twice as slow after a TRL run in the same process.
    Frozen objects are not walked. A caller's own gc.freeze() is left alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


AUTO_PROCESSES_FROM_ROWS = 10_000  # below this, starting worker processes costs more than it saves


def _processes(requested: int | None, rows: int) -> int | None:
    """dataset_num_proc, or by default every core (up to 8) for large datasets."""
    if requested is None:
        requested = min(os.cpu_count() or 1, 8) if rows >= AUTO_PROCESSES_FROM_ROWS else 1
    return requested if requested > 1 and rows >= 2000 else None


def is_packed(dataset: Any) -> bool:
    """Rows already packed (input_ids, labels, seq_lengths): ready for the padding-free collator.
    Other tokenized rows (input_ids with labels or masks, TRL's layout) still go through the
    length policy and the counts."""
    cols = getattr(dataset, "column_names", None) or []
    return {"input_ids", "labels", "seq_lengths"} <= set(cols)


def prepare_for_training(
    dataset: datasets.Dataset,
    tokenizer: Any,
    opts: PrepOptions,
    *,
    packing: bool = False,
    packing_strategy: str = "bfd",
    formatting_func: Callable | None = None,
    num_proc: int | None = None,
    column_map: dict[str, str] | None = None,
    source: str | None = None,
    name: str = "train",
) -> tuple[datasets.Dataset, PrepStats | None]:
    """Returns the dataset ready for a chatsft collator and what preparation did (None if the
    rows were already packed)."""
    if column_map:
        missing = sorted(set(column_map) - set(dataset.column_names))
        if missing:
            raise ChatSFTError(
                f"column_map names columns {missing} that the {name} data does not have "
                f"(it has {sorted(dataset.column_names)})",
                source=source,
                field="column_map",
            )
        dataset = dataset.rename_columns(column_map)
    if is_packed(dataset):
        return dataset, None
    dataset, stats = prepare_dataset(
        dataset,
        tokenizer,
        opts,
        formatting_func=formatting_func,
        num_proc=num_proc,
        source=source,
        name=name,
    )
    if packing:
        assert opts.max_length is not None
        dataset = pack_dataset(dataset, opts.max_length, packing_strategy)
    return dataset, stats
