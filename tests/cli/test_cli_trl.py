"""A TRL user's command line: `trl sft` configs and flags, typed fields, the training record, the model
card, adapters that know their base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, chats, offline_env, write_jsonl

from chatsft.cli import main
from chatsft.cli.parser import REFUSED, _names
from chatsft.cli.train import build_parser


def trl_config(tmp_path, model_dir, **extra) -> Path:
    """A config in the shape of TRL's documented `trl sft` examples, on local stand-ins."""
    data = tmp_path / "capybara"
    write_jsonl(data / "train.jsonl", chats(16))
    write_jsonl(data / "test.jsonl", chats(4, seed=7))
    config = {
        "model_name_or_path": model_dir,
        "dataset_name": str(data),
        "learning_rate": 2.0e-4,
        "num_train_epochs": 1,
        "max_steps": 2,
        "packing": True,
        "max_length": 128,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "eos_token": "<|im_end|>",
        "eval_strategy": "steps",
        "eval_steps": 1,
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "save_strategy": "no",
        **extra,
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_trl_sft_config_runs_unchanged(tmp_path, model_dir, capsys):
    config = trl_config(tmp_path, model_dir)
    assert main(["train", "--config", str(config)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists()
    assert "'eval_loss'" in capsys.readouterr().out  # eval_strategy steps → the test split


def test_every_field_of_trls_sft_surface_is_accepted_or_refused_with_a_reason():
    """TRL 1.16's SFTConfig (beyond TrainingArguments), ScriptArguments, ModelConfig and dataset
    mixture fields, as names (tests/fixtures/trl_1_16_fields.json, generated from trl 1.16.0)."""
    fields = json.loads((FIXTURES / "trl_1_16_fields.json").read_text())
    known = _names(build_parser())
    for group, names in fields.items():
        for name in names:
            assert name in known or name in REFUSED, f"{group}.{name} is neither known nor refused"


def test_a_refused_trl_field_names_the_reason(tmp_path, capsys):
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"datasets": [{"path": "a"}], "model": "m"}))
    assert main(["train", str(config)]) == 2
    assert "field 'datasets': dataset mixtures" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--per_device_train_batch_size", "two"], "--per_device_train_batch_size"),
        (["--lora_r", "abc"], "invalid int value: 'abc'"),
        (["--max_steps", "ten"], "invalid int value: 'ten'"),
        (["--seed", "abc"], "invalid int value: 'abc'"),
        (["--dtype", "float33"], "invalid choice: 'float33'"),
        (["--learning_rate", "abc"], "invalid float value: 'abc'"),
        (["--save_total_limit", "three"], "invalid int value: 'three'"),
        (["--packing", "maybe"], "--packing"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
        (["--gradient_accumulation_steps", "-2"], "gradient_accumulation_steps must be >= 1"),
        (["--num_train_epochs", "-1"], "num_train_epochs must be >= 0"),
        (["--max_steps", "0"], "max_steps must be a positive number"),
        (["--model_init_kwargs", "[1, 2]"], "model_init_kwargs must be a mapping"),
        (["--eval_fraction", "2"], "eval_fraction must be between 0 and 1"),
        (["--lerning_rate", "1e-4"], "did you mean 'learning_rate'?"),
        (["--report_to", "wandb"], "pip install 'chatsft[wandb]'"),
        (["--seed", "-1"], "seed must be >= 0"),
        (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0"),
        (["--label_smoothing_factor", "2"], "label_smoothing_factor must be below 1"),
        (["--save_steps", "0"], "save_steps must be > 0"),
        (["--neftune_noise_alpha", "-1"], "neftune_noise_alpha must be >= 0"),
    ],
)
def test_bad_values_fail_in_one_line_before_anything_loads(tmp_path, capsys, flags, expected):
    # The model path does not exist: had anything been loaded, the error would be about it.
    argv = ["train", "--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "x")]
    assert main([*argv, "--output_dir", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_yaml_values_are_checked_like_flags(tmp_path, capsys):
    for values, expected in [
        ({"per_device_train_batch_size": 2.5}, "invalid int value: '2.5'"),
        ({"packing": "no"}, "field 'packing': expected true or false"),
        ({"lora_target_modules": {"a": 1}}, "lora_target_modules"),
    ]:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump({"model": "m", "dataset": "d", **values}))
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert main(["train", str(bomb)]) == 2
    assert "aliases" in capsys.readouterr().err


@pytest.mark.slow
def test_help_lists_every_field_with_its_help():
    from chatsft.config import ModelConfig, ScriptArguments, SFTConfig

    result = subprocess.run(
        [sys.executable, "-m", "chatsft", "train", "--help"],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=120,
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for cls in (SFTConfig, ScriptArguments, ModelConfig):
        for f in cls.__dataclass_fields__.values():
            if f.init:
                assert f"--{f.name}" in text, f.name
    assert "Pack several examples into each row" in text  # a field's help, not only its name


def test_flags_override_the_file_and_dashes_are_aliases(tmp_path, model_dir):
    from chatsft.cli.parser import parse

    config = trl_config(tmp_path, model_dir)
    parsed = parse(build_parser(), [str(config), "--learning-rate", "1e-3", "--lora_r=4"])
    script, sft, model_args, _ = parsed.values
    assert sft.learning_rate == 1e-3 and model_args.lora_r == 4 and sft.packing is True
    assert script.dataset_name.endswith("capybara") and model_args.model_name_or_path == model_dir
    assert parsed.record["learning_rate"] == 1e-3 and "hub_token" not in parsed.record


def first_loss(folder: Path) -> float:
    state = folder / "checkpoint-2" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    return next(e["loss"] for e in history if "loss" in e)


def test_training_config_reruns_the_run_and_no_file_holds_the_token(tmp_path, model_dir, capsys):
    token = "hf_SECRETsecretSECRET123"
    config = trl_config(
        tmp_path,
        model_dir,
        eval_strategy="no",
        logging_steps=1,
        hub_token=token,
        save_strategy="steps",
        save_steps=2,
    )
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    record = yaml.safe_load((out / "training_config.yaml").read_text())
    assert record["model_name_or_path"] == model_dir
    assert record["dataset_name"].endswith("capybara") and record["use_peft"] is True
    assert record["lora_r"] == 8 and "hub_token" not in record
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    again = tmp_path / "again"
    assert main(["train", str(out / "training_config.yaml"), "--output_dir", str(again)]) == 0
    assert first_loss(again) == pytest.approx(first_loss(out), rel=1e-6)


def test_model_card_in_model_and_adapter_folders(tmp_path, model_dir, capsys):
    config = trl_config(tmp_path, model_dir, eval_strategy="no", assistant_only_loss=True)
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    card = (tmp_path / "out" / "README.md").read_text()
    for text in (f"base_model: {model_dir}", "capybara", "chatsft train", "assistant turns only"):
        assert text in card, text
    assert "LoRA" in card and "r 8" in card and "train_loss" in card
    full = tmp_path / "full"
    argv = ["train", str(config), "--use_peft", "false", "--output_dir", str(full)]
    assert main(argv) == 0
    card = (full / "README.md").read_text()
    assert "Fine-tuned model trained with chatsft" in card and "library_name: transformers" in card


@pytest.mark.slow
def test_an_adapter_merges_from_anywhere_and_base_can_be_overridden(tmp_path, model_dir, capsys):
    rel_model = os.path.relpath(model_dir)  # trained from a relative path
    config = trl_config(tmp_path, rel_model, eval_strategy="no")
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    adapter = tmp_path / "out"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(recorded)
    env = offline_env()
    run = [sys.executable, "-m", "chatsft", "merge", str(adapter)]
    done = subprocess.run(
        [*run, "--output", str(tmp_path / "m1")], cwd="/", env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m1" / "model.safetensors").exists()
    moved = tmp_path / "moved-base"
    os.rename(model_dir, moved)
    assert main(["merge", str(adapter), "--output", str(tmp_path / "m2")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    argv = ["merge", str(adapter), "--output", str(tmp_path / "m3"), "--base", str(moved)]
    assert main(argv) == 0
    assert (tmp_path / "m3" / "model.safetensors").exists()


def test_train_logs_the_cpu_thread_choice(tmp_path, model_dir, capsys):
    config = trl_config(tmp_path, model_dir, eval_strategy="no", use_peft=False)
    assert main(["train", str(config), "--torch_num_threads", "1"]) == 0
    assert "CPU threads: 1 (torch_num_threads)" in capsys.readouterr().out


def test_a_bare_flag_turns_an_optional_boolean_on(tmp_path):
    from chatsft.cli.parser import parse

    argv = ["--model", "m", "--dataset", "d", "--padding_free", "--completion_only_loss"]
    _, sft, _, _ = parse(build_parser(), argv).values
    assert sft.padding_free is True and sft.completion_only_loss is True
    argv = ["--model", "m", "--dataset", "d", "--padding_free", "false"]
    assert parse(build_parser(), argv).values[1].padding_free is False


def test_remote_code_and_unsafe_pickles_are_refused_in_one_line(tmp_path, model_dir, capsys):
    import pickle
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)  # its tokenizer loads; the model needs its own code
    (custom / "config.json").write_text(
        json.dumps(
            {
                "model_type": "weird_custom",
                "auto_map": {
                    "AutoConfig": "configuration_weird.WeirdConfig",
                    "AutoModelForCausalLM": "modeling_weird.WeirdModel",
                },
            }
        )
    )
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats(4)))
    argv = ["train", "--dataset", str(data), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--model", str(custom)]) == 2  # and no prompt on stdin
    assert "field 'trust_remote_code'" in capsys.readouterr().err
    (custom / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    assert main([*argv, "--model", str(custom)]) == 2
    assert "could not load the model" in capsys.readouterr().err
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    (evil / "model.safetensors").unlink()
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(os.system))
    assert main([*argv, "--model", str(evil)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "unsafe to unpickle" in err[0], err
