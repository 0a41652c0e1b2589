"""The one renderer: an Example becomes text segments, each marked trained or not.

Chat templates are treated as black boxes. To find what an assistant turn contributes we render the
conversation up to the turn with the generation prompt, and up to and including the turn; the text in
between is the turn. This works for any prefix-preserving template, with or without
`{% generation %}` markers, and it is exactly the text the model must produce at inference time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes

from ..errors import ChatSFTError
from .formats import Conversation, Example, PromptCompletion, Text

Segment = tuple[str, bool]  # (text, trained)


# Message keys that apply_chat_template passes to the template unchanged. Other keys (reasoning
# fields it aliases, objects it converts) go through apply_chat_template itself.
PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "name", "tool_call_id"})


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str) -> tuple[Any, dict[str, Any]] | None:
    """transformers' own compiled (sandboxed, cached) Jinja template, with `{% generation %}` inlined
    where that renders the same text, and a flat copy of its globals; None if its API moved."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    compiled = _inline_generation(_compile_jinja_template(template), template)
    return compiled, dict(compiled.globals)


class _NotInlinable(Exception):
    pass


class _InlineGeneration(jinja2.ext.Extension):
    """`{% generation %}` as a plain inner scope (a `{% with %}` block). transformers' tag wraps its
    body in a caller macro, called through the sandbox for every assistant message: 60% of a
    render. Untracked, that call returns the body's text unchanged, and so does the scope."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        if not all(_scope_safe(node) for node in body):
            raise _NotInlinable
        return jinja2.nodes.With([], [], body, lineno=lineno)


# Nodes that behave the same inside a caller macro and inside a plain scope. Anything else (a
# variable set, a macro, `caller`/`varargs`/`kwargs`, blocks, includes, loop controls) keeps
# transformers' macro.
_SCOPE_SAFE = (
    jinja2.nodes.Expr,
    jinja2.nodes.Helper,
    jinja2.nodes.Output,
    jinja2.nodes.If,
    jinja2.nodes.For,
    jinja2.nodes.With,
)
_MACRO_NAMES = frozenset({"caller", "varargs", "kwargs"})


def _scope_safe(node: jinja2.nodes.Node) -> bool:
    for n in (node, *node.find_all(jinja2.nodes.Node)):
        if isinstance(n, jinja2.nodes.Assign) and isinstance(n.target, jinja2.nodes.NSRef):
            continue  # `set ns.x = ...` changes a namespace object, visible from either
        if not isinstance(n, _SCOPE_SAFE):
            return False
        if isinstance(n, jinja2.nodes.Name) and n.name in _MACRO_NAMES:
            return False
    return True


def _inline_generation(compiled: Any, template: str) -> Any:
    """The template compiled in a copy of transformers' environment (same sandbox, filters, globals)
    whose `{% generation %}` tag is _InlineGeneration; `compiled` itself where that might differ."""
    env = compiled.environment
    trackers = [key for key, ext in env.extensions.items() if "generation" in ext.tags]
    if "generation" not in template or env.autoescape is not False or len(trackers) != 1:
        return compiled
    inline_env = env.overlay()
    del inline_env.extensions[trackers[0]]  # the overlay's own copy; env keeps its tracker
    inline_env.add_extension(_InlineGeneration)
    try:
        return inline_env.from_string(template)
    except _NotInlinable:
        return compiled


def _render_compiled(compiled: Any, variables: dict[str, Any]) -> str:
    """Template.render, given the template's globals already flat in `variables`: Template.render
    copies its globals (a ChainMap) into every context, a third of a short chat's render time."""
    if compiled.environment.is_async:
        return compiled.render(**variables)
    context = compiled.new_context(variables, shared=True)
    try:
        return compiled.environment.concat(compiled.root_render_func(context))
    except Exception:
        compiled.environment.handle_exception()  # re-raises with the template's line numbers
        raise


ChatRenderer = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def chat_renderer(
    tokenizer: Any, messages: list[dict], tools: Any, template_kwargs: dict | None = None
) -> ChatRenderer:
    """Renders `messages`, or any prefix of them, with the tokenizer's chat template. Everything
    that does not depend on the prefix is looked up once, not once per render."""
    template = tokenizer.chat_template
    if not template:
        raise ChatSFTError(
            "the tokenizer has no chat template, so chat rows cannot be rendered",
            field="chat_template",
            hint="set chat_template_path to a .jinja file or a tokenizer folder",
        )
    try:
        compiled = _compiled_template(template) if isinstance(template, str) else None
    except Exception as err:  # a template that does not compile
        raise _render_error(err) from err
    plain = all(PLAIN_MESSAGE_KEYS.issuperset(m) for m in messages)
    if compiled is not None and plain and all(isinstance(t, dict) for t in tools or ()):
        # Same template, same variables as apply_chat_template, without its per-call
        # conversion of every message (half of the preparation time on short chats).
        jinja_template, flat_globals = compiled
        fixed = {
            **flat_globals,
            **tokenizer.special_tokens_map,
            "tools": tools,
            "documents": None,
            **(template_kwargs or {}),
        }

        def render(msgs: list[dict], add_generation_prompt: bool) -> str:
            variables = {**fixed, "messages": msgs, "add_generation_prompt": add_generation_prompt}
            return _render_compiled(jinja_template, variables)
    else:

        def render(msgs: list[dict], add_generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(
                msgs,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )

    def checked(msgs: list[dict], add_generation_prompt: bool) -> str:
        try:
            return render(msgs, add_generation_prompt)
        except Exception as err:  # jinja errors, raise_exception() calls in templates
            raise _render_error(err) from err

    return checked


def _render_error(err: Exception) -> ChatSFTError:
    return ChatSFTError(
        f"the chat template failed to render: {err}",
        field="chat_template",
        hint="fix the template or pass chat_template_path",
    )


def render_chat(
    tokenizer: Any, messages: list[dict], tools: Any, add_generation_prompt: bool
) -> str:
    return chat_renderer(tokenizer, messages, tools)(messages, add_generation_prompt)


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
    render: ChatRenderer,
    messages: list[dict],
    turn: tuple[int, int],
    full: str,
    pos: int,
    end_of_turn: str | None,
) -> tuple[list[Segment], int]:
    """Segments from `pos` through the turn messages[start:end]; `full` renders all of `messages`."""
    start, end = turn
    before = render(messages[:start], True) if start else ""
    # A turn that ends the conversation ends where `full` does: the same render, not redone.
    upto = full if end == len(messages) else render(messages[:end], False)
    if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
        raise ChatSFTError(
            f"the chat template is not prefix-preserving at message {start}: rendering the "
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
        messages = example.prompt + example.completion
        render = chat_renderer(tokenizer, messages, example.tools, example.template_kwargs)
        full = render(messages, False)
        if completion_only_loss is False:
            return [(full, True)]
        turn = (len(example.prompt), len(messages))
        segs, pos = _turn_segments(render, messages, turn, full, 0, eos_token)
        return segs + ([(full[pos:], False)] if pos < len(full) else [])

    assert isinstance(example, Conversation)
    msgs = example.messages
    render = chat_renderer(tokenizer, msgs, example.tools, example.template_kwargs)
    full = render(msgs, False)
    if not (assistant_only_loss or last_turn_only):
        return [(full, True)]
    segs: list[Segment] = []
    pos = 0
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i in turns[-1:] if last_turn_only else turns:
        turn_segs, pos = _turn_segments(render, msgs, (i, i + 1), full, pos, eos_token)
        segs += turn_segs
    if pos < len(full):
        segs.append((full[pos:], False))
    return segs
