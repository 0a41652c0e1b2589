"""`chatsft inspect`: its counts are preparation's counts, its trained/masked marks are the
collator's labels (terminal and HTML, checked in a real browser), and its warnings fire."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, chats, dump_dom, needs_chromium, trained_mask_of, write_jsonl
from transformers import AutoTokenizer

from chatsft.cli import main
from chatsft.cli.inspect import parse_inspect
from chatsft.config import ScriptArguments, SFTConfig
from chatsft.data.encode import prep_options_of
from chatsft.data.formats import detect_format, normalize
from chatsft.data.load import load_data
from chatsft.data.packing import pack_dataset
from chatsft.data.prepare import prepare_for_training
from chatsft.data.tokenize import trained_of
from chatsft.inspect import (
    ANSI_MASKED,
    ANSI_TRAINED,
    attributed_tokens,
    collator_trained,
    inspect_run,
    render_terminal,
    trained_positions,
    use_color,
)
from chatsft.model.load import load_tokenizer
from chatsft.train.build import prep_options

EXAMPLE_CONFIG = ROOT / "examples" / "qwen2.5-0.5b-ultrachat.yaml"

# The last message is rendered differently from the same message inside a longer conversation.
NOT_PREFIX_PRESERVING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %} (last){% endif %}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Run:
    script: ScriptArguments
    sft: SFTConfig
    model: str

    @property
    def dataset(self) -> str:
        return self.script.dataset_name


def run_of(data: Path, tokenizer_dir: str, *overrides: str) -> Run:
    """A run's settings as `chatsft inspect DATA --model_name_or_path TOKENIZER ...` parses them."""
    script, sft, model_args, _, _ = parse_inspect(
        [str(data), "--model_name_or_path", tokenizer_dir, *overrides]
    )
    return Run(script, sft, model_args.model_name_or_path)


def inspect(run: Run, **kwargs):
    """inspect_run with the tokenizer folder standing in for the model (as --tokenizer does)."""
    return inspect_run(
        run.script, run.sft, tokenizer=AutoTokenizer.from_pretrained(run.model), **kwargs
    )


def cli(argv: list[str]) -> int:
    """`chatsft inspect ...` as the installed command runs it (bad input: exit code 2)."""
    return main(argv)


def reference(run: Run):
    """What training's own preparation gives for the same run."""
    given = AutoTokenizer.from_pretrained(run.model)
    tok = load_tokenizer(run.model, given, eos_token=run.sft.eos_token)
    opts = prep_options(run.sft, tok)
    assert prep_options_of(run.sft, tok.eos_token) == opts  # inspect's options are training's
    prepared, stats = prepare_for_training(load_data(run.dataset), tok, opts)
    return tok, opts, prepared, stats


@pytest.fixture()
def data(tmp_path):
    long_chat = {
        "messages": [
            {"role": "user", "content": "what is two plus three " * 8},
            {"role": "assistant", "content": "five " * 20},
        ]
    }
    return write_jsonl(tmp_path / "train.jsonl", [*chats(10), long_chat])


def test_counts_are_preparations_counts(data, tokenizer_dir):
    run = run_of(data, tokenizer_dir, "--assistant_only_loss", "--max_length", "48")
    report = inspect(run, num_examples=2)
    tok, opts, prepared, stats = reference(run)
    (split,) = report.splits
    assert split.stats == stats
    # The long chat's answer lies past max_length, so its row is dropped; others are cut.
    assert stats.dropped == {"no trained token left": 1} and stats.truncated > 0
    assert split.lengths == [len(x) for x in prepared["input_ids"]]
    # Per role, over every row: the counts add up to preparation's totals.
    assert sum(r.trained for r in split.roles.values()) == stats.trained_tokens
    assert sum(r.tokens for r in split.roles.values()) == stats.total_tokens
    assert split.roles["user"].trained == 0 and split.roles["assistant"].trained > 0
    packed = pack_dataset(prepared, 48)
    assert split.packed_rows == len(packed)
    assert split.packing_efficiency == pytest.approx(stats.total_tokens / (len(packed) * 48))
    # Examples carry the collator's labels.
    for row in report.examples:
        assert row.trained == collator_trained(row.ids, prepared[row.index]["labels"])
        assert row.num_trained == sum(trained_mask_of(prepared[row.index])[1:])
    assert report.warnings == []


