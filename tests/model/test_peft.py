"""LoRA through peft_config and YAML, adapter-only checkpoints, and `chatsft merge`."""

from __future__ import annotations

import datasets
import torch
import yaml
from conftest import chats, write_jsonl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from chatsft import SFTConfig, SFTTrainer, load_for_inference
from chatsft.cli import main


def test_lora_trains_only_adapters_and_merges(tmp_path, model_dir):
    cfg = SFTConfig(
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model_dir,
        args=cfg,
        train_dataset=datasets.Dataset.from_list(chats(8)),
        peft_config=lora,
    )
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers × (q: A 4×32 + B 32×4, v: A 4×32 + B 16×4)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_lora == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter, _ = load_for_inference(str(out))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-4, atol=1e-4)


def test_use_peft_from_yaml(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chats(8))
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": model_dir,
                "dataset": str(data),
                "output_dir": str(tmp_path / "out"),
                "use_peft": True,
                "lora_r": 2,
                "lora_target_modules": ["q_proj"],
                "max_steps": 1,
                "save_strategy": "no",
                "max_length": 64,
            }
        )
    )
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "trainable of" in out and "adapter_model.safetensors" in out
