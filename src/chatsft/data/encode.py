"""The one path from a normalised example to what the model sees: token ids and labels.

`encode` renders each example (chat template or plain strings, data/templates.py), applies the BOS
rule, tokenizes the whole text once with the trained mask from character offsets (data/tokenize.py)
and applies max_length / overlong_policy. Preparation (datasets.map), streaming, `chatsft inspect`,
generation-eval prompts and the demo all call it, so they cannot disagree about an id or a mask.
With `for_generation=True` it encodes the prompt the model continues at inference instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ChatSFTError
from .collate import IGNORE_INDEX
from .formats import Conversation, Example, PromptCompletion, Text, Tokenized
from .templates import Segment, render_chat, render_segments
from .tokenize import Span, num_trained, special_prefix_ids, tokenize_rendered

OVERLONG_POLICIES = ("truncate", "drop", "split", "error")
DROP_TOO_LONG = "longer than max_length"
DROP_NO_TRAINED = "no trained token left"
KEPT = ("", "truncated", "split")  # statuses of an example that yields rows


@dataclass(frozen=True)
class PrepOptions:
    """Everything that decides the encoded output (and so datasets' cache fingerprint)."""

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


@dataclass(frozen=True)
class Encoded:
    """One example, encoded. `input_ids` / `labels` are the whole example (TRL's layout: labels
    are the id where trained, -100 where not, unshifted); `pieces` are the [start, end) token
    ranges the length policy keeps as rows (none when the example is dropped, several when split);
    `status` is '', 'truncated', 'split' or the drop reason. `text` and `offsets` (each token's
    character span in `text`; prefix tokens get (0, 0)) only with_offsets and a fast tokenizer."""

    input_ids: list[int]
    labels: list[int]
    pieces: list[Span]
    status: str = ""
    text: str = ""
    offsets: list[Span] | None = None

    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each kept row."""
        n = len(self.input_ids)
        return [
            (self.input_ids, self.labels)
            if (a, b) == (0, n)
            else (self.input_ids[a:b], self.labels[a:b])
            for a, b in self.pieces
        ]


def encode(
    examples: Iterable[Example],
    tokenizer: Any,
    opts: PrepOptions | None = None,
    *,
    rows: Sequence[int | None] | None = None,
    source: str | None = None,
    with_offsets: bool = False,
    for_generation: bool = False,
) -> list[Encoded]:
    """Encode a batch of examples (batched: one tokenizer call, which the Rust tokenizer runs in
    parallel). `rows` are their 1-based row numbers for errors (default: positions from 1; a
    generation prompt may have None).

    for_generation: each example's prompt (prompt_of) with the generation prompt, as the model
    continues it at inference; nothing trained, no length policy, `opts` not needed.
    """
    if for_generation:
        return _encode_prompts(examples, tokenizer, rows)
    assert opts is not None, "encode needs PrepOptions except for_generation"
    prefix_ids = None  # looked up (two tokenizer calls) only for a batch with plain strings
    row_of = (lambda k: k + 1) if rows is None else list(rows).__getitem__
    heads: list[list[int]] = []  # ids before the rendered text: the BOS rule
    rendered: list[list[Segment]] = []
    owners: list[int] = []
    whole: list[tuple[list[int], list[int]]] = []
    # Rendered as they come: with a lazy `examples`, a row's format and template errors are
    # raised in row order.
    for k, example in enumerate(examples):
        if isinstance(example, Tokenized):
            whole.append((example.input_ids, example.labels))
            continue
        whole.append(([], []))
        rendered.append(_render(example, tokenizer, opts, row_of(k), source))
        if _is_plain(example) and prefix_ids is None:
            prefix_ids = special_prefix_ids(tokenizer)
        heads.append(prefix_ids if _is_plain(example) and prefix_ids else [])
        owners.append(k)
    extras: list[dict[str, Any]] = [{}] * len(whole)  # text and offsets, with_offsets
    if rendered:
        try:
            tokens = tokenize_rendered(
                tokenizer, rendered, [row_of(k) for k in owners], with_offsets=with_offsets
            )
        except ChatSFTError as err:
            raise (err.with_source(source) if source else err) from None
        for k, head, segs, (ids, labels, offsets) in zip(owners, heads, rendered, tokens):
            if head:
                ids = head + ids
                labels = [IGNORE_INDEX] * len(head) + labels
                offsets = [(0, 0)] * len(head) + offsets if offsets is not None else None
            whole[k] = (ids, labels)
            if with_offsets:
                extras[k] = {"text": "".join(t for t, _ in segs), "offsets": offsets}
    out = []
    for k, (ids, labels) in enumerate(whole):
        pieces, status = _fitted(ids, labels, opts, row_of(k), source)
        out.append(Encoded(ids, labels, pieces, status, **extras[k]))
    return out


def _render(
    example: Example, tokenizer: Any, opts: PrepOptions, row: int, source: str | None
) -> list[Segment]:
    """render_segments with the mask options preparation uses (one place maps them); the
    template's errors know no row, so it is added here."""
    try:
        return render_segments(
            example,
            tokenizer,
            eos_token=opts.eos_token,
            assistant_only_loss=opts.assistant_only_loss,
            completion_only_loss=opts.completion_only_loss,
            last_turn_only=opts.last_turn_only,
        )
    except ChatSFTError as err:
        raise at_row(err, row, source) from err


def at_row(err: ChatSFTError, row: int, source: str | None) -> ChatSFTError:
    """`err` naming the row (1-based) and the file, where it does not already."""
    if err.row is not None:
        return err.with_source(source) if source else err
    return ChatSFTError(
        err.message, source=err.source or source, row=row, field=err.field, hint=err.hint
    )


def _is_plain(example: Example) -> bool:
    """Plain strings get the tokenizer's special prefix (BOS); a chat template writes its own."""
    return isinstance(example, Text) or (
        isinstance(example, PromptCompletion) and isinstance(example.prompt, str)
    )


def _fitted(
    ids: list[int], labels: list[int], opts: PrepOptions, row: int, source: str | None
) -> tuple[list[Span], str]:
    """The rows the length policy keeps, without those that train nothing."""
    try:
        pieces, why = fit_length(
            len(ids), opts.max_length, opts.overlong_policy, opts.truncation_mode
        )
    except ChatSFTError as err:  # overlong_policy="error"
        raise at_row(err, row, source) from None
    n = len(ids)
    # Position 0 is never predicted (nothing comes before it), so it cannot count as trained.
    kept = [(a, b) for a, b in pieces if num_trained(labels if (a, b) == (0, n) else labels[a:b])]
    if not kept:
        return [], why if why == DROP_TOO_LONG else DROP_NO_TRAINED
    return kept, why


def fit_length(n: int, max_length: int | None, policy: str, mode: str) -> tuple[list[Span], str]:
    """The over-long policy for an example of `n` tokens: the [start, end) token ranges it keeps as
    rows, and '', 'truncated', 'split' or a drop reason."""
    if max_length is None or n <= max_length:
        return [(0, n)], ""
    if policy == "drop":
        return [], DROP_TOO_LONG
    if policy == "error":
        raise ChatSFTError(
            f"example has {n} tokens, more than max_length={max_length}",
            field="max_length",
            hint="raise max_length, or set overlong_policy to truncate, split or drop",
        )
    if policy == "split":
        # Consecutive pieces; each piece's first token has no context inside the row, so it is not
        # trained (the collator masks every row's first label).
        return [(i, min(i + max_length, n)) for i in range(0, n, max_length)], "split"
    if mode == "keep_end":
        return [(n - max_length, n)], "truncated"
    return [(0, max_length)], "truncated"


# --- prompts for generation ------------------------------------------------------------------------


def prompt_of(example: Example) -> str | list[dict[str, Any]] | None:
    """What the model is asked to continue: a row's prompt; a conversation up to its last assistant
    turn (the whole conversation if it ends with another role); plain text as it is; None for token
    ids or a conversation that is a lone assistant turn."""
    if isinstance(example, PromptCompletion):
        return example.prompt
    if isinstance(example, Conversation):
        messages = example.messages
        if messages and messages[-1]["role"] == "assistant":
            return messages[:-1] or None
        return messages
    if isinstance(example, Text):
        return example.text
    return None


def _encode_prompts(
    examples: Iterable[Example], tokenizer: Any, rows: Sequence[int | None] | None
) -> list[Encoded]:
    prefix_ids = special_prefix_ids(tokenizer)
    out = []
    for k, example in enumerate(examples):
        row = k + 1 if rows is None else rows[k]
        prompt = prompt_of(example)
        if prompt is None:
            raise ChatSFTError("this example has no prompt to generate from", row=row)
        tools = getattr(example, "tools", None)
        kwargs = getattr(example, "template_kwargs", None)
        ids = encode_prompt(tokenizer, prompt, row, tools, kwargs, prefix_ids=prefix_ids)
        out.append(Encoded(ids, [IGNORE_INDEX] * len(ids), [(0, len(ids))]))
    return out


def encode_prompt(
    tokenizer: Any,
    prompt: str | list[dict[str, Any]],
    row: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    *,
    prefix_ids: list[int] | None = None,
) -> list[int]:
    """The ids a model continues at inference, encoded as training encodes the same text: a chat
    prompt through the chat template with the generation prompt; plain text after the BOS rule
    (`prefix_ids`: the tokenizer's own, looked up when not given)."""
    if isinstance(prompt, str):
        if prefix_ids is None:
            prefix_ids = special_prefix_ids(tokenizer)
        ids = prefix_ids + tokenize_text(tokenizer, prompt) if prompt else []
        # An empty text prompt gives the model nothing to continue (or only a BOS token): refused
        # here rather than left to fail deep inside the model's forward.
        if not prompt or not ids:
            raise ChatSFTError(
                "a plain-text prompt is empty, so there is nothing to continue",
                row=row,
                field="prompt",
                hint="give some text, or a chat prompt",
            )
        return ids
    text = render_chat(tokenizer, prompt, tools, True, template_kwargs)
    return tokenize_text(tokenizer, text)


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """One text's ids, no special tokens added (a rendered template wrote its own)."""
    [(ids, _, _)] = tokenize_rendered(tokenizer, [[(text, False)]])
    return ids
