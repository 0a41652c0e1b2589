"""Text to token ids, and which tokens are trained: the tokenizer-facing half of data/encode.py.

Rendered examples arrive as (text, trained) segments; each is tokenized whole (the ids inference
sees) and its trained tokens are found from the tokens' character offsets, or, for byte-level BPE
tokenizers, from each token's byte length (the same tokens, without the cost of offsets).
"""

from __future__ import annotations

import bisect
import itertools
import json
import unicodedata
import weakref
from dataclasses import dataclass
from typing import Any

from tokenizers import models, pre_tokenizers

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


def _runs_without_offsets(
    tokenizer: Any, texts: list[str], spans: list[list[Span]]
) -> list[tuple[list[int], list[Span] | None]] | None:
    """Each text's ids and trained token runs, from the ids alone where the tokenizer is a
    byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2 families): each token then stands for a fixed
    number of the text's UTF-8 bytes, so the tokens' positions are running sums of a per-id table,
    and the Rust tokenizer need not track offsets (a third of its time). Runs are None for a text
    whose lengths do not add up (it is then located from offsets); None overall where the tokenizer
    is not of that kind."""
    backend = _plain_backend(tokenizer)
    table = _byte_length_table(backend) if backend is not None else None
    if table is None:
        return None
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    out: list[tuple[list[int], list[Span] | None]] = []
    for text, text_spans, enc in zip(texts, spans, encode(texts, add_special_tokens=False)):
        ids = enc.ids
        out.append((ids, _runs_from_lengths(ids, table, text, text_spans)))
    return out


def _runs_from_lengths(
    ids: list[int], table: _ByteLengths, text: str, spans: list[Span]
) -> list[Span] | None:
    """token_runs from byte lengths: the same rule (a token covering any trained byte is trained;
    no token here is empty, so the rule for empty tokens never applies)."""
    try:
        ends = list(itertools.accumulate(map(table.lengths.__getitem__, ids)))
    except IndexError:  # an id the table does not know (a token added since)
        return None
    if text.isascii():
        size = len(text)
    else:
        if table.nfc and not unicodedata.is_normalized("NFC", text):
            return None  # the normalizer changed the text: token bytes are not the text's
        size = len(text.encode())
        spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    if not ends or ends[-1] != size:
        return None
    starts = [0, *ends[:-1]]
    runs = []
    for a, b in spans:
        first = bisect.bisect_right(ends, a)  # the first token ending after a
        last = bisect.bisect_left(starts, b)  # the first token starting at or after b
        if last > first:
            runs.append((first, last))
    return runs


@dataclass(frozen=True)
class _ByteLengths:
    lengths: list[int]  # UTF-8 bytes of the text each token id stands for
    nfc: bool  # the tokenizer normalizes to NFC: only texts already in NFC can use the table


_TABLES: weakref.WeakKeyDictionary[Any, tuple[int, _ByteLengths | None]] = (
    weakref.WeakKeyDictionary()
)

# Pieces of a tokenizer that keep every character of the text, unchanged and in order.
_TEXT_KEEPING_PRE_TOKENIZERS = ("Split", "Digits", "Punctuation", "ByteLevel")


def _byte_length_table(backend: Any) -> _ByteLengths | None:
    """The per-id byte lengths, where every token is a byte-level BPE piece or a literal added
    token and nothing between text and tokens adds, removes or trims characters; else None.
    Built once per tokenizer (and vocabulary size) from its components' own serialisation."""
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _TABLES.get(backend)
    if cached is not None and cached[0] == size:
        return cached[1]
    table = _read_byte_lengths(backend)
    _TABLES[backend] = (size, table)
    return table


def _settings(component: Any) -> dict[str, Any]:
    """A normalizer's, pre-tokenizer's or post-processor's settings, as in tokenizer.json."""
    return {} if component is None else json.loads(component.__getstate__())


def _read_byte_lengths(backend: Any) -> _ByteLengths | None:
    normalizer = _settings(backend.normalizer)
    if normalizer and normalizer.get("type") != "NFC":
        return None
    pre = _settings(backend.pre_tokenizer)
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    for step in steps:
        if (
            step.get("type") not in _TEXT_KEEPING_PRE_TOKENIZERS
            or step.get("behavior") == "Removed"
        ):
            return None
    post = _settings(backend.post_processor)
    for step in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        if step and step.get("type") not in ("TemplateProcessing", "ByteLevel"):
            return None
        if step and step.get("type") == "ByteLevel" and step.get("trim_offsets", True):
            return None  # trimmed offsets: the offset path's rule for empty tokens applies
    model = backend.model
    if not isinstance(model, models.BPE) or model.byte_fallback:
        return None
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        return None
    added = backend.get_added_tokens_decoder()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths: dict[int, int] = {}
    for piece, index in backend.get_vocab(with_added_tokens=False).items():
        if index in added:
            continue
        if not piece or not alphabet.issuperset(piece):
            return None
        lengths[index] = len(piece)  # one alphabet character stands for one byte
    for index, token in added.items():
        if token.lstrip or token.rstrip or not token.content:
            return None  # such a token swallows the whitespace around it
        lengths[index] = len(token.content.encode())
    table = [0] * (max(lengths, default=-1) + 1)
    for index, n in lengths.items():
        table[index] = n
    if 0 in table:
        return None  # a gap in the ids: an unknown token would count as empty
    return _ByteLengths(table, nfc=bool(normalizer))


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
    if mixed and not with_offsets:
        texts = [joined[k][0] for k in mixed]
        located = _runs_without_offsets(tokenizer, texts, [joined[k][1] for k in mixed])
        if located is not None:
            for k, (ids, runs) in zip(mixed, located):
                if runs is not None:
                    out[k] = (ids, _labels_in_runs(ids, runs), None)
            mixed = [k for k, (_, runs) in zip(mixed, located) if runs is None]
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
