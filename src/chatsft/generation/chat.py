"""`chatsft chat`: a conversation with a model, and the REPL over it.

The session keeps the conversation and renders it with the chat template the trainer used. The
REPL reads lines from any stream, so it also works from a pipe; on a terminal it has readline's
line editing and a history file, and replies print as they are generated.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from ..errors import ChatSFTError
from .generate import ReplyStreamer, generate, model_context, prompt_ids
from .knobs import ALIASES, KNOBS, LENGTH_KNOBS, check_knobs, fit_lengths

EMPTY_REPLY = "(empty reply)"
HELP = """commands:
  /reset           forget the conversation (the system message stays)
  /system TEXT     set the system message (empty TEXT removes it)
  /set KNOB VALUE  change a decoding knob, e.g. /set top_p 0.9 (VALUE none unsets it)
  /set             show the knobs
  /quit            leave (end of input does too)"""


def shown(text: str) -> str:
    """A reply as printed: one that is empty (or only whitespace) would print as nothing at all,
    which reads like a hang or a bug, so it says so instead."""
    return text if text.strip() else EMPTY_REPLY


class ChatSession:
    """A conversation with a model: `send(text)` adds the user turn and returns the reply.

    With `stream` set, each reply is also written there while it is generated (sampling or greedy
    with one sequence; beam search replies are only returned)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        knobs: dict[str, Any] | None = None,
        system: str | None = None,
        *,
        stream: TextIO | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatSFTError(
                "the tokenizer has no chat template, so there is no chat format",
                field="chat_template",
                hint="pass --chat_template, or use `chatsft generate --raw`",
            )
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.stream = stream
        self.streamed = False  # whether the last reply was written to `stream`
        self.history: list[dict[str, str]] = []
        self._set: dict[str, Any] = {}  # what the user set; `knobs` adds the resolved defaults
        self.knobs: dict[str, Any] = {}
        self.update_knobs(knobs or {}, check_lengths=True)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def send(self, text: str) -> str:
        user = {"role": "user", "content": text}
        # The knobs as the user set them: generate() fits a default max_new_tokens to the room the
        # model's context leaves, but refuses a max_new_tokens someone asked for that does not fit.
        knobs = {k: v for k, v in self._set.items() if k != "seed"}
        single = (
            self.knobs.get("num_beams", 1) == 1 and self.knobs.get("num_return_sequences", 1) == 1
        )
        streamer = None
        if self.stream is not None and single:
            streamer = ReplyStreamer(
                self.tokenizer, self.stream, self.knobs.get("stop_strings", [])
            )
        self.streamed = False
        prompt = [*self.messages(), user]
        result = generate(self.model, self.tokenizer, [prompt], streamer=streamer, **knobs)[0]
        self.streamed = streamer is not None
        # The reply goes into the history as decoded text: the next turn re-renders it with the
        # template, exactly the way the trainer rendered assistant turns. An empty reply is not
        # kept, nor the turn that asked for it: an empty turn is not a valid conversation turn
        # (check_messages refuses it), so the next line is asked as if this one had not been.
        if result.text.strip():
            self.history += [user, {"role": "assistant", "content": result.text}]
        return result.text

    def reset(self) -> None:
        self.history = []

    def update_knobs(self, changes: dict[str, Any], *, check_lengths: bool | None = None) -> None:
        """Apply knob changes (None or "none" unsets); on an invalid result nothing changes.

        Length knobs are also checked against the conversation so far (`check_lengths`; by default
        when one changes), so `/set max_length 2` fails when typed, not at the next reply."""
        merged = dict(self._set)
        names = {ALIASES.get(name, name) for name in changes}
        for name, value in changes.items():
            name = ALIASES.get(name, name)
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                merged.pop(name, None)
            else:
                merged[name] = value
        # max_length and max_new_tokens are two ways to give one limit: setting one in a session
        # replaces the other rather than failing as "both set".
        for new, old in (("max_length", "max_new_tokens"), ("max_new_tokens", "max_length")):
            if merged.get(new) is not None and new in names and old not in names:
                merged.pop(old, None)
        knobs = check_knobs(merged)
        if check_lengths or (check_lengths is None and names & set(LENGTH_KNOBS)):
            self._check_lengths(knobs, "max_new_tokens" in merged)
        self.knobs, self._set = knobs, merged
        if "seed" in names and self.knobs.get("seed") is not None:
            # Seeded once per session (not per reply), so replies differ but the session repeats.
            torch.manual_seed(self.knobs["seed"])

    def _check_lengths(self, knobs: dict[str, Any], max_new_tokens_set: bool) -> None:
        # The shortest next prompt is the conversation so far plus an empty user turn.
        next_turn = [*self.messages(), {"role": "user", "content": ""}]
        length = len(prompt_ids(self.tokenizer, next_turn))
        context = model_context(self.model)
        fit_lengths(knobs, [length], context, max_new_tokens_set=max_new_tokens_set)


