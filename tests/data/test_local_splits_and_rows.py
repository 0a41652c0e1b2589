"""Local data folders keep their splits apart (train/test files are never mixed), and rows that
TRL trains on (an empty system prompt, a Glaive-style tool reply) are accepted. Streamed rows are
named by file and row as map-style ones are, and take the same formatting_func results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import chats, offline_env, write_jsonl
from test_masks import prepare, trained_text

from chatsft import ChatSFTError
from chatsft.cli import main
from chatsft.cli.build import datasets_of
from chatsft.config import ScriptArguments, SFTConfig
from chatsft.data.encode import PrepOptions
from chatsft.data.load import load_data
from chatsft.data.prepare import prepare_for_training

EMPTY_SYSTEM = {
    "messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
}
# Glaive's function-calling layout: the call is written in the assistant's text, no tool_calls.
GLAIVE = {
    "messages": [
        {"role": "user", "content": "what is two plus three"},
        {"role": "assistant", "content": "<call>add two three</call>"},
        {"role": "tool", "content": "five"},
        {"role": "assistant", "content": "the answer is five"},
    ]
}


def tagged(n: int, tag: str) -> list[dict]:
    """n chats whose last reply names the file they came from, so a mix-up is visible."""
    rows = chats(n)
    for row in rows:
        row["messages"][-1]["content"] = tag
    return rows


def replies(data) -> list[str]:
    return [row["messages"][-1]["content"] for row in data]


@pytest.fixture()
def split_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", [*chats(4), EMPTY_SYSTEM, GLAIVE])
    write_jsonl(folder / "test.jsonl", tagged(2, "test"))
    write_jsonl(folder / "valid.jsonl", tagged(3, "valid"))
    return folder


def cli_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("chatsft: error:")]) == 1
    return err


@pytest.mark.slow
def test_cli_trains_on_the_train_file_and_evaluates_on_the_test_file(
    split_folder, model_dir, tmp_path
):
    # The train file also holds an empty system prompt and a Glaive tool reply: both train.
    argv = ["--model", model_dir, "--dataset", str(split_folder), "--eval_split", "test"]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_length", "64"]
    argv += ["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no"]
    argv += ["--report_to", "none", "--training_report", "false"]
    result = subprocess.run(
        [sys.executable, "-m", "chatsft", "train", *argv],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "train data: 6 rows read, 6 kept" in result.stdout, result.stdout
    assert "eval data: 2 rows read, 2 kept" in result.stdout, result.stdout


def test_dataset_split_picks_one_split_of_a_folder(split_folder, tmp_path):
    script = ScriptArguments(
        dataset_name=str(split_folder), dataset_train_split="validation", eval_split="test"
    )
    train, evaluation = datasets_of(script, SFTConfig(output_dir=str(tmp_path)))  # as train does
    assert replies(train) == ["valid"] * 3
    assert replies(evaluation) == ["test"] * 2
    assert len(load_data(str(split_folder))) == 6  # the default split is train
    assert len(load_data(str(split_folder), "train+test")) == 8
    assert len(load_data(str(split_folder), "validation", streaming=True).take(5).to_list()) == 3


def test_split_in_a_sub_folder_name(tmp_path):
    write_jsonl(tmp_path / "d" / "train" / "part-0.jsonl", chats(3))
    write_jsonl(tmp_path / "d" / "test" / "part-0.jsonl", tagged(1, "test"))
    assert len(load_data(str(tmp_path / "d"))) == 3
    assert replies(load_data(str(tmp_path / "d"), "test")) == ["test"]


def test_a_missing_split_is_one_clear_error(split_folder, model_dir, tmp_path, capsys):
    argv = ["train", "--model", model_dir, "--dataset", str(split_folder)]
    argv += ["--output_dir", str(tmp_path / "out"), "--eval_split", "dev_set"]
    err = cli_error(argv, capsys)
    assert f"{split_folder}: no 'dev_set' split; splits found: test, train, validation" in err
    assert not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(ChatSFTError, match="no 'train' split; splits found: test"):
        load_data(str(write_jsonl(tmp_path / "only" / "test.jsonl", chats(2)).parent))


def test_a_folder_without_split_names_is_all_train(tmp_path):
    write_jsonl(tmp_path / "d" / "part-a.jsonl", chats(2))
    write_jsonl(tmp_path / "d" / "more" / "part-b.jsonl", chats(3))
    assert len(load_data(str(tmp_path / "d"))) == 5
    with pytest.raises(ChatSFTError, match="no 'test' split; splits found: train"):
        load_data(str(tmp_path / "d"), "test")


def test_a_single_file_is_the_train_split(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", chats(4))  # its name does not make it "test"
    assert len(load_data(str(data))) == 4
    assert len(load_data(str(data), "train[:3]")) == 3
    with pytest.raises(ChatSFTError, match="a single file is the 'train' split"):
        load_data(str(data), "test")
    argv = ["train", "--model", model_dir, "--dataset", str(data), "--eval_split", "test"]
    err = cli_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert f"{data}: a single file is the 'train' split, so it has no 'test' split" in err


def test_an_empty_system_prompt_trains(tokenizer):
    ds, stats = prepare([EMPTY_SYSTEM], tokenizer, assistant_only_loss=True)
    full = tokenizer.apply_chat_template(EMPTY_SYSTEM["messages"], tokenize=False)
    assert tokenizer.decode(ds[0]["input_ids"]) == full
    assert full.startswith("<|im_start|>system\n<|im_end|>")
    assert trained_text(tokenizer, ds[0]) == ["yo<|im_end|>"]
    sharegpt = [{"from": "system", "value": ""}, {"from": "human", "value": "hi"}]
    sharegpt.append({"from": "gpt", "value": "yo"})
    same, _ = prepare([{"conversations": sharegpt}], tokenizer, assistant_only_loss=True)
    assert same[0]["input_ids"] == ds[0]["input_ids"]


def test_a_tool_reply_to_a_call_written_in_text_is_accepted(tokenizer):
    ds, _ = prepare([GLAIVE], tokenizer, assistant_only_loss=True)
    assert trained_text(tokenizer, ds[0]) == [
        "<call>add two three</call><|im_end|>",
        "the answer is five<|im_end|>",
    ]  # the tool's reply is context, not trained


@pytest.mark.parametrize(
    "messages,field,message",
    [
        ([{"role": "tool", "content": "5"}], "messages[0]", "a tool message must answer"),
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}],
            "messages[1]",
            "a tool message must answer",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
            "messages[1].content",
            "content is empty",
        ),
        (
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}],
            "messages[0].content",
            "content is empty",
        ),
    ],
    ids=["tool first", "tool after user", "empty assistant reply", "empty user turn"],
)
def test_rows_that_are_still_malformed(tokenizer, messages, field, message):
    with pytest.raises(ChatSFTError, match=re.escape(f"row 1, field '{field}': {message}")):
        prepare([{"messages": messages}], tokenizer)


def stream_of(path: Path, tokenizer, **kw):
    from chatsft.data.streaming import ConstantLengthDataset

    opts = PrepOptions(eos_token=tokenizer.eos_token, max_length=64)
    return ConstantLengthDataset(load_data(str(path), streaming=True), tokenizer, opts, **kw)


@pytest.mark.parametrize("bad_row,buffer_size", [(1, 8), (3, 2)], ids=["first row", "next buffer"])
def test_a_streamed_bad_row_is_named_by_file_and_row(tmp_path, tokenizer, bad_row, buffer_size):
    rows = chats(4)
    rows[bad_row - 1]["messages"][0]["role"] = "wizard"
    data = write_jsonl(tmp_path / "stream.jsonl", rows)
    stream = stream_of(data, tokenizer, buffer_size=buffer_size)
    expected = f"{data}, row {bad_row}, field 'messages[0].role': unknown role 'wizard'"
    with pytest.raises(ChatSFTError, match=re.escape(expected)):
        list(stream)
    # The map path names the same row.
    with pytest.raises(ChatSFTError, match=re.escape(f"row {bad_row}, field 'messages[0].role'")):
        prepare(rows, tokenizer)


def test_streamed_rows_name_what_they_can(tmp_path, tokenizer):
    from chatsft.data.streaming import ConstantLengthDataset, stream_source

    opts = PrepOptions(eos_token=tokenizer.eos_token, max_length=64)
    rows = [*chats(1), {"messages": [{"role": "user", "content": "hi"}]}]  # no reply
    with pytest.raises(ChatSFTError, match=r"^row 2, field 'messages': conversation has no"):
        list(ConstantLengthDataset(iter(rows), tokenizer, opts))  # plain Python rows: no file
    given = ConstantLengthDataset(iter(rows), tokenizer, opts, source="mine.jsonl")
    with pytest.raises(ChatSFTError, match=r"^mine.jsonl, row 2, field 'messages'"):
        list(given)
    # A folder of files names the folder; a shuffled stream says its rows are counted shuffled.
    write_jsonl(tmp_path / "d" / "part-a.jsonl", chats(2))
    write_jsonl(tmp_path / "d" / "part-b.jsonl", chats(2))
    folder = load_data(str(tmp_path / "d"), streaming=True)
    assert stream_source(folder) == str(tmp_path / "d")
    assert stream_source(folder.shuffle(seed=0)).endswith(" (rows counted in shuffled order)")


def test_a_streamed_file_that_cannot_be_read_is_named(tmp_path, tokenizer):
    data = tmp_path / "ragged.csv"
    data.write_text("prompt,completion\nhi,yo\nwhat is two, plus two,four\n")
    with pytest.raises(ChatSFTError, match=r"ragged.csv, row 2: 3 fields but the header has 2"):
        list(stream_of(data, tokenizer))


def test_streaming_takes_a_formatting_func_returning_a_one_element_list(tmp_path, tokenizer):
    """Older TRL formatting funcs return [text]: text on the map path, and now when streaming."""

    def formatting_func(row):
        return [f"question : {row['q']} answer : {row['a']}"]

    rows = [{"q": "what is two", "a": "four"}, {"q": "what is three", "a": "five"}]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    streamed = list(stream_of(data, tokenizer, packing=False, formatting_func=formatting_func))
    opts = PrepOptions(eos_token=tokenizer.eos_token, max_length=64)
    mapped, _ = prepare_for_training(
        datasets.Dataset.from_list(rows), tokenizer, opts, formatting_func=formatting_func
    )
    assert [r["input_ids"] for r in streamed] == mapped["input_ids"]
    assert tokenizer.decode(streamed[0]["input_ids"]).startswith("question : what is two")