def test_role_attribution_rebuilds_the_prepared_ids(data, tokenizer_dir):
    run = run_of(data, tokenizer_dir, "--assistant_only_loss", "--max_length", "4096")
    tok, opts, prepared, _ = reference(run)
    raw = load_data(str(data))
    fmt = detect_format(raw.column_names)
    for i, row in enumerate(raw):
        encoded, roles = attributed_tokens(normalize(row, fmt, row_index=i + 1), tok, opts)
        assert encoded.input_ids == prepared[i]["input_ids"]
        assert trained_of(encoded.labels) == trained_mask_of(prepared[i])
        # Trained tokens are assistant tokens, and every assistant message has trained tokens.
        assert all(
            r == "assistant" for r, t in zip(roles, trained_positions(prepared[i]["labels"])) if t
        )


def test_terminal_colours_and_plain_markers(data, tokenizer_dir, monkeypatch):
    report = inspect(run_of(data, tokenizer_dir, "--assistant_only_loss"), num_examples=1)
    coloured = render_terminal(report, color=True)
    assert f"{ANSI_TRAINED}" in coloured and f"{ANSI_MASKED}<|im_start|>" in coloured
    assert "<|im_end|>\x1b[0m" in coloured  # the end-of-turn token closes a trained span
    plain = render_terminal(report, color=False)
    assert "\x1b[" not in plain and "[[" in plain and "<|im_end|>]]" in plain
    assert "rows read" in plain and "assistant" in plain and "packing" in plain
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto") and use_color("always")
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert use_color("auto") and not use_color("never")


def test_cli_prints_colour_and_writes_html(data, tokenizer_dir, tmp_path, capsys):
    page = tmp_path / "out" / "report.html"
    argv = ["inspect", str(data), "--tokenizer", tokenizer_dir, "--assistant_only_loss"]
    code = cli([*argv, "--color", "always", "--html", str(page), "--num-examples", "2"])
    out = capsys.readouterr().out
    assert code == 0 and ANSI_TRAINED in out and "example 2 of 2" in out
    text = page.read_text()
    assert text.count('class="example"') == 2 and 'class="tok trained"' in text
    assert "<link" not in text and "src=" not in text  # self-contained: no external assets
    assert os.listdir(page.parent) == ["report.html"]  # the temporary file was renamed
    assert cli(["inspect", str(data)]) == 2  # a data file without a tokenizer: a clear error
    assert "needs a tokenizer" in capsys.readouterr().err


