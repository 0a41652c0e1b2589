"""Text to token ids, and which tokens are trained: the tokenizer-facing half of data/encode.py.

Rendered examples arrive as (text, trained) segments; each is tokenized whole (the ids inference
sees) and its trained tokens are found from the tokens' character offsets.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

from ..errors import ChatSFTError
from .collate import IGNORE_INDEX
from .templates import Segment


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
    """Which tokens are trained (see token_runs), one flag per token."""
    mask = [False] * len(offsets)
    for first, last in token_runs(offsets, spans):
        mask[first:last] = [True] * (last - first)
    return mask


def token_runs(offsets: list[Span], spans: list[Span]) -> list[Span]:
    """[first, last) token ranges that are trained: the tokens covering at least one trained
    character.

    A token that straddles a boundary is trained, at either end of a trained span: the model cannot
    produce the trained characters without producing that token (a completion "four" after a
    prompt ending in a space becomes the one token " four", and is trained like the completion's
    first token is when it stands alone). A token with no characters of its own (offsets trimmed
    to nothing) counts as covering the character right after it: whitespace before a reply is
    trained with the reply, whitespace after an end-of-turn token is not. `spans` are sorted and
    disjoint. Runs, not flags: labels are then built by slices, no loop over tokens.
    """
    if not offsets:
        return []
    starts, ends = zip(*offsets)
    if not (_ascending(starts) and _ascending(ends)):
        return _runs_of(_token_mask_unordered(offsets, spans))
    # Ordered offsets: each span's tokens are one run, found by bisection.
    runs = []
    for a, b in spans:
        first = bisect.bisect_right(ends, a)  # the first token ending after a
        while first and starts[first - 1] == ends[first - 1] == a:
            first -= 1  # tokens with no characters, at a: they cover the character at a
        last = bisect.bisect_left(starts, b)  # the first token starting at or after b
        if last > first:
            runs.append((first, last))
    return runs


def _runs_of(mask: list[bool]) -> list[Span]:
    runs = []
    pos = 0
    for trained, group in itertools.groupby(mask):
        n = sum(1 for _ in group)
        if trained:
            runs.append((pos, pos + n))
        pos += n
    return runs


def _ascending(values: tuple[int, ...]) -> bool:
    # Sorting sorted values is one linear pass in C: twice as fast as comparing neighbours.
    return sorted(values) == list(values)


def _token_mask_unordered(offsets: list[Span], spans: list[Span]) -> list[bool]:
    """token_mask, one token at a time, for offsets out of order (some normalizers)."""
    starts = [a for a, _ in spans]
    ends = [b for _, b in spans]
    mask = []
    for start, end in offsets:
        i = bisect.bisect_right(ends, start)  # the first trained span ending after `start`
        mask.append(i < len(spans) and starts[i] < max(end, start + 1))
    return mask


Tokens = tuple[list[int], list[int], list[Span] | None]  # input_ids, labels, offsets


def tokenize_segments(
    tokenizer: Any, examples: list[list[Segment]], rows: list[int] | None = None
) -> list[tuple[list[int], list[bool]]]:
    """Each example's (input_ids, trained_mask); see tokenize_rendered."""
    return [
        (ids, trained_of(labels)) for ids, labels, _ in tokenize_rendered(tokenizer, examples, rows)
    ]


def tokenize_rendered(
    tokenizer: Any,
    examples: list[list[Segment]],
    rows: list[int] | None = None,
    *,
    with_offsets: bool = False,
) -> list[Tokens]:
    """Each example's (input_ids, labels, offsets): its segments joined and tokenized once, without
    special tokens added, so the ids are exactly those inference sees for the rendered text;
    labels (TRL's layout) are the id where trained, IGNORE_INDEX where not; offsets (each token's
    character span, with_offsets and a fast tokenizer only) else None.

    Tokenizing each segment on its own would not give these ids: SentencePiece-style tokenizers
    (Llama-2, Mistral) start every separately tokenized string with a word marker, and BPE merges
    across a boundary are lost. The trained tokens come from the character offsets (token_runs).
    `rows` (1-based row numbers, for errors) defaults to the positions in `examples`.
    """
    joined = [_joined(segs) for segs in examples]
    out: list[Tokens] = [([], [], None)] * len(examples)
    # Examples trained everywhere or nowhere need no offsets: the faster call, one label rule.
    uniform, mixed = [], []
    for k, (text, spans) in enumerate(joined):
        whole = not with_offsets and spans in ([], [(0, len(text))])
        (uniform if whole else mixed).append(k)
    if uniform:
        for k, ids in zip(uniform, encode_segments(tokenizer, [joined[k][0] for k in uniform])):
            out[k] = (ids, ids[:] if joined[k][1] else [IGNORE_INDEX] * len(ids), None)
    if mixed and getattr(tokenizer, "is_fast", False):
        encoded = _encode_with_offsets(tokenizer, [joined[k][0] for k in mixed])
        for k, (ids, offsets) in zip(mixed, encoded):
            ids = list(ids)
            labels = _labels_in_runs(ids, token_runs(offsets, joined[k][1]))
            out[k] = (ids, labels, offsets if with_offsets else None)
    elif mixed:
        chosen = [examples[k] for k in mixed]
        row_numbers = [rows[k] if rows else k + 1 for k in mixed]
        for k, (ids, mask) in zip(mixed, _segmentwise_if_exact(tokenizer, chosen, row_numbers)):
            out[k] = (ids, labels_of(ids, mask), None)
    return out


def _labels_in_runs(ids: list[int], runs: list[Span]) -> list[int]:
    if runs == [(0, len(ids))]:
        return ids[:]  # a copy: a collator that edits labels in place must not edit the ids
    labels = [IGNORE_INDEX] * len(ids)
    for first, last in runs:
        labels[first:last] = ids[first:last]
    return labels


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
    if not labels:
        return 0
    # Counted on the whole list: labels[1:] would copy it.
    return len(labels) - labels.count(IGNORE_INDEX) - (labels[0] != IGNORE_INDEX)
