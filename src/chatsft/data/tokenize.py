"""Tokenize examples into (input_ids, labels), apply the max_length policy, count everything.

The prepared rows have TRL's layout: `input_ids` and `labels` (the token id where it is trained, -100
where not; unshifted), so code written for TRL reads `trainer.train_dataset[i]["labels"]` as before.

Runs as one batched `datasets.map`, so it uses `dataset_num_proc` processes and datasets' on-disk
cache: a second run over the same files with the same settings reuses the result.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import hashlib
import itertools
import operator
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory

from ..errors import ChatSFTError
from .collate import IGNORE_INDEX
from .formats import Text, Tokenized, apply_formatting_func, detect_format, normalize
from .templates import Segment, render_segments

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


def render_with(example: Any, tokenizer: Any, opts: PrepOptions) -> list[Segment]:
    """render_segments with the mask options preparation uses (one place maps them)."""
    return render_segments(
        example,
        tokenizer,
        eos_token=opts.eos_token,
        assistant_only_loss=opts.assistant_only_loss,
        completion_only_loss=opts.completion_only_loss,
        last_turn_only=opts.last_turn_only,
    )


def prep_options_of(sft: Any, eos_token: str) -> PrepOptions:
    """The PrepOptions an SFTConfig asks for. `eos_token` is the tokenizer's after load_tokenizer
    (which applies sft.eos_token), not sft.eos_token, which may be None. One function for the
    trainer and `chatsft inspect`, so inspect shows exactly what training prepares; `sft` is typed
    loosely so this module does not import the config (and through it TrainingArguments)."""
    return PrepOptions(
        eos_token=eos_token,
        dataset_text_field=sft.dataset_text_field,
        dataset_format=sft.dataset_format,
        assistant_only_loss=sft.assistant_only_loss,
        completion_only_loss=sft.completion_only_loss,
        last_turn_only=sft.last_turn_only,
        prompt_template=sft.prompt_template,
        max_length=sft.max_length,
        truncation_mode=sft.truncation_mode,
        overlong_policy=sft.overlong_policy,
    )


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


Span = tuple[int, int]  # [start, end) in characters


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
    """Token ids of each text, without special tokens added, with each token's character span."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _joined(segments: list[Segment]) -> tuple[str, list[Span]]:
    """The segments' text and its trained character spans (adjacent ones merged, empty ones gone)."""
    spans: list[Span] = []
    pos = 0
    for text, trained in segments:
        end = pos + len(text)
        if trained and end > pos:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((pos, end))
        pos = end
    return "".join(t for t, _ in segments), spans


def token_mask(offsets: list[Span], spans: list[Span]) -> list[bool]:
    """Which tokens are trained: those covering at least one trained character.

    A token that straddles a boundary is trained, at either end of a trained span: the model cannot
    produce the trained characters without producing that token (a completion "four" after a
    prompt ending in a space becomes the one token " four", and is trained like the completion's
    first token is when it stands alone). A token with no characters of its own (offsets trimmed
    to nothing) counts as covering the character right after it: whitespace before a reply is
    trained with the reply, whitespace after an end-of-turn token is not. `spans` are sorted and
    disjoint.
    """
    starts = list(map(operator.itemgetter(0), offsets))
    ends = list(map(operator.itemgetter(1), offsets))
    if not (_ascending(starts) and _ascending(ends)):
        return _token_mask_unordered(offsets, spans)
    # Ordered offsets: each span's tokens are one run, found by bisection; no loop over tokens.
    mask = [False] * len(offsets)
    for a, b in spans:
        first = bisect.bisect_right(ends, a)  # the first token ending after a
        while first and starts[first - 1] == ends[first - 1] == a:
            first -= 1  # tokens with no characters, at a: they cover the character at a
        last = bisect.bisect_left(starts, b)  # the first token starting at or after b
        mask[first:last] = [True] * (last - first)
    return mask


