"""The bad-input corpus (tests/bad_inputs/): every case is one clear line naming the file, row or
field, exit code 2, no traceback, and no output folder that looks like a finished model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import chats

from chatsft.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
TRAIN = ["train", "--model", "{model}", "--output_dir", "{out}", "--max_steps", "1"]


def data(name: str) -> list[str]:
    return [*TRAIN, "--dataset", f"{{dir}}/{name}"]


# (case, command line, text the error must contain)
CASES = [
    (
        "malformed JSON line",
        data("malformed_line.jsonl"),
        "malformed_line.jsonl, row 2: malformed JSON",
    ),
    ("wrong encoding", data("latin1.jsonl"), "latin1.jsonl: not UTF-8 text"),
    ("empty file", data("empty.jsonl"), "empty.jsonl, field 'dataset': file is empty"),
    (
        "unknown columns",
        data("unknown_columns.jsonl"),
        "cannot tell the data format from the columns ['foo']",
    ),
    (
        "content not a string",
        data("content_not_string.jsonl"),
        "content_not_string.jsonl, row 2, field 'messages[1].content': content must be a string",
    ),
    (
        "unknown role",
        data("unknown_role.jsonl"),
        "row 2, field 'messages[1].role': unknown role 'wizard'",
    ),
    (
        "empty content",
        data("empty_content.jsonl"),
        "row 2, field 'messages[1].content': content is empty",
    ),
    (
        "null content",
        data("null_content.jsonl"),
        "row 2, field 'messages[0].content': content is missing or null",
    ),
    (
        "no assistant turn",
        data("no_assistant_turn.jsonl"),
        "row 2, field 'messages': conversation has no assistant turn",
    ),
    (
        "tool message without a call",
        data("tool_without_call.jsonl"),
        "row 2, field 'messages[1]': a tool message must answer",
    ),
    (
        "messages not a list",
        data("messages_not_a_list.jsonl"),
        "row 1, field 'messages': expected a non-empty list",
    ),
    (
        "line not an object",
        data("line_not_an_object.jsonl"),
        "line_not_an_object.jsonl, row 1: expected a JSON object",
    ),
    (
        "null completion",
        data("null_completion.jsonl"),
        "row 1, field 'completion': expected a string, got NoneType",
    ),
    (
        "text not a string",
        data("text_not_a_string.jsonl"),
        "row 1, field 'text': expected a string, got int",
    ),
    (
        "unknown ShareGPT speaker",
        data("sharegpt_unknown_speaker.jsonl"),
        "field 'conversations[0].from': unknown speaker 'alien'",
    ),
    ("unsupported file type", data("data.txt"), "cannot load files of type ['.txt']"),
    (
        "data file not found",
        data("nope.jsonl"),
        "nope.jsonl, field 'dataset': file or folder not found",
    ),
    (
        "labels length mismatch",
        data("labels_length_mismatch.jsonl"),
        "row 1, field 'labels': has 2 entries but input_ids has 3",
    ),
    (
        "bad prompt template",
        [*data("query_response.jsonl"), "--prompt_template", "{{nothing}} {{query}}"],
        "row 1, field 'prompt_template'",
    ),
    (
        "broken chat template",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/broken_template.jinja"],
        "field 'chat_template': the chat template failed to render",
    ),
    (
        "template not prefix-preserving",
        [
            *data("multi_turn.jsonl"),
            "--chat_template_path",
            "{dir}/rewrites_turns.jinja",
            "--assistant_only_loss",
        ],
        "not prefix-preserving at message 1",
    ),
    (
        "chat template file missing",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/none.jinja"],
        "none.jinja, field 'chat_template_path': file not found",
    ),
    (
        "tokenizer without chat template",
        [*data("multi_turn.jsonl"), "--model", "{bare_model}"],
        "the tokenizer has no chat template",
    ),
    (
        "every row dropped",
        [*data("multi_turn.jsonl"), "--max_length", "3", "--overlong_policy", "drop"],
        "every row of the train data was dropped",
    ),
    (
        "over-long with policy error",
        [*data("multi_turn.jsonl"), "--max_length", "5", "--overlong_policy", "error"],
        "field 'max_length': example has",
    ),
    (
        "max_length below 1",
        ["train", "{dir}/max_length_zero.yaml"],
        "max_length must be a positive integer",
    ),
    (
        "batch size auto (an estimate option)",
        ["train", "{dir}/batch_size_auto.yaml"],
        "per_device_train_batch_size: auto is worked out by `chatsft estimate CONFIG",
    ),
    (
        "negative learning rate",
        ["train", "{dir}/negative_lr.yaml"],
        "learning_rate must be >= 0 (the step size), got -0.1",
    ),
    (
        "unknown YAML key",
        ["train", "{dir}/unknown_key.yaml"],
        "field 'learning_rat': unknown setting — did you mean 'learning_rate'?",
    ),
    ("invalid YAML", ["train", "{dir}/invalid_yaml.yaml"], "invalid_yaml.yaml: invalid YAML"),
    ("YAML not a mapping", ["train", "{dir}/not_a_mapping.yaml"], "expected a mapping of settings"),
    (
        "missing model",
        ["train", "{dir}/missing_model.yaml"],
        "field 'model_name_or_path': is required",
    ),
    (
        "bad truncation mode",
        ["train", "{dir}/bad_truncation_mode.yaml"],
        "truncation_mode must be one of",
    ),
    (
        "unknown dataset format",
        ["train", "{dir}/unknown_format.yaml"],
        "unknown dataset_format 'xml'",
    ),
    ("config file not found", ["train", "{dir}/nope.yaml"], "nope.yaml: config file not found"),
    (
        "unknown flag",
        [*data("multi_turn.jsonl"), "--lerning_rate", "1"],
        "field 'lerning_rate': unknown setting — did you mean 'learning_rate'?",
    ),
    (
        "model path missing",
        [*data("multi_turn.jsonl"), "--model", "{tmp}/no-model"],
        "no-model, field 'model': model path does not exist",
    ),
    (
        "model folder without config",
        [*data("multi_turn.jsonl"), "--model", "{dir}"],
        "folder has no config.json",
    ),
    (
        "output folder is a file",
        [*data("multi_turn.jsonl"), "--output_dir", "{dir}/data.txt"],
        "field 'output_dir': output_dir is a file",
    ),
    (
        "resume without checkpoint",
        [*data("multi_turn.jsonl"), "--resume"],
        "no checkpoint to resume from",
    ),
    (
        "bad generation knob",
        ["generate", "{model}", "--prompt", "hi", "--top-p", "3"],
        "field 'top_p'",
    ),
]


@pytest.fixture()
def corpus_env(tmp_path, model_dir):
    from transformers import AutoTokenizer

    # A model whose tokenizer has no chat template.
    bare = tmp_path / "bare-model"
    import shutil

    shutil.copytree(model_dir, bare)
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    # YAML cases name {model} and {data}; give them real paths.
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in chats(2)))
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    for path in corpus.glob("*.yaml"):
        path.write_text(path.read_text().replace("{model}", model_dir).replace("{data}", str(good)))
    return {
        "model": model_dir,
        "bare_model": str(bare),
        "dir": str(corpus),
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
    }


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert len(list(CORPUS.iterdir())) >= 28


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, argv, expected, corpus_env, capsys):
    code = main([a.format(**corpus_env) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("chatsft: error:")]
    assert len(lines) == 1, err
    out = Path(corpus_env["out"])
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


def test_debug_shows_the_traceback(corpus_env, capsys):
    argv = [a.format(**corpus_env) for a in data("unknown_role.jsonl")]
    assert main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_during_save_leaves_no_finished_looking_folder(corpus_env, capsys, monkeypatch):
    import transformers.modeling_utils

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # transformers writes weights through its own reference to safetensors' save_file.
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    argv = [a.format(**corpus_env) for a in data("multi_turn.jsonl")]
    code = main([*argv, "--save_strategy", "no"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device while saving the final model" in err
    assert "--resume" in err
    out = Path(corpus_env["out"])
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not os.path.exists(out / ".saving")  # the partial save is removed: it only takes space
