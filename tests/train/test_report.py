"""The end-of-training report: real PNG charts of a fixed size (log-scale loss, axes that do not
blow up noise, whole-number steps), report.html that a browser renders with its images and names
the model, data, LoRA settings and loss mask, shows only changed settings (never a secret), and a
plain report when matplotlib is missing."""

from __future__ import annotations

import html
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import pytest
from conftest import CHROMIUM, chats, dump_dom, make_model
from datasets import Dataset
from transformers import TrainerState, TrainingArguments

from chatsft import SFTConfig, SFTTrainer
from chatsft.train.report import (
    MATPLOTLIB_HINT,
    REPORT_FILE,
    TrainingReportCallback,
    build_charts,
    draw_chart,
    loss_mask_policy,
    smooth_loss,
    throughput,
    write_report,
)

CHARTS = ("loss.png", "learning_rate.png", "tokens_per_second.png", "trained_tokens.png")

HISTORY = [
    {"loss": 2.0, "learning_rate": 1e-3, "num_trained_tokens": 100, "step": 1, "epoch": 0.5},
    {"eval_loss": 2.2, "eval_runtime": 1.0, "step": 1, "epoch": 0.5},
    {"loss": 1.5, "learning_rate": 5e-4, "num_trained_tokens": 300, "step": 2, "epoch": 1.0},
    {"train_runtime": 4.0, "train_loss": 1.75, "step": 2, "epoch": 1.0},
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_throughput_leaves_out_eval_time():
    # Train logs at t=2 (100 tokens since t=1) and t=5 (200 more, with 1 s of eval in between).
    steps, rates = throughput(HISTORY, {0: 2.0, 2: 5.0}, start=1.0)
    assert steps == [1.0, 2.0] and rates == pytest.approx([100.0, 100.0])


def test_charts_hold_every_eval_loss_series():
    history = [*HISTORY, {"eval_chat_loss": 2.5, "step": 2}]
    loss = build_charts(history)[0]
    assert set(loss.series) == {"train loss", "eval loss", "eval chat loss"}
    assert loss.series["train loss"] == ([1.0, 2.0], [2.0, 1.5])


def visible_ticks(axis, limits) -> list[float]:
    low, high = sorted(limits)
    return [t for t in axis.get_majorticklocs() if low <= t <= high]


def test_loss_axis_is_logarithmic_and_spans_a_decade():
    # A 0.06 change in loss must not fill the whole axis (the old linear chart did exactly that).
    history = [{"loss": 1.20 - 0.0012 * s, "step": s} for s in range(1, 51)]
    history.append({"eval_loss": 1.15, "step": 50})
    ax = draw_chart(build_charts(history)[0]).axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert math.log10(high / low) >= 1 - 1e-9
    assert low < 1.14 and high > 1.2  # every point on the chart
    # Tick labels are plain numbers, not the log formatter's 10^x.
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+", t) for t in labels)


def test_wide_loss_range_keeps_its_own_limits():
    history = [{"loss": 10.0 * 0.9**s, "step": s} for s in range(1, 60)]
    ax = draw_chart(build_charts(history)[0]).axes[0]
    low, high = ax.get_ylim()
    assert low < 10.0 * 0.9**59 and high > 9.0 and math.log10(high / low) < 4


def test_counts_and_rates_start_at_zero():
    history = [
        {"loss": 1.0, "learning_rate": 1e-4, "num_trained_tokens": 1000 * s, "step": s}
        for s in range(1, 6)
    ]
    times = {i: 1.0 + i + 0.01 * (i % 2) for i in range(5)}  # ~1000 tokens/s with noise
    for chart in build_charts(history, times, start=0.0)[1:]:
        ax = draw_chart(chart).axes[0]
        assert ax.get_ylim()[0] == 0, chart.file


def test_one_logged_step_gets_whole_step_ticks():
    history = [{"loss": 2.3, "learning_rate": 1e-4, "num_trained_tokens": 500, "step": 1}]
    for chart in build_charts(history, {0: 2.0}, start=1.0):
        ax = draw_chart(chart, last_step=1).axes[0]
        ticks = visible_ticks(ax.xaxis, ax.get_xlim())
        assert 1 in ticks and all(t == int(t) for t in ticks), (chart.file, ticks)


def test_an_eval_only_at_the_end_is_drawn_inside_the_chart_with_a_legend():
    history = [{"loss": 3.0 - 0.02 * s, "step": s} for s in range(1, 101)]
    history.append({"eval_loss": 1.5, "eval_runtime": 2.0, "step": 100})
    ax = draw_chart(build_charts(history)[0], last_step=100).axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "eval loss"]
    assert line.get_marker() == "o" and line.get_markersize() >= 6
    assert list(line.get_xdata()) == [100.0] and ax.get_xlim()[1] > 100
    assert "eval loss" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.get_text() == "1.5" for t in ax.texts)  # its value is written beside it