def _ascending(values: list[int]) -> bool:
    return all(map(operator.le, values, itertools.islice(values, 1, None)))


def _token_mask_unordered(offsets: list[Span], spans: list[Span]) -> list[bool]:
    """token_mask, one token at a time, for offsets out of order (some normalizers)."""
    starts = [a for a, _ in spans]
    ends = [b for _, b in spans]
    mask = []
    for start, end in offsets:
        i = bisect.bisect_right(ends, start)  # the first trained span ending after `start`
        mask.append(i < len(spans) and starts[i] < max(end, start + 1))
    return mask


def tokenize_segments(
    tokenizer: Any, examples: list[list[Segment]], rows: list[int] | None = None
) -> list[tuple[list[int], list[bool]]]:
    """Each example's (input_ids, trained_mask): its segments joined and tokenized once, without
    special tokens added, so the ids are exactly those inference sees for the rendered text.

    Tokenizing each segment on its own would not give them: SentencePiece-style tokenizers
    (Llama-2, Mistral) start every separately tokenized string with a word marker, and BPE merges
    across a boundary are lost. The mask comes from the tokens' character offsets (token_mask).
    `rows` (1-based row numbers, for errors) defaults to the positions in `examples`.
    """
    joined = [_joined(segs) for segs in examples]
    out: list[tuple[list[int], list[bool]]] = [([], [])] * len(examples)
    # Examples trained everywhere or nowhere need no offsets: the faster call, one mask value.
    uniform, mixed = [], []
    for k, (text, spans) in enumerate(joined):
        (uniform if spans in ([], [(0, len(text))]) else mixed).append(k)
    if uniform:
        for k, ids in zip(uniform, encode_segments(tokenizer, [joined[k][0] for k in uniform])):
            out[k] = (ids, [bool(joined[k][1])] * len(ids))
    if mixed and getattr(tokenizer, "is_fast", False):
        encoded = _encode_with_offsets(tokenizer, [joined[k][0] for k in mixed])
        for k, (ids, offsets) in zip(mixed, encoded):
            out[k] = (list(ids), token_mask(offsets, joined[k][1]))
    elif mixed:
        chosen = [examples[k] for k in mixed]
        row_numbers = [rows[k] if rows else k + 1 for k in mixed]
        for k, result in zip(mixed, _segmentwise_if_exact(tokenizer, chosen, row_numbers)):
            out[k] = result
    return out


def _segmentwise_if_exact(
    tokenizer: Any, examples: list[list[Segment]], rows: list[int]
) -> list[tuple[list[int], list[bool]]]:
    """For tokenizers without character offsets (slow, Python ones): each segment tokenized on its
    own, used only where the pieces join into exactly the ids of the whole text; an error
    otherwise, never a silently different token sequence."""
    whole = encode_segments(tokenizer, ["".join(t for t, _ in segs) for segs in examples])
    pieces = iter(encode_segments(tokenizer, [t for segs in examples for t, _ in segs]))
    out = []
    for segs, expected, row in zip(examples, whole, rows):
        ids: list[int] = []
        mask: list[bool] = []
        for (_, trained), piece in zip(segs, pieces):
            ids += piece
            mask += [trained] * len(piece)
        if ids != list(expected):
            raise ChatSFTError(
                "this tokenizer gives no character offsets (it is not a fast tokenizer) and "
                "tokenizing the trained and untrained parts of this example separately gives other "
                "tokens than tokenizing its text whole, so the trained tokens cannot be located",
                row=row,
                hint="load the fast tokenizer (AutoTokenizer with use_fast=True), or train on "
                "every token (assistant_only_loss=False, completion_only_loss=False)",
            )
        out.append((ids, mask))
    return out


def labels_of(ids: list[int], mask: list[bool]) -> list[int]:
    """[n] token ids and [n] trained flags → [n] labels: the id where trained, IGNORE_INDEX where
    not (unshifted; the collator masks each document's first token, which nothing predicts)."""
    if all(mask):
        return ids
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def trained_of(labels: list[int]) -> list[bool]:
    return [label != IGNORE_INDEX for label in labels]


