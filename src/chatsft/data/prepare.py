"""Raw dataset → rows the collator takes: tokenize (counted), then optionally pack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from ..errors import ChatSFTError
from .packing import pack_dataset
from .tokenize import PrepOptions, PrepStats, prepare_dataset


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
