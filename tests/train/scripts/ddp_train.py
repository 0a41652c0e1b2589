"""Run by test_distributed.py, once with torchrun (2 ranks) and once alone: a few SFT steps on a tiny
model; rank 0 writes the per-step losses and the final weights' fingerprint to a JSON file."""

import json
import sys

import datasets
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from chatsft import SFTConfig, SFTTrainer

model_dir, data_file, out_file, batch, padding_free = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(model_dir)
model = LlamaForCausalLM.from_pretrained(model_dir)
cfg = SFTConfig(
    output_dir=out_file + ".run",
    max_steps=3,
    per_device_train_batch_size=int(batch),
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    optim="sgd",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    assistant_only_loss=True,
    padding_free=padding_free == "1",
    max_length=64,
    seed=7,
    use_cpu=True,
)
trainer = SFTTrainer(
    model=model,
    args=cfg,
    train_dataset=datasets.load_dataset("json", data_files=data_file, split="train"),
)
trainer.train()
if trainer.args.process_index == 0:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_trained_tokens"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters()}
    with open(out_file, "w") as f:
        json.dump(
            {
                "losses": losses,
                "tokens": tokens,
                "weights": weights,
                "world": trainer.args.world_size,
            },
            f,
        )
# Shut the process group down before the interpreter does: left to exit, gloo's threads can abort
# one rank ("terminate called without an active exception") after a run that succeeded.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