def num_trained(labels: list[int]) -> int:
    """Trained tokens of a row: labels set after its first token (nothing predicts the first)."""
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX) if labels else 0


def fit_length(
    ids: list[int], labels: list[int], max_length: int | None, policy: str, mode: str
) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Apply the over-long policy to a row's ids and labels. Returns the resulting rows and '',
    'truncated', 'split' or a drop reason."""
    if max_length is None or len(ids) <= max_length:
        return [(ids, labels)], ""
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
        # trained (the collator labelss every row's first label).
        return [
            (ids[i : i + max_length], labels[i : i + max_length])
            for i in range(0, len(ids), max_length)
        ], "split"
    if mode == "keep_end":
        return [(ids[-max_length:], labels[-max_length:])], "truncated"
    return [(ids[:max_length], labels[:max_length])], "truncated"


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
    code_version: str = "",  # only part of datasets' cache fingerprint (see data_code_version)
) -> dict[str, list]:
    def at_row(err: ChatSFTError, row: int) -> ChatSFTError:
        """`err` naming the row (1-based) and the file, where it does not already."""
        if err.row is not None:
            return err.with_source(source) if source else err
        return ChatSFTError(
            err.message, source=err.source or source, row=row, field=err.field, hint=err.hint
        )

    names = list(batch)
    n = len(indices)
    text_field = "text" if formatting_func is not None else opts.dataset_text_field
    rendered: list[list[Segment]] = []
    owners: list[int] = []
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
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
            labels_out.append(example.labels)
            continue
        try:
            segs = render_with(example, tokenizer, opts)
        except ChatSFTError as err:  # the template's errors know no row
            raise at_row(err, indices[j] + 1) from err
        plain = isinstance(example, Text) or isinstance(getattr(example, "prompt", None), str)
        ids_out.append(list(prefix_ids) if plain else [])
        labels_out.append([IGNORE_INDEX] * len(ids_out[-1]))
        rendered.append(segs)
        owners.append(j)
    if rendered:
        # Batched tokenizer calls for the whole batch: the Rust tokenizer parallelises them.
        row_numbers = [indices[j] + 1 for j in owners]
        try:
            tokenized = tokenize_segments(tokenizer, rendered, row_numbers)
        except ChatSFTError as err:
            raise (err.with_source(source) if source else err) from None
        for owner, (ids, mask) in zip(owners, tokenized):
            ids_out[owner] += ids
            labels_out[owner] += labels_of(ids, mask)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", *BOOKKEEPING)}
    for row_index, ids, labels in zip(indices, ids_out, labels_out):
        try:
            rows, why = fit_length(
                ids, labels, opts.max_length, opts.overlong_policy, opts.truncation_mode
            )
        except ChatSFTError as err:  # overlong_policy="error"
            raise at_row(err, row_index + 1) from None
        # Position 0 is never predicted (nothing comes before it), so it cannot count as trained.
        counted = [(i, lab, num_trained(lab)) for i, lab in rows]
        counted = [row for row in counted if row[2]]
        if not counted:
            why = why if why == DROP_TOO_LONG else DROP_NO_TRAINED
            counted = [([], [], 0)]  # a placeholder row carrying the drop reason, removed below
        for i, lab, trained in counted:
            out["input_ids"].append(i)
            out["labels"].append(lab)
            out["_status"].append(why)
            out["_row"].append(row_index)
            out["_tokens"].append(len(i))
            out["_trained"].append(trained)
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
    """Tokenize a raw dataset. Returns the kept rows (input_ids, labels) and the counts."""
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
                "code_version": data_code_version(),
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


def _formatting_func_format(dataset: datasets.Dataset, formatting_func: Callable) -> str:
    first = apply_formatting_func(dataset[0], formatting_func, 1)
    return "text" if "text" in first else "messages"