def test_a_gpu_config_is_inspected_on_this_machine(data, tokenizer_dir, tmp_path, capsys):
    """The example config (bf16: true, hub model and data) with local stand-ins for the hub:
    parsed without training's hardware checks, its settings are the ones inspected."""
    evaluation = write_jsonl(tmp_path / "eval.jsonl", chats(3, seed=9))
    argv = ["inspect", str(EXAMPLE_CONFIG), "--tokenizer", tokenizer_dir]
    argv += ["--dataset_name", str(data), "--dataset_split", "train"]
    argv += ["--eval_dataset", str(evaluation), "--num-examples", "1", "--color", "never"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "assistant_only_loss=True" in out and "max_length=2048" in out and "packing=True" in out
    assert "train data: 11 rows read" in out and "eval data: 3 rows read" in out
    assert "example 1 of 1" in out


def test_command_line_settings_are_checked_before_loading(data, tokenizer_dir, capsys):
    script, sft, model_args, args, data_form = parse_inspect(
        [str(data), "--tokenizer", tokenizer_dir, "--sample-rows", "5", "--max_rows", "4"]
    )
    assert data_form and script.dataset_name == str(data) and model_args.model_name_or_path is None
    assert (args.sample_rows, args.max_rows, args.num_examples, args.color) == (5, 4, 3, "auto")
    for bad, why in (
        (["--color", "purple"], "invalid choice"),
        (["--num-examples", "-1"], "num_examples must be >= 0"),
        (["--max_rows", "0"], "max_rows must be >= 1"),
        (["--no_such_field", "1"], "unknown setting"),
    ):
        assert cli(["inspect", str(data), "--tokenizer", tokenizer_dir, *bad]) == 2
        assert why in capsys.readouterr().err


def test_warns_when_eos_is_never_trained(data, tokenizer_dir, capsys):
    # The template ends turns with <|im_end|>, so a different eos never appears, never trained.
    overrides = ["--assistant_only_loss", "--eos_token", "<|endoftext|>"]
    report = inspect(run_of(data, tokenizer_dir, *overrides), num_examples=0)
    (warning,) = report.warnings
    assert "'<|endoftext|>' is never trained" in warning.message and not warning.blocking
    argv = ["inspect", str(data), "--tokenizer", tokenizer_dir, *overrides, "--num_examples", "0"]
    assert cli(argv) == 0  # a warning alone does not fail the command
    assert cli([*argv, "--strict"]) == 1  # unless --strict
    assert capsys.readouterr().out.count("is never trained") == 2


def test_warns_when_the_template_is_not_prefix_preserving(data, tokenizer_dir, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text(NOT_PREFIX_PRESERVING)
    argv = ["inspect", str(data), "--tokenizer", tokenizer_dir, "--assistant_only_loss"]
    code = cli([*argv, "--chat_template_path", str(template), "--color", "never"])
    out = capsys.readouterr().out
    assert code == 1  # training would fail on it
    assert "warning: train data:" in out and "not prefix-preserving" in out


def test_warns_about_eval_rows_that_are_train_rows(tokenizer_dir, tmp_path):
    train_rows = chats(8)
    copied = json.loads(json.dumps(train_rows[:3]))
    copied[0]["messages"][0]["content"] += "  "  # whitespace does not hide a duplicate
    copied[1]["id"] = 7  # nor does an extra column
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [*copied, *chats(2, seed=5)])
    run = run_of(train, tokenizer_dir, "--eval_dataset", str(evaluation))
    report = inspect(run, num_examples=0)
    assert [s.name for s in report.splits] == ["train", "eval"]
    (warning,) = report.warnings
    assert warning.message.startswith("3 of 5 eval rows also appear in the train data")


class DomCounts(HTMLParser):
    """Trained/masked token spans per example, and each example's data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: list[dict] = []
        self.splits: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "example" in classes:
            self.examples.append({**a, "trained_spans": 0, "masked_spans": 0, "titles": []})
        elif "split" in classes:
            self.splits.append(a)
        elif tag == "span" and "tok" in classes and self.examples and "data-pos" in a:
            kind = "trained" if "trained" in classes else "masked"
            self.examples[-1][f"{kind}_spans"] += 1
            self.examples[-1]["titles"].append(a["title"])


@pytest.mark.browser
@needs_chromium
def test_html_in_a_browser_matches_the_statistics(data, tokenizer_dir, tmp_path):
    page = tmp_path / "inspect.html"
    argv = ["inspect", str(data), "--tokenizer", tokenizer_dir, "--assistant_only_loss"]
    assert cli([*argv, "--html", str(page), "--num-examples", "3", "--color", "never"]) == 0
    html = dump_dom(page, tmp_path)
    dom = DomCounts()
    dom.feed(html)
    _, _, prepared, stats = reference(run_of(data, tokenizer_dir, "--assistant_only_loss"))
    assert len(dom.examples) == 3
    for n, example in enumerate(dom.examples):
        ids, mask = prepared[n]["input_ids"], trained_mask_of(prepared[n])
        trained = sum(mask[1:])  # the statistic: trained tokens of the row
        assert example["trained_spans"] == int(example["data-trained"]) == trained > 0
        assert example["masked_spans"] == int(example["data-masked"]) == len(ids) - trained > 0
        assert example["titles"][:2] == [f"id {ids[0]} · pos 0", f"id {ids[1]} · pos 1"]
    (split,) = dom.splits
    assert int(split["data-trained-tokens"]) == stats.trained_tokens
    assert int(split["data-rows-read"]) == stats.rows_read
