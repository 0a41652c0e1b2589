"""Streaming preparation: tokenize rows as they arrive and pack them with the same isolation.

`ConstantLengthDataset` is for datasets too large to prepare up front (a `datasets.IterableDataset`
from `streaming=True`, or any iterable of rows). It reads `buffer_size` rows, tokenizes them in one
batch, packs them best-fit-decreasing into rows of `max_length` tokens with `seq_lengths`, and
yields those rows; `stats` counts what it read, kept and dropped so far.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .formats import detect_format
from .packing import pack_rows
from .tokenize import PrepOptions, PrepStats, _tokenize_batch, special_prefix_ids


class ConstantLengthDataset(torch.utils.data.IterableDataset):
    """Packed rows of at most `max_length` tokens from a stream of raw rows.

    With `packing=False` it yields one tokenized example per row instead (still streaming).
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
    ) -> None:
        if packing and opts.max_length is None:
            raise ValueError("packing needs max_length")
        self.rows, self.tokenizer, self.opts = rows, tokenizer, opts
        self.packing, self.buffer_size = packing, buffer_size
        self.formatting_func = formatting_func
        self.packing_strategy = packing_strategy
        self.stats = PrepStats()

    def _prepared(self, chunk: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
        keys = sorted({k for r in chunk for k in r})
        batch = {k: [r.get(k) for r in chunk] for k in keys}
        fmt = "text" if self.formatting_func is not None else None
        if fmt is None:
            fmt = detect_format(keys, self.opts.dataset_text_field, self.opts.dataset_format)
        elif isinstance(self.formatting_func(dict(chunk[0])), list):
            fmt = "messages"
        out = _tokenize_batch(
            batch,
            list(range(first_index, first_index + len(chunk))),
            tokenizer=self.tokenizer,
            opts=self.opts,
            fmt=fmt,
            prefix_ids=special_prefix_ids(self.tokenizer),
            formatting_func=self.formatting_func,
            source=None,
        )
        outcome: dict[int, str] = {}
        kept = []
        for ids, labels, why, row, n_trained in zip(
            out["input_ids"], out["labels"], out["_status"], out["_row"], out["_trained"]
        ):
            outcome.setdefault(row, why)
            if why in ("", "truncated", "split"):
                kept.append({"input_ids": ids, "labels": labels})
                self.stats.trained_tokens += n_trained
        counts = Counter(outcome.values())
        s = self.stats
        s.rows_read += len(chunk)
        s.truncated += counts.pop("truncated", 0)
        s.split += counts.pop("split", 0)
        counts.pop("", None)
        for why, n in counts.items():
            s.dropped[why] = s.dropped.get(why, 0) + n
        s.kept = s.rows_read - sum(s.dropped.values())
        s.total_tokens += sum(len(k["input_ids"]) for k in kept)
        return kept

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
        index = 1
        for row in self.rows:
            chunk.append(row)
            if len(chunk) == self.buffer_size:
                yield from self._emit(chunk, index)
                index += len(chunk)
                chunk = []
        if chunk:
            yield from self._emit(chunk, index)

    def _emit(self, chunk: list[dict[str, Any]], index: int) -> Iterator[dict[str, Any]]:
        docs = self._prepared(chunk, index)
        yield from self._packed(docs) if self.packing else docs
