"""The one renderer: an Example becomes text segments, each marked trained or not.

Chat templates are treated as black boxes. To find what an assistant turn contributes we render the
conversation up to the turn with the generation prompt, and up to and including the turn; the text in
between is the turn. This works for any prefix-preserving template, with or without
`{% generation %}` markers, and it is exactly the text the model must produce at inference time.
"""

from __future__ import annotations

import _signal
import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
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
    copies its globals (a ChainMap) into every context, a third of a short chat's render time.
    The context is built directly: Template.new_context also lists the globals' names, which only
    exporting the template as a module (`{% import %}` of it) reads."""
    environment = compiled.environment
    if environment.is_async:
        return compiled.render(**variables)
    context = environment.context_class(environment, variables, compiled.name, compiled.blocks)
    try:
        return environment.concat(compiled.root_render_func(context))
    except Exception:
        environment.handle_exception()  # re-raises with the template's line numbers
        raise


ChatRenderer = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text

# Seconds one example may take to render (all renders of its turns together). A real template
# renders a conversation in well under a millisecond; one that never ends would hang preparation
# with no message at all.
RENDER_TIME_LIMIT_S = 10.0


class RenderTimeout(ChatSFTError):
    """A chat template ran past RENDER_TIME_LIMIT_S on one example."""

    def __init__(self, line: int | None = None) -> None:
        self.line = line
        at = f" (still running at template line {line})" if line else ""
        super().__init__(
            f"the chat template took more than {RENDER_TIME_LIMIT_S:g} s to render one example"
            f"{at}; stopped",
            field="chat_template",
            hint="a loop that never ends? fix the template or pass chat_template_path",
        )

    def __reduce__(self) -> tuple[Any, ...]:  # across datasets.map's worker processes
        return RenderTimeout, (self.line,)


# How the limit is enforced: a one-shot SIGALRM timer (setitimer) armed for each example, whose
# handler raises RenderTimeout inside the template's Python code (Jinja compiles templates to
# Python; a signal handler runs between its bytecodes, so any loop is interrupted). Counting loop
# iterations instead would miss loops that call nothing (`{% for i in x %}{% endfor %}`) and
# recursion through macros; a watchdog thread cannot stop a render at all. About 2 us per example
# (two system calls), against some 25 us of rendering: the handler is installed once and left in
# place, since installing it costs more than a render, and it ignores alarms it did not ask for.
# Signals are handled in a process's main thread only: that is where chatsft renders (the trainer
# and CLI, datasets.map's worker processes, DataLoader worker processes). Renders in other threads,
# on platforms without SIGALRM (Windows), or while the program uses SIGALRM itself, have no limit.
_TIMER = getattr(signal, "ITIMER_REAL", None)
# signal.getsignal converts the handler to an enum member (3 us, by a caught ValueError); the C
# function it wraps returns it as it is.
_getsignal = getattr(_signal, "getsignal", signal.getsignal)
_armed = False  # a timer runs for the current example (main thread only, so one flag)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    global _armed
    if _armed:
        _armed = False
        raise RenderTimeout(_frame_template_line(frame))
    # Otherwise the timer fired as the render ended, after it was disarmed: nothing to stop.


def _arm_time_limit() -> bool:
    """Start the timer for one example; False where no limit applies (see above)."""
    global _armed
    if (
        _TIMER is None
        or _armed  # nested: the outer limit applies
        or threading.current_thread() is not threading.main_thread()
    ):
        return False
    if _getsignal(signal.SIGALRM) is not _on_alarm:
        if _getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None) or signal.getitimer(_TIMER)[0]:
            return False  # the program's own alarm: left alone
        signal.signal(signal.SIGALRM, _on_alarm)
    previous = signal.setitimer(_TIMER, RENDER_TIME_LIMIT_S)
    if previous[0]:  # an alarm set with our handler in place: give it back, no limit
        signal.setitimer(_TIMER, *previous)
        return False
    _armed = True
    return True


def _disarm_time_limit() -> None:
    global _armed
    # Disarmed before the flag is cleared: an alarm that still arrives finds it cleared and is
    # ignored, and none can arrive afterwards.
    signal.setitimer(_TIMER, 0)
    _armed = False


def _frame_template_line(frame: FrameType | None) -> int | None:
    """The template line a running render is at: the innermost frame of Jinja's generated code,
    mapped back to the template as Jinja's own tracebacks do."""
    while frame is not None:
        template = frame.f_globals.get("__jinja_template__")
        if template is not None:
            return template.get_corresponding_lineno(frame.f_lineno)
        frame = frame.f_back
    return None


def _traceback_template_line(err: BaseException) -> int | None:
    """The template line an error came from: Jinja rewrites a failed render's traceback so that its
    template frames carry the template's own line numbers."""
    if isinstance(err, jinja2.TemplateSyntaxError):
        return err.lineno
    line = None
    tb: TracebackType | None = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


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
        except RenderTimeout as err:
            # Raised from wherever the render was: the traceback names the template line.
            raise RenderTimeout(_traceback_template_line(err) or err.line) from None
        except Exception as err:  # jinja errors, raise_exception() calls in templates
            raise _render_error(err) from err

    return checked


def _render_error(err: Exception) -> ChatSFTError:
    line = _traceback_template_line(err)
    problem = (
        "is not valid Jinja" if isinstance(err, jinja2.TemplateSyntaxError) else "failed to render"
    )
    # RecursionError's message is long and says nothing about templates.
    what = "a macro calls itself without end" if isinstance(err, RecursionError) else str(err)
    return ChatSFTError(
        f"the chat template {problem}"
        + (f" at template line {line}" if line else "")
        + f": {what}",
        field="chat_template",
        hint="fix the template or pass chat_template_path",
    )


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    tools: Any,
    add_generation_prompt: bool,
    template_kwargs: dict | None = None,
) -> str:
    with render_time_limit():
        render = chat_renderer(tokenizer, messages, tools, template_kwargs)
        return render(messages, add_generation_prompt)


@contextlib.contextmanager
def render_time_limit() -> Iterator[None]:
    """RENDER_TIME_LIMIT_S over everything rendered inside (one example's renders together)."""
    armed = _arm_time_limit()
    try:
        yield
    finally:
        if armed:
            _disarm_time_limit()


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

    with render_time_limit():
        return _chat_segments(
            example,
            tokenizer,
            eos_token=eos_token,
            assistant_only_loss=assistant_only_loss,
            completion_only_loss=completion_only_loss,
            last_turn_only=last_turn_only,
        )


def _chat_segments(
    example: Example,
    tokenizer: Any,
    *,
    eos_token: str,
    assistant_only_loss: bool,
    completion_only_loss: bool | None,
    last_turn_only: bool,
) -> list[Segment]:
    """render_segments for chat examples: rendered with the tokenizer's chat template."""
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
