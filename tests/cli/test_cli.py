"""The CLI as a user runs it: YAML + overrides, clear errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, chats, offline_env, run_cli, write_jsonl

from chatsft.cli import main
from chatsft.cli.parser import parse
from chatsft.cli.train import build_parser


@pytest.mark.slow
def test_train_from_yaml_with_overrides(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", chats(12))
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": model_dir,
                "dataset": str(data),
                "output_dir": str(out),
                "max_steps": 50,
                "per_device_train_batch_size": 4,
                "assistant_only_loss": True,
                "save_strategy": "no",
                "report_to": "none",
                "max_length": 64,
            }
        )
    )
    result = run_cli("train", str(cfg), "--max_steps", "2", "--learning-rate=1e-3", "--packing")
    assert result.returncode == 0, result.stderr
    assert "12 rows read, 12 kept" in result.stdout
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["learning_rate"] == 1e-3 and saved["packing"] is True
    assert (out / "model.safetensors").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path, model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(chats(1)[0]) + "\n{not json\n")
    code = main(
        ["train", "--model", model_dir, "--dataset", str(data), "--output_dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}, row 2: malformed JSON" in err and "Traceback" not in err


def test_bad_row_in_file_names_file_row_and_field(tmp_path, model_dir, capsys):
    rows = chats(2) + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(
        ["train", "--model", model_dir, "--dataset", str(data), "--output_dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}, row 3, field 'messages[1].content': content must be a string" in err


def test_unknown_key_suggests_the_right_one(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndataset: d\nlearning_rat: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chats(2))
    assert main(["train", "--model", str(tmp_path / "nope"), "--dataset", str(data)]) == 2
    assert "model path does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_single_name_hub_id_loads_from_the_cache_offline(tmp_path, model_dir):
    """`gpt2`-style ids (no org) already in the Hugging Face cache load with HF_HUB_OFFLINE=1, as
    with transformers; an id that is not cached is a clear error."""
    import shutil

    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--tinyname"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from chatsft.model.load import check_model_ref, load_model\n"
        "print(type(load_model('tinyname')).__name__)\n"
        "try:\n    check_model_ref('othername')\n"
        "except Exception as e:\n    print(e)\n"
    )
    env = {**offline_env(), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0] == "LlamaForCausalLM"
    assert "not in the Hugging Face cache" in out.stdout


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# chatsft ") or first.startswith("# accelerate "), (
        "first line: the command"
    )
    # training=False: bf16 is not checked against this CPU machine's hardware.
    script, _, model_args, _ = parse(build_parser(), [str(path)], training=False).values
    assert model_args.model_name_or_path and script.dataset_name


def test_streaming_from_the_cli(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chats(20))
    out = tmp_path / "o"
    argv = ["train", "--model", model_dir, "--dataset", str(data), "--output_dir", str(out)]
    assert main([*argv, "--streaming"]) == 2
    assert "needs max_steps" in capsys.readouterr().err
    flags = ["--streaming", "--max_steps", "2", "--packing", "--max_length", "128"]
    assert main([*argv, *flags, "--save_strategy", "no"]) == 0
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    assert path.read_text().startswith("# accelerate launch --config_file examples/accelerate/")
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_resume_continues_from_the_newest_checkpoint(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chats(16))
    out = tmp_path / "o"
    base = [
        "train",
        "--model",
        model_dir,
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--save_steps",
        "2",
        "--max_length",
        "64",
    ]
    assert main([*base, "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main([*base, "--max_steps", "2"]) == 0
    assert main([*base, "--max_steps", "4", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out and (out / "checkpoint-4").is_dir()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.parametrize("value", ["None", "none", "null"])
def test_max_length_none_on_the_command_line_means_no_limit(value):
    argv = ["--model", "m", "--dataset", "d.jsonl", "--max_length", value]
    _, sft, _, _ = parse(build_parser(), argv).values
    assert sft.max_length is None
