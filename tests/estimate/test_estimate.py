"""chatsft.estimate against reality: checkpoint files written by a real SFTTrainer run, exact
parameter counts, fitting the batch to a budget, and `chatsft estimate` (the CLI)."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import yaml
from conftest import chats, make_model
from peft import LoraConfig

from chatsft import ChatSFTError, SFTConfig, SFTTrainer
from chatsft.cli import main
from chatsft.estimate import estimate, fit_batch, parse_memory

MiB = 2**20


def train_one_checkpoint(tmp_path, model_dir, peft_config=None):
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=4,
        max_length=64,
        disable_tqdm=True,
        report_to="none",
    )
    trainer = SFTTrainer(
        model=model_dir,
        args=args,
        train_dataset=datasets.Dataset.from_list(chats(8)),
        peft_config=peft_config,
    )
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-1"
    return {f: os.path.getsize(folder / f) for f in os.listdir(folder)}


def predicted(est):
    return {f.name: f.bytes for f in est.checkpoint_files}


def test_full_checkpoint_files_match_a_real_run(tmp_path, model_dir):
    real = train_one_checkpoint(tmp_path, model_dir)
    est = estimate(model_dir, max_length=64, batch_size=4)
    pred = predicted(est)
    for name in ("model.safetensors", "optimizer.pt"):
        assert pred[name] == pytest.approx(real[name], rel=0.01), name
    # Every file the Trainer writes is listed (the small ones at typical sizes).
    assert set(real) <= set(pred), set(real) - set(pred)
    assert est.checkpoint_bytes == pytest.approx(sum(real.values()), rel=0.05)
    # AdamW: two fp32 moments per parameter.
    assert est.memory["optimizer_state"] == pytest.approx(8 * est.trainable_params, rel=0.01)
    assert "exp_avg" in est.note and "save_only_model" in est.note


def test_lora_adapter_files_match_a_real_run(tmp_path, model_dir):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    real = train_one_checkpoint(tmp_path, model_dir, peft_config=lora)
    est = estimate(model_dir, max_length=64, batch_size=4, peft_config=lora)
    pred = predicted(est)
    assert "model.safetensors" not in pred
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        assert pred[name] == pytest.approx(real[name], rel=0.01), name
    assert set(real) <= set(pred), set(real) - set(pred)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_and_weight_file_are_exact(tmp_path, tokenizer, tied):
    from transformers import LlamaForCausalLM

    config = make_model(tokenizer, hidden=48, layers=3).config
    config.tie_word_embeddings = tied
    real = LlamaForCausalLM(config)
    real.save_pretrained(tmp_path)
    est = estimate(str(tmp_path), max_length=32, batch_size=1)
    assert est.total_params == sum(p.numel() for p in real.parameters())
    assert est.trainable_params == est.total_params
    if tied:  # one shared matrix: counted once, saved once
        every = sum(p.numel() for _, p in real.named_parameters(remove_duplicate=False))
        assert est.total_params < every
    size = predicted(est)["model.safetensors"]
    assert size == os.path.getsize(tmp_path / "model.safetensors")


def test_lora_counts_match_peft(tokenizer):
    from peft import get_peft_model

    model = make_model(tokenizer)
    cfg = {"r": 8, "target_modules": "all-linear"}
    peft_model = get_peft_model(make_model(tokenizer), LoraConfig(task_type="CAUSAL_LM", **cfg))
    est = estimate(model.config, max_length=32, batch_size=1, lora=cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert est.trainable_params == trainable
    assert est.total_params == sum(p.numel() for p in peft_model.parameters())
    assert est.memory["optimizer_state"] == pytest.approx(8 * trainable, rel=0.01)


def test_memory_grows_with_tokens_and_checkpointing_helps(model_dir, tokenizer):
    small = estimate(model_dir, max_length=128, batch_size=2)
    big = estimate(model_dir, max_length=128, batch_size=8)
    assert big.memory["activations"] > 3 * small.memory["activations"]
    assert big.memory["weights"] == small.memory["weights"]
    gc = estimate(model_dir, max_length=128, batch_size=8, gradient_checkpointing=True)
    assert gc.memory["activations"] < big.memory["activations"]
    assert gc.activations_without_checkpointing == big.memory["activations"]
    # 8-bit AdamW: ~2 bytes per parameter (tensors under 4096 elements stay fp32, as in bnb).
    wide = make_model(tokenizer, hidden=128).config
    adamw = estimate(wide, max_length=128, batch_size=2)
    bnb = estimate(wide, max_length=128, batch_size=2, optimizer="adamw_bnb_8bit")
    assert bnb.memory["optimizer_state"] < adamw.memory["optimizer_state"] / 3
    lean = estimate(
        model_dir, max_length=128, batch_size=2, save_only_model=True, save_total_limit=2
    )
    assert "optimizer.pt" not in predicted(lean)
    assert lean.total_disk_bytes == 2 * lean.checkpoint_bytes + lean.final_model_bytes


def test_checkpointing_every_n_layers_sits_between_none_and_all(tokenizer):
    """transformers' every_n_layers checkpoints layers 0, n, 2n, ...; the others keep all their
    activations, so the prediction moves from all-checkpointed towards none."""
    config = make_model(tokenizer, layers=6).config
    kw = dict(max_length=128, batch_size=8)
    none = estimate(config, **kw)
    acts = {
        n: estimate(config, gradient_checkpointing=True, every_n_layers=n, **kw)
        for n in (1, 2, 3, 99)
    }
    ordered = [acts[n].memory["activations"] for n in (1, 2, 3, 99)]
    assert ordered == sorted(set(ordered)) and ordered[-1] < none.memory["activations"]
    # n=2 keeps layers 1, 3 and 5 whole and only the inputs of 0, 2 and 4: the same as
    # everything checkpointed (6 inputs and one recomputed layer) plus 2 layers, minus 3 inputs.
    gc, half = acts[1].memory["activations"], acts[2].memory["activations"]
    layer = (none.memory["activations"] - acts[1].memory["activations"]) / 5  # up to the inputs
    assert half > gc + layer and half < none.memory["activations"]
    assert acts[2].settings["every_n_layers"] == 2
    assert "on for 1 decoder layer in 2" in acts[2].table()


def test_fit_batch_shrinks_the_micro_batch_then_checkpoints(tokenizer):
    config = make_model(tokenizer, hidden=64, layers=4).config
    kw = dict(max_length=512, effective_batch_size=16, headroom=0.0)
    roomy = fit_batch(config, memory="4GiB", **kw)
    assert (roomy.batch_size, roomy.gradient_accumulation_steps) == (16, 1)
    assert not roomy.gradient_checkpointing
    sizes = {b: estimate(config, max_length=512, batch_size=b) for b in (1, 4, 16)}
    # A budget between the micro-batch 4 and 16 peaks: a smaller micro-batch, same effective batch.
    budget = (sizes[4].peak_bytes + sizes[16].peak_bytes) // 2
    tight = fit_batch(config, memory=budget, **kw)
    assert 4 <= tight.batch_size < 16 and not tight.gradient_checkpointing
    assert tight.batch_size * tight.gradient_accumulation_steps == 16
    assert "effective batch 16" in tight.reason
    # Below micro-batch 1 without checkpointing: checkpointing is turned on.
    gc1 = estimate(config, max_length=512, batch_size=1, gradient_checkpointing=True)
    tighter = fit_batch(config, memory=(gc1.peak_bytes + sizes[1].peak_bytes) // 2, **kw)
    assert tighter.gradient_checkpointing and tighter.batch_size >= 1
    assert "gradient checkpointing on" in tighter.reason
    with pytest.raises(ChatSFTError, match="even micro-batch 1"):
        fit_batch(config, memory="1MiB", **kw)


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("24G") == 24 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("512 MiB") == 512 * MiB
    with pytest.raises(ChatSFTError):
        parse_memory("lots")


def estimate_cli(argv, capsys):
    """`chatsft estimate ARGV` through the dispatcher: (exit code, stdout, stderr)."""
    code = main(["estimate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_cli_json_from_flags(model_dir, capsys):
    argv = ["--model", model_dir, "--max_length", "64", "--per_device_train_batch_size", "2"]
    code, out, _ = estimate_cli([*argv, "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["settings"]["batch_size"] == 2 and data["peak_bytes"] > data["memory"]["weights"]
    assert any(f["name"] == "optimizer.pt" for f in data["checkpoint_files"])
    # The older dashed spellings give the same run.
    old = ["--model", model_dir, "--max-length", "64", "--batch-size", "2", "--json"]
    code, out, _ = estimate_cli(old, capsys)
    assert code == 0 and json.loads(out) == data


def test_cli_older_spellings(tmp_path, model_dir, capsys):
    code, out, _ = estimate_cli(
        [
            *("--model", model_dir, "--max-length", "64", "--batch-size", "2"),
            *(
                "--optimizer",
                "sgd",
                "--save-total-limit",
                "2",
                "--gradient-accumulation-steps",
                "3",
            ),
            *("--gradient-checkpointing", "--every-n-layers", "2", "--world-size", "2", "--json"),
        ],
        capsys,
    )
    settings = json.loads(out)["settings"]
    assert code == 0
    assert settings["optimizer"] == "sgd" and settings["save_total_limit"] == 2
    assert settings["gradient_accumulation_steps"] == 3 and settings["world_size"] == 2
    assert settings["gradient_checkpointing"] and settings["every_n_layers"] == 2
    cfg = write_yaml(tmp_path / "lora.yaml", {"model": model_dir, "use_peft": True, "lora_r": 8})
    # --lora-r 0: no LoRA, the full model trains; comma-separated target modules.
    code, out, _ = estimate_cli([cfg, "--lora-r", "0", "--json"], capsys)
    assert code == 0 and json.loads(out)["settings"]["lora_r"] is None
    code, out, _ = estimate_cli([cfg, "--lora-target-modules", "q_proj,v_proj", "--json"], capsys)
    settings = json.loads(out)["settings"]
    assert settings["lora_r"] == 8 and settings["lora_target_modules"] == ["q_proj", "v_proj"]


def test_cli_reads_the_train_yaml_and_fits(tmp_path, model_dir, capsys):
    cfg = write_yaml(
        tmp_path / "run.yaml",
        {
            "model": model_dir,
            "dataset": "unused.jsonl",
            "max_length": 256,
            "per_device_train_batch_size": "auto",
            "save_total_limit": 2,
            "optim": "adamw_torch",
        },
    )
    code, out, _ = estimate_cli([cfg, "--memory", "8GiB", "--effective_batch_size", "4"], capsys)
    assert code == 0
    assert "fit: per_device_train_batch_size=4 gradient_accumulation_steps=1" in out
    assert "optimizer.pt" in out and "because" in out
    # A number on the command line overrides the file's auto: no fit.
    code, out, _ = estimate_cli([cfg, "--per_device_train_batch_size", "3", "--json"], capsys)
    assert code == 0 and json.loads(out)["settings"]["batch_size"] == 3
    cfg = write_yaml(tmp_path / "lora.yaml", {"model": model_dir, "use_peft": True, "lora_r": 8})
    code, out, _ = estimate_cli(["--config", cfg, "--json"], capsys)
    data = json.loads(out)
    assert (
        data["settings"]["lora_r"] == 8 and data["settings"]["lora_target_modules"] == "all-linear"
    )
    assert any(f["name"] == "adapter_model.safetensors" for f in data["checkpoint_files"])
    cfg = write_yaml(
        tmp_path / "gc.yaml",
        {
            "model": model_dir,
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"every_n_layers": 2},
        },
    )
    code, out, _ = estimate_cli([cfg, "--json"], capsys)
    assert json.loads(out)["settings"]["every_n_layers"] == 2
    cfg = write_yaml(tmp_path / "typo.yaml", {"model": model_dir, "max_lenght": 8})
    code, out, err = estimate_cli([cfg], capsys)
    assert code == 2 and "did you mean 'max_length'" in err and len(err.splitlines()) == 1


def test_cli_batch_auto_as_a_flag_checkpoints_only_when_it_must(tokenizer, tmp_path, capsys):
    model = make_model(tokenizer, hidden=64, layers=4)
    model.save_pretrained(tmp_path / "m")
    model_dir = str(tmp_path / "m")
    plain = estimate(model_dir, max_length=512, batch_size=1)
    gc = estimate(model_dir, max_length=512, batch_size=1, gradient_checkpointing=True)
    budget = str((plain.peak_bytes + gc.peak_bytes) // 2)  # fits only with checkpointing
    argv = ["--model", model_dir, "--max_length", "512", "--memory", budget]
    fit = [*argv, "--per_device_train_batch_size", "auto", "--effective_batch_size", "2"]
    code, out, _ = estimate_cli([*fit, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["gradient_checkpointing"] and result["batch_size"] >= 1
    # --no-gradient-checkpointing (the older flag) keeps it off, so nothing fits.
    code, _, err = estimate_cli([*fit, "--no-gradient-checkpointing"], capsys)
    assert code == 2 and "even micro-batch 1 needs" in err
    # Without auto, --memory only says whether the configured batch fits.
    code, out, _ = estimate_cli([*argv, "--per_device_train_batch_size", "1"], capsys)
    assert code == 0 and "does NOT fit" in out


def test_cli_bf16_config_runs_on_a_cpu_machine(tmp_path, model_dir, capsys):
    """bf16/fp16 are what the run will use on its GPU; this machine's hardware is not asked."""
    cfg = write_yaml(
        tmp_path / "gpu.yaml",
        {"model_name_or_path": model_dir, "dataset_name": "unused.jsonl", "bf16": True},
    )
    code, out, err = estimate_cli([cfg, "--max_length", "64", "--device", "cuda", "--json"], capsys)
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert settings["mixed_precision"] == "bf16" and settings["device"] == "cuda"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--world_size", "two"], "world_size"),
        (["--device", "gpu"], "invalid choice"),
        (["--dtype", "float64"], "invalid choice"),
        (["--optim", "adamw_nope"], "invalid choice"),
        (["--memory", "lots"], "memory"),
        (["--effective_batch_size", "8"], "per_device_train_batch_size auto"),
        (["--max_length", "None"], "max_length"),
    ],
)
def test_cli_bad_values_are_one_line_and_exit_2(model_dir, capsys, argv, words):
    code, out, err = estimate_cli(["--model", model_dir, *argv], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and words in err, err


def test_estimate_and_train_read_the_same_config(tmp_path, model_dir, capsys):
    """One YAML, two commands: the run `chatsft estimate` sizes is the run `chatsft train` builds
    (max_length, batch, accumulation, LoRA), with train-only keys accepted."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from chatsft.cli.build import peft_config
    from chatsft.cli.parser import parse
    from chatsft.cli.train import build_parser
    from chatsft.config import ModelConfig

    cfg = write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": model_dir,
            "dataset_name": "unused.jsonl",
            "output_dir": str(tmp_path / "out"),
            "torch_num_threads": 1,
            "max_length": 96,
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 2,
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_modules": ["q_proj", "v_proj"],
        },
    )
    parsed = parse(build_parser(), [cfg], training=False)
    sft = next(v for v in parsed.values if isinstance(v, SFTConfig))
    model_args = next(v for v in parsed.values if isinstance(v, ModelConfig))
    lora = peft_config(model_args)
    code, out, err = estimate_cli([cfg, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    settings = data["settings"]
    assert settings["max_length"] == sft.max_length == 96
    assert settings["batch_size"] == sft.per_device_train_batch_size == 3
    assert settings["gradient_accumulation_steps"] == sft.gradient_accumulation_steps == 2
    assert settings["lora_r"] == lora.r == 4
    assert settings["lora_target_modules"] == sorted(lora.target_modules)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    assert data["trainable_params"] == sum(
        p.numel() for p in trained.parameters() if p.requires_grad
    )
