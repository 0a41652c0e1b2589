"""`chatsft chat`: a REPL over a model, keeping the conversation and rendering it with the chat
template the trainer used. Reads lines from any stream, so it also works from a pipe."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import torch

from .errors import ChatSFTError
from .generate import (
    ALIASES,
    KNOBS,
    add_knob_arguments,
    add_model_arguments,
    check_knobs,
    generate,
    knobs_from_args,
    load_for_inference,
)

HELP = """commands:
  /reset           forget the conversation (the system message stays)
  /system TEXT     set the system message (empty TEXT removes it)
  /set KNOB VALUE  change a decoding knob, e.g. /set top_p 0.9 (VALUE none unsets it)
  /set             show the knobs
  /quit            leave (end of input does too)"""


class ChatSession:
    """A conversation with a model: `send(text)` adds the user turn and returns the reply."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        knobs: dict[str, Any] | None = None,
        system: str | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatSFTError(
                "the tokenizer has no chat template, so there is no chat format",
                field="chat_template",
                hint="pass --chat-template, or use `chatsft generate --raw`",
            )
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self._set: dict[str, Any] = {}  # what the user set; `knobs` adds the resolved defaults
        self.knobs: dict[str, Any] = {}
        self.update_knobs(knobs or {})

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def send(self, text: str) -> str:
        user = {"role": "user", "content": text}
        knobs = {k: v for k, v in self.knobs.items() if k != "seed"}
        reply = generate(self.model, self.tokenizer, [[*self.messages(), user]], **knobs)[0].text
        # The reply goes into the history as decoded text: the next turn re-renders it with the
        # template, exactly the way the trainer rendered assistant turns.
        self.history += [user, {"role": "assistant", "content": reply}]
        return reply

    def reset(self) -> None:
        self.history = []

    def update_knobs(self, changes: dict[str, Any]) -> None:
        """Apply knob changes (None unsets); on an invalid result nothing changes."""
        merged = dict(self._set)
        for name, value in changes.items():
            name = ALIASES.get(name, name)
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                merged.pop(name, None)
            else:
                merged[name] = value
        self.knobs = check_knobs(merged)
        self._set = merged
        if "seed" in changes and self.knobs.get("seed") is not None:
            # Seeded once per session (not per reply), so replies differ but the session repeats.
            torch.manual_seed(self.knobs["seed"])


def run_repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> int:
    """Read lines until /quit or end of input; print one reply per user line."""
    interactive = stdin.isatty()
    if interactive:
        stdout.write("chat with the model; /help for commands\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        try:
            answer = _command(session, text) if text.startswith("/") else session.send(text)
        except ChatSFTError as err:
            answer = f"[chat] error: {err}"
        stdout.write(answer + "\n")
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


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a model in the terminal (or from a pipe)",
        description="Interactive chat with a model folder or LoRA adapter folder. Each input line "
        "is a user turn; the reply is printed. Commands: /reset, /system TEXT, /set KNOB VALUE, "
        "/quit.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", help="system message")
    add_knob_arguments(parser)
    parser.set_defaults(func=cmd_chat)
    return parser


def cmd_chat(args: argparse.Namespace) -> int:
    check_knobs(knobs_from_args(args))  # fail on a bad flag before the (slow) model load
    model, tokenizer = load_for_inference(
        args.model, dtype=args.dtype, device=args.device, chat_template_path=args.chat_template
    )
    session = ChatSession(model, tokenizer, knobs_from_args(args), system=args.system)
    return run_repl(session, sys.stdin, sys.stdout)
