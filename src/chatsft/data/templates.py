"""The one renderer: an Example becomes text segments, each marked trained or not.

Chat templates are treated as black boxes. To find what an assistant turn contributes we render the
conversation up to the turn with the generation prompt, and up to and including the turn; the text in
between is the turn. This works for any prefix-preserving template, with or without
`{% generation %}` markers, and it is exactly the text the model must produce at inference time.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import ChatSFTError
from .formats import Conversation, Example, PromptCompletion, Text

Segment = tuple[str, bool]  # (text, trained)


# Message keys that apply_chat_template passes to the template unchanged. Other keys (reasoning
# fields it aliases, objects it converts) go through apply_chat_template itself.
PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "name", "tool_call_id"})


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str) -> Any:
    """transformers' own compiled (sandboxed, cached) Jinja template, or None if its API moved."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(template)


def render_chat(
    tokenizer: Any, messages: list[dict], tools: Any, add_generation_prompt: bool
) -> str:
    template = tokenizer.chat_template
    if not template:
        raise ChatSFTError(
            "the tokenizer has no chat template, so chat rows cannot be rendered",
            field="chat_template",
            hint="set chat_template_path to a .jinja file or a tokenizer folder",
        )
    try:
        compiled = _compiled_template(template) if isinstance(template, str) else None
        plain = all(PLAIN_MESSAGE_KEYS.issuperset(m) for m in messages)
        if compiled is not None and plain and all(isinstance(t, dict) for t in tools or ()):
            # Same template, same variables as apply_chat_template, without its per-call
            # conversion of every message (half of the preparation time on short chats).
            return compiled.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **tokenizer.special_tokens_map,
            )
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja errors, raise_exception() calls in templates
        raise ChatSFTError(
            f"the chat template failed to render: {err}",
            field="chat_template",
            hint="fix the template or pass chat_template_path",
        ) from err


def _split_turn(text: str, end_of_turn: str | None) -> list[Segment]:
    """Train the turn through its end-of-turn token; whitespace the template adds after it is not
    something the model has to produce (generation stops at the token)."""
    if end_of_turn:
        cut = text.rfind(end_of_turn)
        if cut >= 0:
            cut += len(end_of_turn)
            if cut < len(text) and not text[cut:].strip():
                return [(text[:cut], True), (text[cut:], False)]
    return [(text, True)]


def _turn_segments(
    tokenizer: Any,
    prefix: list[dict],
    turn: list[dict],
    full: str,
    pos: int,
    tools: Any,
    end_of_turn: str | None,
    turn_index: int,
) -> tuple[list[Segment], int]:
    before = render_chat(tokenizer, prefix, tools, True) if prefix else ""
    upto = render_chat(tokenizer, prefix + turn, tools, False)
    if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
        raise ChatSFTError(
            f"the chat template is not prefix-preserving at message {turn_index}: rendering the "
            "conversation up to that turn does not give a prefix of the whole conversation, so the "
            "assistant tokens cannot be located",
            field="chat_template",
            hint="pass chat_template_path with a template that renders earlier turns unchanged",
        )
    segs = [(full[pos : len(before)], False)] if len(before) > pos else []
    segs += _split_turn(full[len(before) : len(upto)], end_of_turn)
    return segs, len(upto)


def render_segments(
    example: Example,
    tokenizer: Any,
    *,
    eos_token: str,
    assistant_only_loss: bool = False,
    completion_only_loss: bool | None = None,
    last_turn_only: bool = False,
) -> list[Segment]:
    """Render an example as (text, trained) segments whose concatenation is the full training text."""
    if isinstance(example, Text):
        text = example.text
        return [(text, True)] if text.endswith(eos_token) else [(text, True), (eos_token, True)]

    if isinstance(example, PromptCompletion) and isinstance(example.prompt, str):
        train_prompt = completion_only_loss is False
        comp = example.completion
        segs = [(example.prompt, train_prompt), (comp, True)]
        return segs if comp.endswith(eos_token) else [*segs, (eos_token, True)]

    if isinstance(example, PromptCompletion):
        prompt, completion = example.prompt, example.completion
        full = render_chat(tokenizer, prompt + completion, None, False)
        if completion_only_loss is False:
            return [(full, True)]
        segs, pos = _turn_segments(
            tokenizer, prompt, completion, full, 0, None, eos_token, len(prompt)
        )
        return segs + ([(full[pos:], False)] if pos < len(full) else [])

    assert isinstance(example, Conversation)
    msgs, tools = example.messages, example.tools
    full = render_chat(tokenizer, msgs, tools, False)
    if not (assistant_only_loss or last_turn_only):
        return [(full, True)]
    segs: list[Segment] = []
    pos = 0
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i in turns[-1:] if last_turn_only else turns:
        turn_segs, pos = _turn_segments(
            tokenizer, msgs[:i], [msgs[i]], full, pos, tools, eos_token, i
        )
        segs += turn_segs
    if pos < len(full):
        segs.append((full[pos:], False))
    return segs
