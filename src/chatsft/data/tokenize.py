"""Tokenize examples into (input_ids, trained_mask), apply the max_length policy, count everything.

Runs as one batched `datasets.map`, so it uses `dataset_num_proc` processes and datasets' on-disk
cache: a second run over the same files with the same settings reuses the result.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

from ..errors import ChatSFTError
from .formats import Text, Tokenized, apply_formatting_func, detect_format, normalize
from .templates import render_segments

OVERLONG_POLICIES = ("truncate", "drop", "split", "error")
DROP_TOO_LONG = "longer than max_length"
# Per-row columns the map adds for counting; removed before the dataset is returned.
BOOKKEEPING = ("_status", "_row", "_tokens", "_trained")
DROP_NO_TRAINED = "no trained token left"


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


@dataclass(frozen=True)
class PrepOptions:
    """Everything that decides the tokenized output (and so datasets' cache fingerprint)."""

    eos_token: str
    dataset_text_field: str = "text"
    dataset_format: str | None = None
    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None
    last_turn_only: bool = False
    prompt_template: str | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    overlong_policy: str = "truncate"


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer adds in front of plain text (a BOS token, for Llama-style tokenizers)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return list(with_special[: len(with_special) - len(without)]) if without else []


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer, where calling it directly gives exactly what
    `tokenizer(texts, add_special_tokens=False)["input_ids"]` gives; None where it might not."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is TokenizersBackend.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return None
    backend = tokenizer.backend_tokenizer
    # The settings __call__ would reset before encoding.
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != tokenizer.split_special_tokens:
        return None
    return backend


def encode_segments(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added."""
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # Skips building offsets and transformers' per-text BatchEncoding conversion: a quarter of the
    # tokenization time. The ids are the same.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def fit_length(
    ids: list[int], mask: list[bool], max_length: int | None, policy: str, mode: str
) -> tuple[list[tuple[list[int], list[bool]]], str]:
    """Apply the over-long policy. Returns the resulting rows and '', 'truncated', 'split' or a
    drop reason."""
    if max_length is None or len(ids) <= max_length:
        return [(ids, mask)], ""
    if policy == "drop":
        return [], DROP_TOO_LONG
    if policy == "error":
        raise ChatSFTError(
            f"example has {len(ids)} tokens, more than max_length={max_length}",
            field="max_length",
            hint="raise max_length, or set overlong_policy to truncate, split or drop",
        )
    if policy == "split":
        # Consecutive pieces; each piece's first token has no context inside the row, so it is not
        # trained (the collator masks every row's first label).
        return [
            (ids[i : i + max_length], mask[i : i + max_length])
            for i in range(0, len(ids), max_length)
        ], "split"
    if mode == "keep_end":
        return [(ids[-max_length:], mask[-max_length:])], "truncated"
    return [(ids[:max_length], mask[:max_length])], "truncated"


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    opts: PrepOptions,
    fmt: str,
    prefix_ids: list[int],
    formatting_func: Callable | None,
    source: str | None,
) -> dict[str, list]:
    names = list(batch)
    n = len(indices)
    text_field = "text" if formatting_func is not None else opts.dataset_text_field
    all_segments: list[tuple[str, bool]] = []
    owners: list[int] = []
    ids_out: list[list[int]] = []
    mask_out: list[list[bool]] = []
    for j in range(n):
        row = {k: batch[k][j] for k in names}
        if formatting_func is not None:
            row = apply_formatting_func(row, formatting_func, indices[j] + 1)
        example = normalize(
            row,
            fmt,
            row_index=indices[j] + 1,
            source=source,
            dataset_text_field=text_field,
            prompt_template=opts.prompt_template,
        )
        if isinstance(example, Tokenized):
            ids_out.append(example.input_ids)
            mask_out.append(example.trained_mask)
            continue
        segs = render_segments(
            example,
            tokenizer,
            eos_token=opts.eos_token,
            assistant_only_loss=opts.assistant_only_loss,
            completion_only_loss=opts.completion_only_loss,
            last_turn_only=opts.last_turn_only,
        )
        plain = isinstance(example, Text) or isinstance(getattr(example, "prompt", None), str)
        ids_out.append(list(prefix_ids) if plain else [])
        mask_out.append([False] * len(ids_out[-1]))
        all_segments += segs
        owners += [j] * len(segs)
    if all_segments:
        # One tokenizer call for every segment of the batch: the Rust tokenizer parallelises it.
        seg_ids = encode_segments(tokenizer, [t for t, _ in all_segments])
        for (_, trained), owner, ids in zip(all_segments, owners, seg_ids):
            ids_out[owner] += ids
            mask_out[owner] += [trained] * len(ids)
    out: dict[str, list] = {k: [] for k in ("input_ids", "trained_mask", *BOOKKEEPING)}
    for row_index, ids, mask in zip(indices, ids_out, mask_out):
        rows, why = fit_length(
            ids, mask, opts.max_length, opts.overlong_policy, opts.truncation_mode
        )
        # Position 0 is never predicted (nothing comes before it), so it cannot count as trained.
        rows = [(i, m) for i, m in rows if any(m[1:])]
        if not rows:
            why = why if why == DROP_TOO_LONG else DROP_NO_TRAINED
            rows = [([], [])]  # a placeholder row carrying the drop reason, removed below
        for i, m in rows:
            out["input_ids"].append(i)
            out["trained_mask"].append(m)
            out["_status"].append(why)
            out["_row"].append(row_index)
            out["_tokens"].append(len(i))
            out["_trained"].append(sum(m[1:]))
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
    """Tokenize a raw dataset. Returns the kept rows (input_ids, trained_mask) and the counts."""
    if len(dataset) == 0:
        raise ChatSFTError(f"the {name} dataset is empty", source=source)
    if formatting_func is not None:
        # What the function returns (a string or messages) decides the format.
        fmt = _formatting_func_format(dataset, formatting_func)
    else:
        fmt = detect_format(dataset.column_names, opts.dataset_text_field, opts.dataset_format)
    processes = _processes(num_proc, len(dataset))
    with _frozen_heap():
        tokenized = dataset.map(
            _tokenize_batch,
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
                "prefix_ids": special_prefix_ids(tokenizer),
                "formatting_func": formatting_func,
                "source": source,
            },
            desc=f"Tokenizing {name} data",
        )
    # One read of the small columns: tokenized["_status"] is a lazy column that formats one row
    # per item, several times slower than the whole map on short chats.
    book = tokenized.select_columns(list(BOOKKEEPING)).to_dict()
    status = book["_status"]
    # One outcome per source row (a split row yields several output rows).
    outcome: dict[int, str] = {}
    for row_index, why in zip(book["_row"], status):
        outcome.setdefault(row_index, why)
    counts = Counter(outcome.values())
    stats = PrepStats(
        rows_read=len(dataset),
        truncated=counts.pop("truncated", 0),
        split=counts.pop("split", 0),
    )
    counts.pop("", None)
    stats.dropped = dict(counts)
    stats.kept = stats.rows_read - sum(stats.dropped.values())
    keep = [i for i, why in enumerate(status) if why in ("", "truncated", "split")]
    if not keep:
        raise ChatSFTError(
            f"every row of the {name} data was dropped ({stats.summary(name)})",
            source=source,
            hint="check max_length, overlong_policy and the loss-mask options",
        )
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    # Counted inside the (parallel) map: reading the token columns back here would be a Python
    # loop over every token.
    stats.total_tokens = sum(book["_tokens"][i] for i in keep)
    stats.trained_tokens = sum(book["_trained"][i] for i in keep)
    return tokenized.remove_columns(list(BOOKKEEPING)), stats


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


def _formatting_func_format(dataset: datasets.Dataset, formatting_func: Callable) -> str:
    first = apply_formatting_func(dataset[0], formatting_func, 1)
    return "text" if "text" in first else "messages"