def default_history_file() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "chatsft", "chat_history")


def enable_line_editing(history_file: str | None) -> Callable[[], None]:
    """Turn on readline (line editing, arrow-key history) for input(), loading `history_file`;
    returns the function that saves the history. Python builds without readline (Windows, some
    minimal images) just get plain input, and a history file that cannot be read or written (a
    read-only home) only costs the history."""
    try:
        import readline
    except ImportError:
        return lambda: None
    readline.set_history_length(1000)
    if history_file:
        with contextlib.suppress(OSError):  # first run, or unreadable
            readline.read_history_file(history_file)

    def save() -> None:
        if not history_file:
            return
        try:
            os.makedirs(os.path.dirname(history_file), exist_ok=True)
            readline.write_history_file(history_file)
        except OSError:
            pass

    return save


def run_repl(
    session: ChatSession,
    stdin: TextIO,
    stdout: TextIO,
    *,
    history_file: str | None = None,
) -> int:
    """Read lines until /quit or end of input; print one reply per user line.

    On a terminal (stdin is sys.stdin and a tty) lines come through input(), with readline's
    editing and the history in `history_file` (default: ~/.cache/chatsft/chat_history). Ctrl-C
    at the prompt clears the line; during a reply it drops that reply and the session goes on."""
    interactive = stdin.isatty()
    use_input = interactive and stdin is sys.stdin
    save_history = (
        enable_line_editing(history_file or default_history_file()) if use_input else None
    )
    if interactive:
        stdout.write("chat with the model; /help for commands\n")
    try:
        while True:
            try:
                line = _read_line(stdin, stdout, interactive, use_input)
            except KeyboardInterrupt:
                if not interactive:  # from a pipe or file, Ctrl-C stops the program
                    raise
                stdout.write("\n")
                continue
            if line is None or line.strip() in ("/quit", "/exit"):
                return 0
            if line.strip():
                _handle(session, line, stdout, interactive)
    finally:
        if save_history is not None:
            save_history()


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool, use_input: bool) -> str | None:
    """The next line without its newline; None at end of input."""
    if use_input:
        try:
            return input("> ")  # input() is what readline edits
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write("> ")
        stdout.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def _handle(session: ChatSession, text: str, stdout: TextIO, interactive: bool = False) -> None:
    try:
        if text.startswith("/"):
            stdout.write(_command(session, text) + "\n")
            return
        reply = session.send(text)
        if session.streamed:  # already printed as it came; end its line
            stdout.write("\n" if reply.strip() else EMPTY_REPLY + "\n")
        else:
            stdout.write(shown(reply) + "\n")
    except ChatSFTError as err:
        # Always one line: the session goes on with nothing changed.
        stdout.write("[chat] error: " + " ".join(str(err).split("\n")) + "\n")
    except KeyboardInterrupt:
        if not interactive:
            raise
        stdout.write("\n[chat] interrupted: that reply is dropped\n")
    stdout.flush()


def _command(session: ChatSession, line: str) -> str:
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name == "/reset":
        session.reset()
        return "[chat] conversation cleared"
    if name == "/system":
        session.system = rest or None
        return f"[chat] system message {'set' if rest else 'removed'}"
    if name == "/set" and not rest:
        return "[chat] " + ", ".join(f"{k}={v}" for k, v in session.knobs.items())
    if name == "/set":
        knob, _, value = rest.partition(" ")
        if not value.strip():
            raise ChatSFTError(
                "expected /set KNOB VALUE", field=knob, hint=f"knobs: {', '.join(KNOBS)}"
            )
        session.update_knobs({knob: value.strip()})
        return f"[chat] {knob} = {value.strip()}"
    if name == "/help":
        return HELP
    return f"[chat] unknown command {name}\n{HELP}"
