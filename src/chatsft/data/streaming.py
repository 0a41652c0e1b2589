"""Streaming preparation: tokenize rows as they arrive and pack them with the same isolation.

`ConstantLengthDataset` is for datasets too large to prepare up front (a `datasets.IterableDataset`
from `streaming=True`, or any iterable of rows). It reads `buffer_size` rows, tokenizes them in one
batch, packs them best-fit-decreasing into rows of `max_length` tokens with `seq_lengths`, and
yields those rows; `stats` counts what it read, kept and dropped so far.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..errors import ChatSFTError
from .encode import PrepOptions
from .load import QUIET_READ_FAILURES, read_error
from .packing import pack_rows
from .prepare import PrepStats, prepare_batch, row_format


class ConstantLengthDataset(torch.utils.data.IterableDataset):
    """Packed rows of at most `max_length` tokens from a stream of raw rows.

    With `packing=False` it yields one tokenized example per row instead (still streaming). Errors
    name the row (counted from 1) and `source`, by default the stream's data file.
    """

    def __init__(
        self,
        rows: Iterable[dict[str, Any]],
        tokenizer: Any,
        opts: PrepOptions,
        *,
        packing: bool = True,
        buffer_size: int = 1024,
        formatting_func: Callable | None = None,
        packing_strategy: str = "bfd",
        source: str | None = None,
    ) -> None:
        if packing and opts.max_length is None:
            raise ValueError("packing needs max_length")
        self.rows, self.tokenizer, self.opts = rows, tokenizer, opts
        self.packing, self.buffer_size = packing, buffer_size
        self.formatting_func = formatting_func
        self.packing_strategy = packing_strategy
        # Errors name the file: the one given, else the data files of a datasets stream.
        self._files = data_files(rows)
        self.source = source or stream_source(rows, self._files)
        self.stats = PrepStats()

    def _prepared(self, chunk: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
        """The chunk's encoded rows, counted in self.stats; `first_index`: the 0-based position of
        chunk[0] in the stream (errors count rows from 1)."""
        keys = sorted({k for r in chunk for k in r})
        batch = {k: [r.get(k) for r in chunk] for k in keys}
        try:
            fmt = row_format(
                keys, lambda: chunk[0], self.opts, self.formatting_func, first_index + 1
            )
            out = prepare_batch(
                batch,
                list(range(first_index, first_index + len(chunk))),
                tokenizer=self.tokenizer,
                opts=self.opts,
                fmt=fmt,
                formatting_func=self.formatting_func,
                source=self.source,
            )
        except ChatSFTError as err:
            raise (err.with_source(self.source) if self.source else err) from None
        keep = self.stats.add(out)
        return [{"input_ids": out["input_ids"][i], "labels": out["labels"][i]} for i in keep]

    def _packed(self, docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        assert self.opts.max_length is not None
        rows = pack_rows(
            [d["input_ids"] for d in docs],
            [d["labels"] for d in docs],
            self.opts.max_length,
            self.packing_strategy,
        )
        for ids, labels, lengths in zip(rows["input_ids"], rows["labels"], rows["seq_lengths"]):
            yield {"input_ids": ids, "labels": labels, "seq_lengths": lengths}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        index = 0  # of chunk[0] in the stream; errors count rows from 1
        for row in self._read():
            chunk.append(row)
            if len(chunk) == self.buffer_size:
                yield from self._emit(chunk, index)
                index += len(chunk)
                chunk = []
        if chunk:
            yield from self._emit(chunk, index)

    def _read(self) -> Iterator[dict[str, Any]]:
        """The rows; a data file that cannot be read (datasets reads them only now, as the stream
        is consumed) fails in one line naming the file and row, as load_data does up front."""
        rows = iter(self.rows)
        while True:
            QUIET_READ_FAILURES.active += 1  # datasets' own log line of the failure
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as err:
                if not self._files:
                    raise
                raise read_error(err, self._files, self.source) from err
            finally:
                QUIET_READ_FAILURES.active -= 1
            yield row

    def _emit(self, chunk: list[dict[str, Any]], index: int) -> Iterator[dict[str, Any]]:
        docs = self._prepared(chunk, index)
        yield from self._packed(docs) if self.packing else docs


def data_files(rows: Any) -> list[str]:
    """The local or remote files a `datasets.IterableDataset` reads, in order; [] for other
    iterables. Read from datasets' iterable chain (renamed columns, shuffles and maps wrap it)."""
    ex_iterable = getattr(rows, "_ex_iterable", None)
    for _ in range(32):  # a chain of wrappers, never a cycle; bounded all the same
        if ex_iterable is None:
            return []
        kwargs = getattr(ex_iterable, "kwargs", None)
        if isinstance(kwargs, dict):
            files = kwargs.get("original_files") or kwargs.get("base_files")
            if isinstance(files, list) and all(isinstance(f, str) for f in files):
                return files
        ex_iterable = getattr(ex_iterable, "ex_iterable", None)
    return []


def stream_source(rows: Any, files: list[str] | None = None) -> str | None:
    """What errors name as the source of a stream's rows: its file, or the folder of its files
    (row numbers then count across them, in order, as for map-style data); None if unknown. A
    shuffled stream's row numbers count in shuffled order, and the source says so."""
    files = data_files(rows) if files is None else files
    if not files:
        return None
    source = files[0]
    if len(files) > 1:  # their common folder (or URL prefix: hf://datasets/...)
        common = os.path.commonprefix(files)
        source = common[: common.rfind("/")] or source
    if _is_shuffled(rows):
        source += " (rows counted in shuffled order)"
    return source


def _is_shuffled(rows: Any) -> bool:
    ex_iterable = getattr(rows, "_ex_iterable", None)
    for _ in range(32):
        if ex_iterable is None:
            return False
        if "Shuffled" in type(ex_iterable).__name__:
            return True
        ex_iterable = getattr(ex_iterable, "ex_iterable", None)
    return False
