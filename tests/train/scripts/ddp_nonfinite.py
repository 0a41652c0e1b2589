"""Run by test_distributed.py with torchrun (2 ranks): rank 1 alone gets a NaN forward at step 2.
Each rank writes the steps it skipped and its final weights' fingerprint to <out>.<rank>.json."""

import json
import sys

import datasets
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from chatsft import SFTConfig, SFTTrainer

model_dir, data_file, out_file = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_dir)
model = LlamaForCausalLM.from_pretrained(model_dir)
cfg = SFTConfig(
    output_dir=out_file + ".run",
    max_steps=3,
    per_device_train_batch_size=2,
    learning_rate=5e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    max_length=64,
    max_nonfinite_batches=1,
    seed=7,
    use_cpu=True,
)
trainer = SFTTrainer(
    model=model,
    args=cfg,
    train_dataset=datasets.load_dataset("json", data_files=data_file, split="train"),
)
rank = trainer.args.process_index
calls = []


def nan_on_rank_1_step_2(module, inputs, output):
    calls.append(1)
    return output * float("nan") if rank == 1 and len(calls) == 2 else output


model.model.embed_tokens.register_forward_hook(nan_on_rank_1_step_2)
trainer.train()
weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters()}
finite = all(torch.isfinite(p).all().item() for p in trainer.model.parameters())
with open(f"{out_file}.{rank}.json", "w") as f:
    json.dump({"skipped": trainer.nonfinite_steps, "weights": weights, "finite": finite}, f)
# Shut the process group down before the interpreter does (see ddp_train.py).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