def test_smoothed_loss_is_centred_and_does_not_lag():
    values = [10.0 * 0.97**s for s in range(200)]
    smoothed = smooth_loss(values)
    # A geometric series is its own centred geometric mean: no lag behind a falling loss.
    assert smoothed == pytest.approx(values, rel=1e-9)
    assert smooth_loss([1.0, 0.0, 2.0]) is None  # cannot go on a log axis


@pytest.mark.parametrize(
    ("settings", "fmt", "expected"),
    [
        ({"assistant_only_loss": True}, "messages", "assistant turns only (assistant_only_loss)"),
        ({"last_turn_only": True}, "sharegpt", "last assistant turn only (last_turn_only)"),
        ({}, "messages", "every token"),
        ({}, "prompt_completion", "completion only (completion_only_loss)"),
        ({"completion_only_loss": False}, "prompt_completion", "every token"),
        ({}, "text", "every token (text rows)"),
    ],
)
def test_loss_mask_policy(tmp_path, settings, fmt, expected):
    args = SFTConfig(output_dir=str(tmp_path), **settings)
    assert loss_mask_policy(args, fmt).startswith(expected)


def summary(page: str, item: str) -> str:
    return html.unescape(re.search(rf'id="summary-{item}">(.*?)</dd>', page, re.S).group(1))


def test_header_names_model_dataset_lora_and_loss_mask(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = make_model(tokenizer)
    model.config._name_or_path = "org/tiny-llama"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none")
    page = Path(
        write_report(str(tmp_path), HISTORY, args, model=model, dataset_name="org/chats [train]")
    ).read_text()
    assert "org/tiny-llama" in summary(page, "model") and "trainable of" in summary(page, "model")
    assert summary(page, "dataset") == "org/chats [train]"
    lora_text = summary(page, "finetuning")
    assert "LoRA r=4, alpha=8" in lora_text and "targets: q_proj, v_proj" in lora_text
    assert "assistant turns only (assistant_only_loss)" in summary(page, "loss-mask")
    assert "train 2 → 1.5" in summary(page, "loss") and "eval 2.2" in summary(page, "loss")


def test_header_without_a_model_says_unknown(tmp_path):
    page = Path(write_report(str(tmp_path), HISTORY, {"learning_rate": 1e-3})).read_text()
    for item in ("model", "dataset", "finetuning"):
        assert summary(page, item).startswith("unknown")


def config_rows(page: str) -> dict[str, str]:
    table = re.search(r'<table id="config">.*?</table>', page, re.S).group(0)
    rows = re.findall(r'<td class="key">([^<]*)</td>\s*<td class="value">([^<]*)</td>', table)
    return {key: html.unescape(value) for key, value in rows}


def test_config_lists_only_changed_settings_and_no_secret(tmp_path):
    secret = "hf_" + "x1y2z3" * 6
    args = SFTConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        eos_token="<|im_end|>",
        hub_token=secret,
        model_init_kwargs={"token": "plain-secret", "dtype": "bfloat16"},
        run_name=f"run-{secret}",
        report_to="none",
    )
    page = Path(write_report(str(tmp_path), HISTORY, args)).read_text()
    rows = config_rows(page)
    assert set(rows) == {"learning_rate", "eos_token", "model_init_kwargs", "run_name"}
    assert rows["learning_rate"] == "0.001" and rows["eos_token"] == "<|im_end|>"
    assert json.loads(rows["model_init_kwargs"]) == {"token": "<hidden>", "dtype": "bfloat16"}
    assert secret not in page and "plain-secret" not in page and "hub_token" not in page


