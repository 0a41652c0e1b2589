"""Batches for the model.

labels: [batch, seq] int64, the prepared rows' labels (the token id where trained, IGNORE_INDEX
elsewhere), *unshifted* (Hugging Face convention: the loss compares position t's prediction with
labels[t + 1]). Here, and only here, the first token of every document becomes IGNORE_INDEX: nothing
in the document predicts it, and in a padding-free row it would otherwise be "predicted" by the
previous document's last token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ChatSFTError

IGNORE_INDEX = -100


def _concat(lists: Iterable[Any], dtype: type = np.int64) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype)


def _doc_lengths(example: dict[str, Any]) -> list[int]:
    return list(example.get("seq_lengths") or [len(example["input_ids"])])


def labels_of(example: dict[str, Any]) -> list[int]:
    """A row's labels; a row without them trains every token (as TRL's collator does)."""
    labels = example.get("labels")
    return example["input_ids"] if labels is None else labels


def _check_lengths(example: dict[str, Any], index: int) -> None:
    """One label per token and seq_lengths that add up to the row: the vectorised collation would
    otherwise shift labels across examples silently."""
    n = len(example["input_ids"])
    for name, size in (
        ("labels", len(labels_of(example))),
        ("seq_lengths", sum(_doc_lengths(example))),
    ):
        if size != n:
            raise ChatSFTError(
                f"example {index} of the batch has {n} input_ids but {name} covers {size}",
                field=name,
                hint="prepare the data with chatsft (one label per token, seq_lengths summing to "
                "the row length) or pass your own data_collator",
            )


@dataclass
class PaddedCollator:
    """Right-padded rows, one document each (packed rows are not allowed here: use padding-free)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if any(len(_doc_lengths(e)) > 1 for e in examples):
            raise ValueError("packed rows need PaddingFreeCollator: padding would mix documents")
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            _check_lengths(e, i)
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(labels_of(e))
            labels[i, 0] = IGNORE_INDEX
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PaddingFreeCollator:
    """All documents of the batch in one row [1, total]: no pad token is ever computed.

    position_ids restart at 0 for every document; the attention (chatsft's document attention, or
    transformers' flash-attn path) derives document boundaries from them, so documents never attend
    to each other. Boundaries are not sent as a separate tensor: accelerate slices every tensor of
    an iterable dataset's batch along dim 0, which would cut a [num_docs + 1] tensor to one entry.

    With `pad_to_multiple_of`, the row ends with one filler document of pad tokens that trains
    nothing and attends only to itself (for kernels that want aligned lengths).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    filler_tokens: int = 0  # filler appended to the most recent batch (for logs and benchmarks)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # numpy over the concatenated lists: this runs in the training loop's process once per step
        # (about 4x faster than building Python lists and calling torch.tensor on them).
        for i, e in enumerate(examples):
            _check_lengths(e, i)
        ids = _concat(e["input_ids"] for e in examples)
        labels = _concat(labels_of(e) for e in examples)
        lengths = np.array([n for e in examples for n in _doc_lengths(e)], dtype=np.int64)
        self.filler_tokens = self._padded_length(len(ids)) - len(ids)
        if self.filler_tokens:
            ids = np.concatenate([ids, np.full(self.filler_tokens, self.pad_token_id, np.int64)])
            labels = np.concatenate([labels, np.full(self.filler_tokens, IGNORE_INDEX, np.int64)])
            lengths = np.append(lengths, self.filler_tokens)
        starts = np.cumsum(lengths) - lengths
        labels[starts] = IGNORE_INDEX  # nothing in the row predicts a document's first token
        positions = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(positions)[None],
        }

    def _padded_length(self, n: int) -> int:
        if self.pad_to_multiple_of:
            return -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return n
