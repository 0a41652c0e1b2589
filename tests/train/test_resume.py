"""Kill -9 in the middle of training, resume with --resume: the same per-step losses and bitwise
the same final weights as a run that was never interrupted (deterministic CPU path)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chats, offline_env, write_jsonl
from safetensors.torch import load_file


def _cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = offline_env()
    return subprocess.Popen(
        [sys.executable, "-m", "chatsft", "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _tokens(folder: Path) -> dict[int, int]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["num_trained_tokens"] for h in state["log_history"] if "loss" in h}


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chats(64, seed=4))
    common = [
        "--model",
        model_dir,
        "--dataset",
        str(data),
        "--max_steps",
        "16",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "3e-3",
        "--logging_steps",
        "1",
        "--max_length",
        "64",
        "--packing",
        "--seed",
        "5",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _cli([*common, "--output_dir", str(full)], tmp_path).wait(timeout=300) == 0

    proc = _cli([*common, "--output_dir", str(cut)], tmp_path)
    deadline = time.time() + 300
    while not (cut / "checkpoint-6" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A save cut short by a crash: the newest folder has weights but no trainer_state.json.
    broken = cut / "checkpoint-98"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")

    resumed = _cli([*common, "--output_dir", str(cut), "--resume"], tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert (
        "resuming from" in out
        and "checkpoint-98" not in out.split("resuming from")[1].split("\n")[0]
    )

    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name  # bitwise
    assert _losses(full / "checkpoint-16") == _losses(cut / "checkpoint-16")
    assert _tokens(full / "checkpoint-16") == _tokens(cut / "checkpoint-16")  # counted on


def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path, model_dir, monkeypatch, capsys
):
    import transformers.modeling_utils

    from chatsft.cli import main
    from chatsft.train.checkpoints import STAGING_DIR, newest_complete_checkpoint

    data = write_jsonl(tmp_path / "d.jsonl", chats(32, seed=2))
    out = tmp_path / "o"
    real_save = transformers.modeling_utils.safe_save_file
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint's weights
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_then_fail)
    argv = [
        "train",
        "--model",
        model_dir,
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "64",
    ]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "checkpoint-4" in err[0], err
    err = err[0]
    assert "no space left on the device while saving checkpoint-4 (about" in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert newest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert not (out / STAGING_DIR).exists()  # the partial save is removed: it only takes space
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    assert main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / STAGING_DIR).exists()
