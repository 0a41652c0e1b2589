"""`chatsft generate` / `chatsft chat` through build_*_parser and run_*: TRL's underscore flags with
dashed aliases, and every bad input as one `chatsft: error:` line with exit code 2."""

from __future__ import annotations

import dataclasses
import io
import shutil

import pytest
import torch

from chatsft.generation.chat import EMPTY_REPLY
from chatsft.generation.cli import (
    ChatArguments,
    GenerateArguments,
    build_chat_parser,
    build_generate_parser,
    run_chat,
    run_generate,
)
from chatsft.generation.knobs import KNOBS


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def parse(command: str, *argv: str):
    build = {"generate": build_generate_parser, "chat": build_chat_parser}[command]
    (args,) = build().parse_args_into_dataclasses(list(argv))
    return args


def run(command: str, *argv: str, stdin: str = "") -> int:
    args = parse(command, *argv)
    if command == "chat":
        return run_chat(args, stdin=io.StringIO(stdin), stdout=None)
    return run_generate(args)


# --- parsing ---------------------------------------------------------------------------------------


def test_every_knob_is_a_flag_in_both_spellings():
    for cls in (GenerateArguments, ChatArguments):
        assert set(KNOBS) <= {f.name for f in dataclasses.fields(cls)}
    values = {"max_new_tokens": "7", "top_p": "0.5", "num_beams": "3", "early_stopping": "never"}
    for name, value in values.items():
        underscore = parse("generate", "m", f"--{name}", value)
        dashed = parse("generate", "m", f"--{name.replace('_', '-')}", value)
        assert underscore == dashed and getattr(dashed, name) is not None


def test_the_old_spellings_still_parse():
    old = parse(
        "generate",
        *["--prompt", "a", "--raw", "out/", "--prompt", "b", "--max-new-tokens", "3"],
        *["--do-sample", "--stop", "x", "--stop", "y", "--chat-template", "t.jinja"],
        *["--batch-size", "2", "--top-p", "0.9", "--num-return-sequences", "2"],
    )
    assert (old.model_name_or_path, old.prompt, old.raw, old.do_sample) == (
        "out/",
        ["a", "b"],
        True,
        True,
    )
    assert old.stop_strings == ["x", "y"] and old.chat_template_path == "t.jinja"
    assert old.knobs() == {
        "max_new_tokens": 3,
        "do_sample": True,
        "top_p": 0.9,
        "num_return_sequences": 2,
        "stop_strings": ["x", "y"],
    }
    new = parse("generate", "--model_name_or_path", "out/", "--prompt", "a", "--do_sample", "false")
    assert (new.model_name_or_path, new.do_sample, new.batch_size) == ("out/", False, 8)
    assert parse("chat", "out/", "--no-stream").stream is False
    assert parse("chat", "--model", "out/", "--no_stream").stream is False
    assert parse("chat", "out/").stream is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--max_new_tokens", "many"], "argument --max_new_tokens/--max-new-tokens: invalid"),
        (["m", "--top-p", "high"], "invalid float value: 'high'"),
        (["m", "--do_sample=maybe"], "Truthy value expected: got maybe"),
        (["--prompt", "hi"], "required: MODEL (or --model_name_or_path)"),
        (["m", "--model_name_or_path", "n"], "give the model once"),
        (["m", "--top_pp", "0.5"], "unrecognized arguments: --top_pp 0.5"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(argv, message, capsys):
    from chatsft.cli import main

    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatsft: error: ") and err.count("\n") == 1, err
    assert message in err


# --- running ---------------------------------------------------------------------------------------


@pytest.fixture()
def folders(tmp_path, model_dir):
    """{model}: a model folder; {notok}: the same without its tokenizer; {trunc}: weights cut off
    halfway, as by an interrupted copy."""
    notok, trunc = tmp_path / "notok", tmp_path / "trunc"
    shutil.copytree(model_dir, notok)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (notok / name).unlink(missing_ok=True)
    shutil.copytree(model_dir, trunc)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"model": model_dir, "notok": str(notok), "trunc": str(trunc)}


NO_GPU = "cuda" if not torch.cuda.is_available() else "cuda:99"
RAW = ["--prompt", "the cat sat on the mat", "--raw"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["generate", "{model}", *RAW, "--max_length", "2"],
            "field 'max_length': must be at least the prompt length + 1 = ",
        ),
        (
            ["generate", "{model}", *RAW, "--max_new_tokens", "100000"],
            "field 'max_new_tokens': is 100000, but the prompt is",
        ),
        (
            ["generate", "{model}", *RAW, "--min_new_tokens", "9", "--max_new_tokens", "4"],
            "field 'min_new_tokens': is larger than max_new_tokens (4)",
        ),
        (
            ["generate", "{model}", *RAW, "--min_length", "600"],
            "field 'min_length': is more than the prompt + max_new_tokens can reach",
        ),
        (["generate", "{model}", *RAW, "--device", "gpu"], "field 'device': unknown device 'gpu'"),
        (["generate", "{model}", *RAW, "--device", NO_GPU], f"field 'device': '{NO_GPU}' was"),
        (
            ["generate", "{model}", *RAW, "--dtype", "fp8"],
            "field 'dtype': unknown dtype 'fp8' — use float32, bfloat16, float16, auto",
        ),
        (["generate", "{model}", "--prompt", "", "--raw"], "field 'prompt': is empty"),
        (["generate", "{notok}", *RAW], "field 'tokenizer': the folder has no tokenizer"),
        (["generate", "{trunc}", *RAW], "field 'weights': the weights file is truncated"),
        (["chat", "{model}", "--max_length", "2"], "field 'max_length': must be at least"),
        (["chat", "{model}", "--device", "gpu"], "field 'device': unknown device 'gpu'"),
        (["chat", "{notok}"], "field 'tokenizer': the folder has no tokenizer"),
    ],
    ids=[
        "max_length below prompt",
        "max_new_tokens past context",
        "min_new_tokens over max",
        "min_length unreachable",
        "unknown device",
        "cuda without gpu",
        "unknown dtype",
        "empty raw prompt",
        "no tokenizer",
        "truncated weights",
        "chat max_length",
        "chat device",
        "chat no tokenizer",
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, folders, capsys):
    code = run(*[a.format(**folders) for a in argv], stdin="hi\n")
    captured = capsys.readouterr()
    # Loading may draw transformers' progress bar on stderr; the error itself is one line.
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("chatsft: error: "), captured
    assert expected in errors[0], errors[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_chat_streams_exactly_what_it_prints_without_streaming(model_dir, capsys):
    lines = "hi\nthe cat\n"
    assert run("chat", model_dir, "--max_new_tokens", "5", stdin=lines) == 0
    streamed = capsys.readouterr().out
    assert run("chat", model_dir, "--max_new_tokens", "5", "--no_stream", stdin=lines) == 0
    assert streamed == capsys.readouterr().out and streamed.count("\n") >= 2


def test_generate_prints_an_empty_reply_as_such(tmp_path, tokenizer, capsys):
    from conftest import make_model

    model = make_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # greedy picks token 0, a special token: "" once decoded
    folder = tmp_path / "mute"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert run("generate", str(folder), "--prompt", "hi", "--max_new_tokens", "3") == 0
    assert capsys.readouterr().out == f"{EMPTY_REPLY}\n"
