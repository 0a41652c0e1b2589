"""The chat session and REPL: streamed replies, "(empty reply)", bad /set lines, line editing."""

from __future__ import annotations

import builtins
import io
import sys

import pytest
import torch
from conftest import WORDS, make_model

from chatsft.generation.chat import (
    EMPTY_REPLY,
    ChatSession,
    enable_line_editing,
    run_repl,
    shown,
)
from chatsft.generation.generate import ReplyStreamer, generate

USER = [{"role": "user", "content": "what is two plus three"}]

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(io.StringIO):
    """A stream that notes, for each write, how many forward passes the model had run by then."""

    def __init__(self, steps: list[int]) -> None:
        super().__init__()
        self.steps, self.writes = steps, []

    def write(self, text: str) -> int:
        self.writes.append((len(self.steps), text))
        return super().write(text)


def count_forwards(model) -> list[int]:
    steps: list[int] = []
    model.register_forward_hook(lambda *_: steps.append(1))
    return steps


def mute(model) -> None:
    """Every logit 0: greedy picks token 0, a special token, so every reply decodes to ""."""
    with torch.no_grad():
        model.lm_head.weight.zero_()


@pytest.fixture()
def repeater(tokenizer):
    """A model trained (plain torch, ~0.2 s) to continue 'w w w' with w forever: its replies are
    words, which TextStreamer releases one at a time."""
    model = make_model(tokenizer)
    rows = torch.tensor([tokenizer(" ".join([w] * 12))["input_ids"][:12] for w in WORDS])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_replies_stream_while_they_are_generated(repeater, tokenizer):
    steps = count_forwards(repeater)
    out = Recorder(steps)
    streamer = ReplyStreamer(tokenizer, out)
    result = generate(repeater, tokenizer, ["dog dog"], max_new_tokens=12, streamer=streamer)[0]
    assert out.getvalue() == streamer.text == result.text == " dog" * 12
    # Word by word, each written right after the forward pass that made it (not all at the end).
    assert [text for _, text in out.writes] == [" dog"] * 12
    assert [step for step, _ in out.writes] == list(range(1, 13))


def test_streamed_text_stops_where_the_reply_is_cut(model, tokenizer):
    full = generate(model, tokenizer, [USER], max_new_tokens=12)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = io.StringIO()
    streamer = ReplyStreamer(tokenizer, out, [stop])
    cut = generate(
        model, tokenizer, [USER], max_new_tokens=12, stop_strings=stop, streamer=streamer
    )
    assert cut[0].text == full[: full.find(stop)] == out.getvalue()
    assert cut[0].generations[0].finish_reason == "stop_string"


def test_chat_streams_the_reply_it_keeps(model, tokenizer):
    out = io.StringIO()
    session = ChatSession(model, tokenizer, {"max_new_tokens": 6}, stream=out)
    assert run_repl(session, io.StringIO("hi\n"), out) == 0
    reply = session.history[-1]["content"]
    assert reply and out.getvalue() == reply + "\n" and session.streamed
    # Beam search cannot stream: the reply is printed when it is complete.
    session.update_knobs({"num_beams": "2"})
    session.send("hi")
    assert not session.streamed


@pytest.mark.parametrize("stream", [True, False])
def test_an_empty_reply_says_so(model, tokenizer, stream):
    mute(model)
    out = io.StringIO()
    session = ChatSession(model, tokenizer, {"max_new_tokens": 3}, stream=out if stream else None)
    assert run_repl(session, io.StringIO("hi\nyo\n"), out) == 0
    assert out.getvalue() == f"{EMPTY_REPLY}\n{EMPTY_REPLY}\n"
    assert session.history == []  # an empty turn would make the next prompt invalid


def test_a_bad_set_is_one_line_and_the_session_goes_on(model, tokenizer):
    session = ChatSession(model, tokenizer, {"max_new_tokens": 4}, system="be brief")
    lines = [
        "/set max_length 2",  # shorter than the conversation's next prompt
        "/set top_pp 0.5",  # unknown knob
        "/set top_p lots",  # not a number
        "/set max_new_tokens 100000",  # more than the model's context (512)
        "/set num_beams",  # no value
        "hi",
        "/set max_length 200",  # replaces max_new_tokens: they are two ways to give one limit
    ]
    out = io.StringIO()
    assert run_repl(session, io.StringIO("\n".join(lines) + "\n"), out) == 0
    assert len(session.history) == 2  # the reply after the errors
    # Take the reply out (a random model's reply may hold any character); the rest is one line each.
    printed = out.getvalue().replace(shown(session.history[1]["content"]) + "\n", "", 1)
    errors = printed.splitlines()[:-1]
    assert len(errors) == 5 and all(e.startswith("[chat] error: ") for e in errors), printed
    for error, expected in zip(
        errors,
        [
            "field 'max_length': must be at least the prompt length + 1",
            "field 'top_pp': unknown generation knob — did you mean 'top_p'?",
            "field 'top_p': expected a number, got 'lots'",
            "field 'max_new_tokens': is 100000, but the prompt is",
            "expected /set KNOB VALUE",
        ],
    ):
        assert expected in error
    assert printed.splitlines()[-1] == "[chat] max_length = 200"
    assert session.knobs == {"max_length": 200}


def test_line_editing_and_history_on_a_terminal(model, tokenizer, monkeypatch, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    typed = iter(["/set top_k 5", "/quit"])
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(typed)

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = io.StringIO()
    session = ChatSession(model, tokenizer, {"max_new_tokens": 2})
    assert run_repl(session, sys.stdin, out) == 0
    assert prompts == ["> ", "> "] and "[chat] top_k = 5" in out.getvalue()
    history = tmp_path / "chatsft" / "chat_history"
    try:
        import readline  # noqa: F401
    except ImportError:
        assert not history.exists()
    else:
        assert history.exists()


def test_no_readline_no_crash(model, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "readline", None)  # makes `import readline` fail
    save = enable_line_editing(str(tmp_path / "history"))
    save()
    assert not (tmp_path / "history").exists()
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    session = ChatSession(model, tokenizer, {"max_new_tokens": 2})
    assert run_repl(session, sys.stdin, io.StringIO(), history_file=str(tmp_path / "h")) == 0
