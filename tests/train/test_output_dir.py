"""Output folders belong to one run, checkpoints are checked before a resume: through the CLI."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from conftest import chats, write_jsonl

from chatsft.cli import main
from chatsft.train.output_dir import LOCK_FILE


@pytest.fixture()
def run(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chats(16))
    out = tmp_path / "out"

    def train(*extra: str, output: Path = out) -> int:
        argv = ["train", "--model", model_dir, "--dataset", str(data), "--output_dir", str(output)]
        argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "64"]
        return main([*argv, *extra])

    return train, out


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_model_folder_is_never_the_output_folder(tmp_path, run, model_dir, capsys):
    train, _ = run
    before = (Path(model_dir) / "model.safetensors").read_bytes()
    assert train(output=Path(model_dir)) == 2
    assert "output_dir is the model folder being trained from" in error_line(capsys)
    assert (Path(model_dir) / "model.safetensors").read_bytes() == before


def test_another_runs_folder_is_refused_unless_overwritten_or_resumed(run, capsys):
    train, out = run
    assert train("--save_strategy", "no", "--use_peft") == 0
    assert (out / "adapter_config.json").exists()
    assert train("--save_strategy", "no") == 2
    assert "output_dir holds a finished run" in error_line(capsys)
    # --overwrite_output_dir replaces the earlier run: its stale adapter must not survive.
    assert train("--save_strategy", "no", "--overwrite_output_dir") == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_live_runs_lock_is_respected_and_a_dead_ones_taken_over(run, capsys):
    train, out = run
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    assert train("--save_strategy", "no") == 2
    assert "another run (pid" in error_line(capsys)
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    assert train("--save_strategy", "no") == 0


def test_a_damaged_checkpoint_is_named_and_latest_valid_falls_back(run, capsys):
    train, out = run
    assert train("--save_steps", "1") == 0
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert train("--max_steps", "3", "--resume") == 2
    line = error_line(capsys)
    assert "checkpoint-2" in line and "model.safetensors: its tensors need" in line
    assert "--resume latest_valid" in line
    assert train("--max_steps", "3", "--resume", "latest_valid") == 0
    assert "resuming from" in capsys.readouterr().out and (out / "checkpoint-3").exists()


def test_a_checkpoint_of_other_settings_is_refused_with_the_differences(run, capsys):
    train, out = run
    assert train("--save_steps", "2") == 0
    assert train("--max_steps", "4", "--resume", "--learning_rate", "0.5") == 2
    assert "learning_rate: the default then, 0.5 now" in error_line(capsys)


def test_unsafe_or_missing_checkpoint_files_are_one_line(run, tmp_path, model_dir, capsys):
    train, out = run
    assert train("--save_steps", "2") == 0
    evil = out / "checkpoint-2" / "optimizer.pt"
    evil.write_bytes(pickle.dumps(os.system))  # a pickle that would call a function on load
    assert train("--max_steps", "3", "--resume") == 2
    assert "optimizer.pt" in error_line(capsys)
    assert train("--max_steps", "3", "--resume", model_dir) == 2
    assert "no trainer_state.json" in error_line(capsys)
