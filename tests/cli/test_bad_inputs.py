"""The bad-input corpus (tests/fixtures/bad_inputs/): every case is one clear line naming the file, row or
field, exit code 2, no traceback, and no output folder that looks like a finished model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import FIXTURES, chats

from chatsft.cli import main
from chatsft.data import templates

CORPUS = FIXTURES / "bad_inputs"
TRAIN = ["train", "--model", "{model}", "--output_dir", "{out}", "--max_steps", "1"]


def data(name: str) -> list[str]:
    return [*TRAIN, "--dataset", f"{{dir}}/{name}"]


# A streamed row fails once training has started, with the Trainer's progress bar drawn on the
# same line as the error; without the bar the line can be checked as every other.
STREAM = ["--streaming", "--disable_tqdm", "true"]


# (case, command line, text the error must contain)
CASES = [
    (
        "malformed JSON line",
        data("malformed_line.jsonl"),
        "malformed_line.jsonl, row 2: malformed JSON",
    ),
    (
        "wrong encoding",
        data("latin1.jsonl"),
        "latin1.jsonl, row 2: not UTF-8 text (invalid continuation byte at byte 103)",
    ),
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
        "field 'chat_template': the chat template is not valid Jinja at template line 1: unexpected '}'",
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
    # Files datasets cannot read: named by row and line or byte, not "An error occurred while
    # generating the dataset".
    (
        "ragged CSV",
        data("ragged.csv"),
        "ragged.csv, row 2: 3 fields but the header has 2 (line 3)",
    ),
    (
        "JSON array not UTF-8",
        data("not_utf8.json"),
        "not_utf8.json: not UTF-8 text (invalid continuation byte at line 3, byte 35)",
    ),
    (
        "truncated JSON array",
        data("truncated.json"),
        "truncated.json, row 2: malformed JSON at line 3, column 12 (byte 40): Unterminated string",
    ),
    (
        "truncated JSONL line",
        data("truncated_line.jsonl"),
        "truncated_line.jsonl, row 2: malformed JSON at column 10 (byte 33): Unterminated string",
    ),
    (
        "JSON array with a trailing comma",
        data("trailing_comma.json"),
        "trailing_comma.json, row 2: malformed JSON at line 3, column 1 (byte 29)",
    ),
    (
        "JSON array item not an object",
        data("not_an_object.json"),
        "not_an_object.json, row 2: expected a JSON object, got str",
    ),
    (
        "key twice in one row",
        data("duplicate_key.jsonl"),
        "duplicate_key.jsonl, row 1: the key 'text' appears twice in one object",
    ),
    (
        "lone surrogate escape",
        data("lone_surrogate.jsonl"),
        "lone_surrogate.jsonl, row 2, field 'text': a string holds a lone UTF-16 surrogate",
    ),
    (
        "only blank lines",
        data("blank_lines.jsonl"),
        "blank_lines.jsonl, field 'dataset': file has no rows, only blank lines",
    ),
    (
        "empty JSON array",
        data("empty_array.json"),
        "empty_array.json, field 'dataset': file has no rows",
    ),
    (
        "CSV header only",
        data("header_only.csv"),
        "header_only.csv, field 'dataset': file has no rows",
    ),
    (
        "CSV not UTF-8",
        data("latin1.csv"),
        "latin1.csv: not UTF-8 text (invalid continuation byte at line 3, byte 27)",
    ),
    (
        "CSV quote never closed",
        data("unclosed_quote.csv"),
        "unclosed_quote.csv, row 1: malformed CSV at line 2: a quote is never closed",
    ),
    (
        "UTF-16 JSON Lines",
        data("utf16.jsonl"),
        "utf16.jsonl, row 1: not UTF-8 text (invalid start byte at byte 0)",
    ),
    ("gzip data named .jsonl", data("gzipped.jsonl"), "gzipped.jsonl, row 1: not UTF-8 text"),
    (
        "NUL bytes for a line",
        data("nul_line.jsonl"),
        "nul_line.jsonl, row 2: malformed JSON at column 1",
    ),
    (
        "not a Parquet file",
        data("not_parquet.parquet"),
        "not_parquet.parquet, field 'dataset': could not read the data: Parquet magic bytes",
    ),
    (
        "files with other columns",
        data("mixed_columns"),
        "part-b.jsonl: its columns ['text'] differ from part-a.jsonl's ['messages']",
    ),
    (
        "folder without data files",
        data("no_data"),
        "no_data, field 'dataset': no .jsonl, .json, .csv or .parquet files found",
    ),
    (
        "split selects no rows",
        [*data("multi_turn.jsonl"), "--dataset_split", "train[:0]"],
        "the split 'train[:0]' selects no rows",
    ),
    (
        "split missing from a folder",
        [*data("mixed_columns"), "--dataset_split", "validation"],
        "no 'validation' split; splits found: train",
    ),
    (
        "malformed eval data",
        [*data("multi_turn.jsonl"), "--eval_dataset", "{dir}/ragged.csv"],
        "ragged.csv, row 2: 3 fields but the header has 2",
    ),
    # Nesting: a depth limit, not a RecursionError.
    (
        "JSONL value nested 100,000 deep",
        data("deep_100k.jsonl"),
        "deep_100k.jsonl, row 2, field 'messages': nested more than 32 levels deep",
    ),
    (
        "JSON array value nested 100,000 deep",
        data("deep_100k.json"),
        "deep_100k.json, row 2, field 'messages': nested more than 32 levels deep",
    ),
    (
        "value nested past pyarrow's limit",
        data("deep_for_pyarrow.jsonl"),
        "deep_for_pyarrow.jsonl, row 2, field 'messages': nested more than 32 levels deep",
    ),
    (
        "tool schema nested 40 deep",
        data("deep_tools.jsonl"),
        "deep_tools.jsonl, row 2, field 'tools': nested more than 32 levels deep",
    ),
    (
        "tool calls nested 40 deep",
        data("deep_tool_calls.jsonl"),
        "deep_tool_calls.jsonl, row 1, field 'messages': nested more than 32 levels deep",
    ),
    # Rows
    (
        "negative token id",
        data("negative_id.jsonl"),
        "row 1, field 'input_ids': token id -5 is negative",
    ),
    (
        "label neither a token id nor -100",
        data("bad_label.jsonl"),
        "row 1, field 'labels': label -1 is neither a token id nor -100",
    ),
    (
        "labels nested",
        data("nested_labels.jsonl"),
        "row 1, field 'labels': expected a list of token ids and -100, got list of list",
    ),
    (
        "token ids not integers",
        data("float_ids.jsonl"),
        "row 1, field 'input_ids': expected a non-empty list of token ids",
    ),
    (
        "no token ids",
        data("empty_ids.jsonl"),
        "row 1, field 'input_ids': expected a non-empty list of token ids",
    ),
    (
        "mask not a list",
        data("mask_not_a_list.jsonl"),
        "row 1, field 'completion_mask': expected a list of 0/1 flags, got int",
    ),
    (
        "mask length mismatch",
        data("mask_length_mismatch.jsonl"),
        "row 1, field 'completion_mask': has 2 entries but input_ids has 3",
    ),
    (
        "tool calls as a string",
        data("tool_calls_string.jsonl"),
        "row 1, field 'messages[1].tool_calls': tool_calls must be a list of {type, function} "
        "objects, got str",
    ),
    (
        "tools string not JSON",
        data("tools_not_json.jsonl"),
        "row 1, field 'tools': tools is a string but not JSON",
    ),
    (
        "tools not schemas",
        data("tools_not_schemas.jsonl"),
        "row 1, field 'tools': tools must be a list of JSON schemas",
    ),
    (
        "chat_template_kwargs a list",
        data("template_kwargs_list.jsonl"),
        "row 1, field 'chat_template_kwargs': chat_template_kwargs must be a mapping",
    ),
    (
        "no messages",
        data("messages_empty.jsonl"),
        "row 1, field 'messages': expected a non-empty list",
    ),
    (
        "message is a string",
        data("message_is_a_string.jsonl"),
        "row 1, field 'messages[0]': expected a {role, content} object, got str",
    ),
    (
        "role missing",
        data("role_missing.jsonl"),
        "row 1, field 'messages[0].role': unknown role None",
    ),
    (
        "multimodal content",
        data("multimodal_content.jsonl"),
        "row 1, field 'messages[0].content': content must be a string, got list",
    ),
    (
        "ShareGPT turn a string",
        data("sharegpt_turn_a_string.jsonl"),
        "row 1, field 'conversations[0].from': unknown speaker None",
    ),
    (
        "ShareGPT null value",
        data("sharegpt_null_value.jsonl"),
        "row 1, field 'messages[0].content': content is missing or null",
    ),
    (
        "chat prompt, plain completion",
        data("prompt_list_completion_string.jsonl"),
        "row 1, field 'completion': expected a non-empty list",
    ),
    ("empty query", data("empty_query.jsonl"), "row 1, field 'query': is empty"),
    ("blank text", data("blank_text.jsonl"), "row 1, field 'text': is empty"),
    ("NaN for text", data("nan_text.jsonl"), "row 1, field 'text': expected a string, got float"),
    (
        "dataset_format text on chat rows",
        [*data("multi_turn.jsonl"), "--dataset_format", "text"],
        "row 1, field 'text': expected a string, got NoneType",
    ),
    (
        "dataset_text_field not a column",
        [*data("text.jsonl"), "--dataset_text_field", "body"],
        "cannot tell the data format from the columns ['text'] — expected a 'body' column",
    ),
    (
        "column_map names a missing column",
        [*data("multi_turn.jsonl"), "--column_map", '{{"question": "prompt"}}'],
        "field 'column_map': column_map names columns ['question']",
    ),
    # Streaming names the file and the row, counted from 1 (once), as the map path does.
    (
        "streamed bad row",
        [*data("unknown_role.jsonl"), *STREAM],
        "unknown_role.jsonl, row 2, field 'messages[1].role': unknown role 'wizard'",
    ),
    (
        "streamed ragged CSV",
        [*data("ragged.csv"), *STREAM],
        "ragged.csv, row 2: 3 fields but the header has 2 (line 3)",
    ),
    (
        "streamed truncated JSON array",
        [*data("truncated.json"), *STREAM],
        "truncated.json, row 2: malformed JSON at line 3, column 12",
    ),
    # Chat templates: a time limit per example, and the row they failed on.
    (
        "template loops forever",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/endless_loop.jinja"],
        "multi_turn.jsonl, row 1, field 'chat_template': the chat template took more than 1 s to "
        "render one example (still running at template line 1)",
    ),
    (
        "template loops forever, transformers' render",
        [*data("reasoning_rows.jsonl"), "--chat_template_path", "{dir}/endless_loop.jinja"],
        "reasoning_rows.jsonl, row 1, field 'chat_template': the chat template took more than 1 s",
    ),
    (
        "template loops forever while streaming",
        [
            *data("multi_turn.jsonl"),
            "--chat_template_path",
            "{dir}/endless_loop.jinja",
            *STREAM,
        ],
        "multi_turn.jsonl, row 1, field 'chat_template': the chat template took more than 1 s",
    ),
    (
        "template calls itself",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/recursive_macro.jinja"],
        "row 1, field 'chat_template': the chat template failed to render at template line 1: "
        "a macro calls itself without end",
    ),
    (
        "template raises on row 3",
        [*data("three_rows_boom.jsonl"), "--chat_template_path", "{dir}/raises_on_boom.jinja"],
        "three_rows_boom.jsonl, row 3, field 'chat_template': the chat template failed to render "
        "at template line 1: no boom allowed",
    ),
    (
        "template range too big",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/huge_range.jinja"],
        "row 1, field 'chat_template': the chat template failed to render at template line 1: "
        "Range too big",
    ),
    (
        "template reaches into Python",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/unsafe_attribute.jinja"],
        "access to attribute '__class__' of 'str' object is unsafe",
    ),
    (
        "template reads a missing attribute",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/undefined_attribute.jinja"],
        "'dict object' has no attribute 'nope'",
    ),
    (
        "empty template file",
        [*data("multi_turn.jsonl"), "--chat_template_path", "{dir}/empty_template.jinja"],
        "the tokenizer has no chat template",
    ),
    # Settings, refused before anything loads.
    (
        "batch size 0",
        [*data("multi_turn.jsonl"), "--per_device_train_batch_size", "0"],
        "per_device_train_batch_size must be >= 1",
    ),
    (
        "gradient accumulation 0",
        [*data("multi_turn.jsonl"), "--gradient_accumulation_steps", "0"],
        "gradient_accumulation_steps must be >= 1",
    ),
    (
        "negative epochs",
        [*data("multi_turn.jsonl"), "--num_train_epochs", "-1"],
        "num_train_epochs must be >= 0",
    ),
    (
        "max_steps below -1",
        [*data("multi_turn.jsonl"), "--max_steps", "-5"],
        "max_steps must be a positive number of optimizer steps, or -1",
    ),
    (
        "learning rate not a number",
        [*data("multi_turn.jsonl"), "--learning_rate", "fast"],
        "invalid float value: 'fast'",
    ),
    (
        "max_length not a number",
        [*data("multi_turn.jsonl"), "--max_length", "abc"],
        "max_length must be a positive integer or None, got 'abc'",
    ),
    (
        "packing without max_length",
        [*data("multi_turn.jsonl"), "--packing", "--max_length", "none"],
        "packing needs max_length",
    ),
    (
        "eval_fraction above 1",
        [*data("multi_turn.jsonl"), "--eval_fraction", "1.5"],
        "eval_fraction must be between 0 and 1, got 1.5",
    ),
    (
        "unknown overlong_policy",
        [*data("multi_turn.jsonl"), "--overlong_policy", "explode"],
        "overlong_policy must be one of",
    ),
    (
        "unknown packing_strategy",
        [*data("multi_turn.jsonl"), "--packing_strategy", "magic"],
        "packing_strategy must be one of",
    ),
    (
        "LoRA rank 0",
        [*data("multi_turn.jsonl"), "--use_peft", "--lora_r", "0"],
        "lora_r must be >= 1, got 0",
    ),
    (
        "LoRA dropout above 1",
        [*data("multi_turn.jsonl"), "--use_peft", "--lora_dropout", "1.5"],
        "lora_dropout must be in [0, 1), got 1.5",
    ),
    (
        "negative weight decay",
        [*data("multi_turn.jsonl"), "--weight_decay", "-1"],
        "weight_decay must be >= 0",
    ),
    (
        "unknown scheduler",
        [*data("multi_turn.jsonl"), "--lr_scheduler_type", "wobbly"],
        "invalid choice: 'wobbly'",
    ),
    (
        "bad boolean",
        [*data("multi_turn.jsonl"), "--completion_only_loss", "maybe"],
        "Truthy value expected: got maybe",
    ),
    (
        "stream split by eval_fraction",
        [*data("multi_turn.jsonl"), "--streaming", "--eval_fraction", "0.5"],
        "eval_fraction cannot split a stream",
    ),
    (
        "stream without max_steps",
        [*data("multi_turn.jsonl"), "--streaming", "--max_steps", "-1"],
        "streaming data has no length, so the run needs max_steps",
    ),
    (
        "eval split of a single file",
        [*data("multi_turn.jsonl"), "--eval_split", "test"],
        "a single file is the 'train' split, so it has no 'test' split",
    ),
    (
        "YAML list for one value",
        ["train", "{dir}/list_value.yaml"],
        "field 'learning_rate': expected one value, got a list",
    ),
    ("YAML not UTF-8", ["train", "{dir}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    (
        "empty YAML",
        ["train", "{dir}/empty.yaml"],
        "field 'model_name_or_path': is required",
    ),
    ("misspelt command", ["trian"], "unknown command 'trian' — did you mean 'train'?"),
]

# Generated into the corpus copy rather than stored: 200 kB each of brackets.
GENERATED = {
    "deep_100k.jsonl": '{"text": "ok"}\n{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    "deep_100k.json": '[{"text": "ok"},\n {"messages": ' + "[" * 100_000 + "]" * 100_000 + "}]\n",
}


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
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # the not-UTF-8 case itself
            continue
        path.write_text(text.replace("{model}", model_dir).replace("{data}", str(good)))
    for name, text in GENERATED.items():
        (corpus / name).write_text(text)
    return {
        "model": model_dir,
        "bare_model": str(bare),
        "dir": str(corpus),
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
    }


def test_corpus_has_at_least_80_cases():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)
    assert len(list(CORPUS.iterdir())) >= 80


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(case, argv, expected, corpus_env, capsys, monkeypatch):
    # Templates that never end are stopped after 1 s here, not the default 10 s.
    monkeypatch.setattr(templates, "RENDER_TIME_LIMIT_S", 1.0)
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