def test_generation_samples_show_first_and_last_step_escaped(tmp_path):
    records = [
        {"step": step, "epoch": 1.0, "prompt": prompt, "completion": f"<b>{text}</b> @{step}"}
        for step in (10, 20, 30)
        for prompt, text in (([{"role": "user", "content": "hi"}], "hello"), ("2+2=", "4"))
    ]
    lines = [json.dumps(r) for r in records] + ['{"step": 40, "prom']  # a line cut by a crash
    (tmp_path / "generations.jsonl").write_text("\n".join(lines) + "\n")
    page = Path(write_report(str(tmp_path), HISTORY, {})).read_text()
    table = re.search(r'<table id="samples">.*?</table>', page, re.S).group(0)
    assert "user: hi" in table and "2+2=" in table
    assert "&lt;b&gt;hello&lt;/b&gt; @10" in table and "@30" in table and "@20" not in table
    assert "<b>" not in table  # autoescaped


def test_callback_writes_fixed_size_pngs_and_report(tmp_path):
    import matplotlib.image

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none")
    state = TrainerState()
    callback = TrainingReportCallback()
    callback.on_train_begin(args, state, None)
    for entry in HISTORY:  # as the Trainer does: append to log_history, then on_log
        state.log_history.append(entry)
        callback.on_log(args, state, None, logs=entry)
    callback.on_train_end(args, state, None)
    out = tmp_path / "run"
    for name in CHARTS:
        assert png_size(out / name) == (800, 500)
        assert matplotlib.image.imread(out / name).shape[:2] == (500, 800)  # decodes fully
    page = (out / REPORT_FILE).read_text()
    assert all(f'src="{name}"' in page for name in CHARTS)
    assert "train_loss" in page and "eval_loss" in page
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes left nothing


def test_only_the_main_process_writes(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none")
    state = TrainerState(is_world_process_zero=False, log_history=list(HISTORY))
    TrainingReportCallback().on_train_end(args, state, None)
    assert not (tmp_path / "run").exists()


def test_without_matplotlib_the_report_has_no_images_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = write_report(str(tmp_path), HISTORY, {"learning_rate": 1e-3})
    assert capsys.readouterr().out.strip() == MATPLOTLIB_HINT
    page = Path(path).read_text()
    assert "<img" not in page and "pip install 'chatsft[report]'" in page
    assert "train_loss" in page and 'id="summary-loss"' in page
    assert sorted(os.listdir(tmp_path)) == [REPORT_FILE]


@pytest.mark.browser
def test_tiny_run_report_opens_in_a_browser(tmp_path, model_dir):
    out = tmp_path / "out"
    args = SFTConfig(
        output_dir=str(out),
        max_steps=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        assistant_only_loss=True,
        max_length=64,
        save_strategy="no",
        report_to="none",
        eos_token="<|im_end|>",
        training_report=False,  # this test's own callback, named dataset and all, writes it
    )
    trainer = SFTTrainer(
        model=model_dir,
        args=args,
        train_dataset=Dataset.from_list(chats(16)),
        eval_dataset=Dataset.from_list(chats(4, seed=1)),
        callbacks=[TrainingReportCallback(dataset_name="conftest chats(16)")],
    )
    trainer.train()
    for name in CHARTS:
        assert png_size(out / name) == (800, 500)
    page = (out / REPORT_FILE).read_text()
    # The resolved config shows the real eos_token (to_dict() would print <EOS_TOKEN>).
    assert re.search(r"eos_token</td><td[^>]*>&lt;\|im_end\|&gt;<", page)
    if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
        pytest.skip("the browser check needs /usr/bin/chromium (apt-get install chromium)")
    dom = dump_dom(out / REPORT_FILE, tmp_path)
    images = re.findall(r"<img [^>]*>", dom)
    assert len(images) == len(CHARTS)
    for name, tag in zip(CHARTS, images):
        # data-size is set by the page's script from the decoded image: the browser loaded it.
        assert f'src="{name}"' in tag and 'data-size="800x500"' in tag
    assert 'class="missing"' not in dom
    metrics = re.search(r'<table id="metrics">.*?</table>', dom, re.S).group(0)
    for key in ("train_loss", "eval_loss", "num_trained_tokens", "learning_rate"):
        assert f">{key}<" in metrics
    assert re.search(r'<table id="config">.*>max_steps<.*>4<', dom, re.S)
    assert "tiny-model" in summary(dom, "model") and summary(dom, "dataset") == "conftest chats(16)"
    assert summary(dom, "finetuning").startswith("full fine-tuning")
    assert "per_device_eval_batch_size" not in dom  # a default: not listed
