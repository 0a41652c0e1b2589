"""The offline demo: train a tiny Llama from scratch on synthetic chat tasks and show it learned them.

Everything comes from files shipped in the package (model config, tokenizer, task generator), so the
demo needs no network and no GPU. It measures held-out exact match before and after training with
chatsft's SFTTrainer (assistant-only loss, packing), saves the result and reloads it with plain
transformers classes.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from ..config import SFTConfig
from ..trainer import SFTTrainer
from .tasks import make_datasets

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class DemoSize:
    num_train: int
    num_eval: int
    epochs: float
    learning_rate: float
    batch_rows: int  # packed rows per optimizer step
    max_length: int  # tokens per packed row


FULL = DemoSize(
    num_train=12000, num_eval=300, epochs=2, learning_rate=3e-3, batch_rows=4, max_length=512
)
QUICK = DemoSize(
    num_train=4000, num_eval=150, epochs=2, learning_rate=3e-3, batch_rows=4, max_length=512
)


def load_demo_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def build_demo_model(seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny Llama from the shipped config (weights depend only on seed)."""
    config = AutoConfig.from_pretrained(ASSETS / "model")
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers, one batched `generate` per chunk of prompts, cut at the first EOS."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[start : start + batch_size]
            ]
            # The chat template writes every special token itself; the tokenizer must add none.
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers += tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model: torch.nn.Module, tokenizer: Any, rows: Any) -> tuple[float, list[str]]:
    """Share of rows whose greedy answer equals the reference assistant turn exactly."""
    prompts = [row["messages"][:-1] for row in rows]
    expected = [row["messages"][-1]["content"] for row in rows]
    answers = generate_answers(model, tokenizer, prompts)
    hits = sum(a == e for a, e in zip(answers, expected))
    return hits / max(len(rows), 1), answers


def run_demo(output_dir: str, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train the demo model, print what it learned, save it to output_dir; return the numbers."""
    t0 = time.perf_counter()
    size = QUICK if quick else FULL
    set_seed(seed)
    tokenizer = load_demo_tokenizer()
    model = build_demo_model(seed)
    train_ds, eval_ds = make_datasets(size.num_train, size.num_eval)
    accuracy_before, _ = exact_match(model, tokenizer, eval_ds)

    args = SFTConfig(
        output_dir=output_dir,
        assistant_only_loss=True,
        packing=True,
        max_length=size.max_length,
        per_device_train_batch_size=size.batch_rows,
        num_train_epochs=size.epochs,
        learning_rate=size.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train

    accuracy_after, answers = exact_match(trainer.model, tokenizer, eval_ds)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"accuracy before {accuracy_before:.1%}, after {accuracy_after:.1%}")
    print(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {trainer.state.global_step} steps, "
        f"{train_seconds:.1f}s"
    )
    for row, answer in list(zip(eval_ds, answers))[:3]:
        print(row["messages"][0]["content"], "|", row["messages"][1]["content"], "|", answer)

    trainer.save_model(output_dir)
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "final_loss": losses[-1],
        "output_dir": output_dir,
    }


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    print(run_demo(out, quick=os.environ.get("QUICK") == "1"))
