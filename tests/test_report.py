"""The end-of-training report: real PNG charts of a fixed size, report.html that a browser renders
with its images, metrics and config, and a plain report when matplotlib is missing."""

from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

import pytest
from conftest import CHROMIUM, chats, dump_dom
from datasets import Dataset
from transformers import TrainerState, TrainingArguments

from chatsft import SFTConfig, SFTTrainer
from chatsft.report import (
    MATPLOTLIB_HINT,
    REPORT_FILE,
    TrainingReportCallback,
    build_charts,
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
    assert "train_loss" in page
    assert sorted(os.listdir(tmp_path)) == [REPORT_FILE]


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
    )
    trainer = SFTTrainer(
        model=model_dir,
        args=args,
        train_dataset=Dataset.from_list(chats(16)),
        eval_dataset=Dataset.from_list(chats(4, seed=1)),
        callbacks=[TrainingReportCallback()],
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
