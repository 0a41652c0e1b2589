"""How many CPU threads train fastest: seconds per optimizer step for a tiny model (the demo's size)
and a ~100M-parameter model, each with 1 thread and with every core. `chatsft train` picks the thread
count from the model size (cli/threads.py); this is the measurement behind its threshold.

    .venv/bin/python bench/cpu_threads.py [--steps 8]

Run it on a quiet machine: other processes on the cores change the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    # (hidden, layers, intermediate, vocab): the demo's tiny Llama and a ~100M one
    "tiny (demo-sized)": (64, 2, 128, 512),
    "~100M": (768, 10, 2048, 32000),
}


def step_seconds(size: tuple[int, int, int, int], threads: int, steps: int, seq: int) -> float:
    hidden, layers, inner, vocab = size
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inner,
        vocab_size=vocab,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (4, seq))
    times = []
    for _ in range(steps + 1):  # the first step (allocations, lazy init) is not timed
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = {}
    for name, size in SIZES.items():
        params = size[1] * (4 * size[0] ** 2 + 3 * size[0] * size[2]) + 2 * size[3] * size[0]
        for threads in sorted({1, cores}):
            seconds = step_seconds(size, threads, args.steps, args.seq)
            results[f"{name}, {threads} thread(s)"] = seconds
            print(
                f"{name:18s} {params / 1e6:7.1f}M params  {threads} thread(s): {seconds:.3f} s/step"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
