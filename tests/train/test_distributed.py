"""Two CPU processes (gloo) × batch b train exactly like one process × batch 2b: the loss is
normalised by the global trained-token count, so per-step losses and final weights agree."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chats, offline_env, write_jsonl

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp_path: Path) -> None:
    env = offline_env()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("padding_free", ["0", "1"])
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, model_dir, padding_free):
    data = write_jsonl(tmp_path / "d.jsonl", chats(24, seed=11))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(SCRIPT), model_dir, str(data), str(one), "4", padding_free], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _run(
        [
            *torchrun,
            "--master_port",
            "29517",
            str(SCRIPT),
            model_dir,
            str(data),
            str(two),
            "2",
            padding_free,
        ],
        tmp_path,
    )
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world"] == 1 and b["world"] == 2
    assert a["tokens"] == b["tokens"]  # every rank's trained tokens are counted
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    for name, value in a["weights"].items():
        assert value == pytest.approx(b["weights"][name], rel=1e-4, abs=1e-4), name


def test_a_nonfinite_step_on_one_rank_is_skipped_on_every_rank(tmp_path, model_dir):
    """The NaN gradient of one rank reaches every rank through the all-reduce, so every rank skips
    the same step and the replicas stay identical."""
    data = write_jsonl(tmp_path / "d.jsonl", chats(16, seed=5))
    out = tmp_path / "nf"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    script = SCRIPT.parent / "ddp_nonfinite.py"
    _run(
        [
            *torchrun,
            "--master_port",
            str(_free_port()),
            str(script),
            model_dir,
            str(data),
            str(out),
        ],
        tmp_path,
    )
    ranks = [json.loads((tmp_path / f"nf.{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [[2], [2]]
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_torchrun_runs_the_cli(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chats(16, seed=3))
    out = tmp_path / "out"
    env = offline_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "chatsft",
        "train",
        "--model",
        model_dir,
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--use_cpu",
        "--per_device_train_batch_size",
        "2",
        "--packing",
        "--max_length",
        "64",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout
    assert "rank 0 of 2:" in log and "rank 1 of 2:" in log
    assert log.count("train data: 16 rows read") == 1  # printed by the main process only
    assert (out / "model.safetensors").exists()


FSDP_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""


def test_fsdp2_on_cpu_matches_one_rank(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", chats(24, seed=11))
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CPU)
    one, two = tmp_path / "one.json", tmp_path / "fsdp.json"
    _run([sys.executable, str(SCRIPT), model_dir, str(data), str(one), "4", "0"], tmp_path)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(_free_port()),
    ]
    _run([*launch, str(SCRIPT), model_dir, str(data), str(two), "2", "0"], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world"] == 2 and a["tokens"] == b["tokens"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
