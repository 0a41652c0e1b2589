"""Where packed training time goes: one train step (forward, backward, AdamW) on the same packed
rows, laid out and attended in different ways. A guide for chatsft's packing path, not a framework
comparison (that is vs_trl.py).

Layouts, all on chatsft's own packed rows (best-fit decreasing, max_length tokens each):

- flat:          every row of the batch concatenated into one [1, total] row (chatsft's
                 PaddingFreeCollator), position_ids restarting per document, stock SDPA: transformers
                 builds a dense block-diagonal [1, 1, total, total] mask (TRL's packing path too).
- flat-docattn:  the flat row with chatsft's document attention (model/attention.py: one causal
                 SDPA call per document, no mask), what SFTTrainer switches packed runs to.
- rows:          the packed rows kept as [batch, max_length] (right-padded), position_ids restarting
                 per document: documents still isolated, mask [batch, 1, L, L].
- rows-causal:   [batch, max_length] with plain causal attention (documents NOT isolated): the
                 README's bare-loop reference.

Each layout runs with chatsft's loss as SFTTrainer uses it (logits only at trained positions,
chunked LM head + cross-entropy) and, with --full-logits, also with logits for every position.

    python bench/layouts.py --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from vs_trl import WORKLOADS, build_model, load_workload_module, shared_bench_dir

from chatsft.data.collate import IGNORE_INDEX, PaddingFreeCollator
from chatsft.data.encode import PrepOptions
from chatsft.data.prepare import prepare_for_training
from chatsft.model.attention import use_document_attention
from chatsft.model.loss import supervised_loss


def packed_rows(wl: Any, tok: Any, n: int, max_length: int) -> datasets.Dataset:
    data = datasets.Dataset.from_list(wl.conversations(n))
    opts = PrepOptions(eos_token=tok.eos_token, assistant_only_loss=True, max_length=max_length)
    rows, _ = prepare_for_training(data, tok, opts, packing=True)
    return rows


def flat_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    return PaddingFreeCollator()(examples)


def rows_batch(examples: list[dict], pad_id: int, isolate: bool = True) -> dict[str, torch.Tensor]:
    """[batch, width] rows; with `isolate`, position_ids restart per document (pads: their own doc)."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {k: [] for k in ("input_ids", "labels", "position_ids")}
    for e in examples:
        one = PaddingFreeCollator()([e])
        pad = width - one["input_ids"].shape[1]
        out["input_ids"].append(F.pad(one["input_ids"][0], (0, pad), value=pad_id))
        out["labels"].append(F.pad(one["labels"][0], (0, pad), value=IGNORE_INDEX))
        out["position_ids"].append(torch.cat([one["position_ids"][0], torch.arange(pad)]))
    batch = {k: torch.stack(v) for k, v in out.items()}
    if not isolate:
        del batch["position_ids"]
    return batch


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def step(model, optimizer, batch, full_logits: bool) -> tuple[float, float]:
    """One training step; returns (wall seconds, this process's CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if full_logits:
        loss_sum = full_logits_loss(model, batch)
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss_sum = supervised_loss(model, inputs, batch["labels"], chunked=True)[0].loss_sum
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    (loss_sum / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (plus 1 warm-up)")
    p.add_argument("--full-logits", action="store_true", help="also time full-logit loss")
    p.add_argument("--shared", help="shared/bench folder")
    opts = p.parse_args()

    workload = WORKLOADS["cpu"]
    shared = shared_bench_dir(opts.shared)
    wl = load_workload_module(shared)
    tok = wl.tokenizer(str(shared / "workload_tokenizer"))
    rows = packed_rows(wl, tok, workload.conversations, workload.max_length)
    bs = workload.batch_size
    batches = [
        [rows[i] for i in range(j * bs, (j + 1) * bs)] for j in range(opts.steps + 1)
    ]  # the same examples for every variant
    layouts = {
        "flat": flat_batch,
        "flat-docattn": flat_batch,
        "rows": lambda ex: rows_batch(ex, tok.pad_token_id),
        "rows-causal": lambda ex: rows_batch(ex, tok.pad_token_id, isolate=False),
    }
    variants = [(name, False) for name in layouts]
    if opts.full_logits:
        variants += [(name, True) for name in layouts]
    state = build_model(wl, tok, workload, seed=0).state_dict()
    runners = []
    for name, _ in variants:
        model = build_model(wl, tok, workload, seed=0)
        model.load_state_dict(state)
        model.train()
        if name == "flat-docattn":
            use_document_attention(model)
        runners.append((model, torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)))
    # Round-robin over the variants, batch by batch, so machine noise hits them alike.
    times: list[list[tuple[float, float]]] = [[] for _ in variants]
    for b in batches:
        for i, (name, full) in enumerate(variants):
            times[i].append(step(*runners[i], layouts[name](b), full))
    real = sum(len(e["input_ids"]) for b in batches[1:] for e in b)
    print(f"{len(rows)} packed rows; {real} real tokens over {opts.steps} timed steps")
    print("| layout | logits | median s/step | real tok/s | median CPU s/step |")
    print("|---|---|---:|---:|---:|")
    for (name, full), t in zip(variants, times):
        wall = statistics.median(w for w, _ in t[1:])
        cpu = statistics.median(c for _, c in t[1:])
        logits = "all positions" if full else "trained only"
        print(f"| {name} | {logits} | {wall:.2f} | {real / opts.steps / wall:,.0f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
