"""The offline demo: train a tiny Llama from scratch on synthetic chat tasks and show it learned them.

Everything comes from files shipped in the package (model config, tokenizer, task generator), so the
demo needs no network and no GPU. It scores held-out exact match before and after training with
chatsft's SFTTrainer (assistant-only loss, packing), saves the model and reloads it with plain
transformers classes.

    python -m chatsft.demo.run OUTPUT_DIR [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)

from ..config import SFTConfig
from ..data.encode import encode
from ..data.formats import Conversation
from ..train.model_card import CONFIG_FILE
from ..train.trainer import SFTTrainer
from .tasks import TASKS, make_datasets

ASSETS = Path(__file__).parent / "assets"
# The task rows do not depend on the run's seed, so every seed is scored on the same held-out set.
DATA_SEED = 0


@dataclass(frozen=True)
class DemoSize:
    num_train: int  # distinct training chats
    num_eval: int  # held-out chats, balanced over the tasks
    epochs: int
    learning_rate: float
    max_length: int  # tokens per packed row; one row per optimizer step
    logging_steps: int


# A chat is 20 tokens, so a 512-token row packs 25 of them: one row per step, many small steps,
# which is what a tiny model from scratch needs (256-token rows learned less for the same compute).
# Held-out accuracy jumps once the model finds where to copy from for reversal, after about 150 to
# 400 steps depending on the seed; both variants run well past that.
FULL = DemoSize(
    num_train=8000, num_eval=300, epochs=3, learning_rate=3e-3, max_length=512, logging_steps=10
)
QUICK = DemoSize(
    num_train=3000, num_eval=150, epochs=4, learning_rate=3e-3, max_length=512, logging_steps=10
)
# Chance is about 0 (four characters and the stop token must all be right), so these bars are
# passed only by learning the rules. Sorting and upper-casing are learned first and alone give 67%.
FULL_ACCURACY_BAR = 0.8
QUICK_ACCURACY_BAR = 0.5


def load_demo_tokenizer() -> Any:
    """The shipped tokenizer: byte-level BPE, one token per letter or digit, ChatML template."""
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def build_demo_model(seed: int = 0) -> transformers.PreTrainedModel:
    """A freshly initialised tiny Llama from the shipped config; its weights depend only on seed."""
    config = AutoConfig.from_pretrained(ASSETS / "model")
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 100,
) -> list[str]:
    """Greedy answers to chat prompts: batched `generate`, left-padded, cut at the first EOS."""
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            # Rendered and tokenized as training encoded them (the template writes every
            # special token), then left-padded.
            chats = [Conversation(p) for p in prompts[start : start + batch_size]]
            ids = [e.input_ids for e in encode(chats, tokenizer, for_generation=True)]
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            # Everything after EOS is padding, which skip_special_tokens drops with the EOS.
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def exact_match(
    model: torch.nn.Module, tokenizer: Any, rows: datasets.Dataset
) -> tuple[float, dict[str, float], list[str]]:
    """Share of rows answered exactly like the reference, overall and per task; and the answers."""
    prompts = [row["messages"][:-1] for row in rows]
    expected = [row["messages"][-1]["content"] for row in rows]
    # A few tokens of slack: an answer that runs past the reference is wrong either way.
    longest = max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected)
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=longest + 3)
    hits = [a == e for a, e in zip(answers, expected)]
    per_task: dict[str, float] = {}
    for task in TASKS:
        mine = [h for p, h in zip(prompts, hits) if p[-1]["content"].startswith(task.instruction)]
        per_task[task.name] = sum(mine) / max(len(mine), 1)
    return sum(hits) / max(len(hits), 1), per_task, answers


class _LossPrinter(TrainerCallback):
    """One short line per ~10% of training instead of Trainer's full log dictionaries."""

    def __init__(self, lines: int = 8) -> None:
        self.lines = lines
        self.next_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not logs or "loss" not in logs or state.global_step < self.next_step:
            return
        self.next_step = state.global_step + max(state.max_steps // self.lines, 1)
        accuracy = logs.get("mean_token_accuracy")
        extra = f"  token accuracy {accuracy:.1%}" if accuracy is not None else ""
        print(f"  step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.3f}{extra}")


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """datasets' map and transformers' weight loading/saving draw bars that bury the demo output."""
    datasets_were_on = not datasets.are_progress_bars_disabled()
    transformers_were_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_were_on:
            datasets.enable_progress_bars()
        if transformers_were_on:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    output_dir: str, *, quick: bool = False, seed: int = 0, num_threads: int | None = 1
) -> dict[str, Any]:
    """Train the demo model from scratch, print what it learned, save it to output_dir.

    seed sets the model's initialisation and the data order; the task rows stay the same.
    num_threads is torch's CPU thread count during the run (None: leave it as it is). One thread is
    the default because this model's matrices are too small to split well: on a two-core machine
    that other work was using too, 360 steps took 17 s on one thread and 107 s on two.

    Returns accuracy_before/accuracy_after (held-out exact match), accuracy_per_task, train_seconds,
    total_seconds, first_loss, final_loss, steps, samples (prompt, expected, answer),
    reload_matches and output_dir.
    """
    with _quiet_progress_bars(), _torch_threads(num_threads):
        return _run(output_dir, QUICK if quick else FULL, seed)


def _run(output_dir: str, size: DemoSize, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    tokenizer = load_demo_tokenizer()
    model = build_demo_model(seed)
    train_ds, eval_ds = make_datasets(size.num_train, size.num_eval, seed=DATA_SEED)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"chatsft demo: a {num_params / 1e6:.2f}M-parameter Llama "
        f"({model.config.num_hidden_layers} layers) trained from scratch on "
        f"{', '.join(t.name for t in TASKS)}; {len(train_ds)} training chats x {size.epochs} "
        f"epochs, {len(eval_ds)} held-out chats; {torch.get_num_threads()} CPU thread(s)"
    )
    accuracy_before, _, _ = exact_match(model, tokenizer, eval_ds)
    print(f"held-out exact match before training: {accuracy_before:.1%}")

    args = SFTConfig(
        output_dir=output_dir,
        assistant_only_loss=True,
        packing=True,
        max_length=size.max_length,
        per_device_train_batch_size=1,
        num_train_epochs=size.epochs,
        learning_rate=size.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=size.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        # A tiny model is faster on the CPU than on any accelerator, and results stay comparable.
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LossPrinter())
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train

    accuracy_after, per_task, answers = exact_match(trainer.model, tokenizer, eval_ds)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    print(
        f"held-out exact match after training: {accuracy_after:.1%} ("
        + ", ".join(f"{name} {acc:.0%}" for name, acc in per_task.items())
        + ")"
    )
    print(
        f"loss {losses[0]:.3f} (step {size.logging_steps}) -> {losses[-1]:.3f} (step {steps}); "
        f"{steps} steps in {train_seconds:.1f}s"
    )
    # One sample per task: the held-out rows are grouped by task.
    per_group = len(eval_ds) // len(TASKS)
    samples = []
    for i in range(0, per_group * len(TASKS), max(per_group, 1)):
        messages = eval_ds[i]["messages"]
        samples.append(
            {
                "prompt": messages[0]["content"],
                "expected": messages[1]["content"],
                "answer": answers[i],
            }
        )
    for s in samples:
        mark = "ok" if s["answer"] == s["expected"] else "wrong"
        print(
            f"  user: {s['prompt']!r}  expected: {s['expected']!r}  model: {s['answer']!r}  {mark}"
        )

    trainer.save_model(output_dir)
    # The chats too, so `chatsft train examples/demo-continue.yaml` can pick up from here.
    train_ds.to_json(os.path.join(output_dir, "data", "train.jsonl"), lines=True)
    eval_ds.to_json(os.path.join(output_dir, "data", "heldout.jsonl"), lines=True)
    # The saved folder must stand on its own: plain transformers classes, same answers.
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    again = generate_answers(
        reloaded, reloaded_tokenizer, [[{"role": "user", "content": s["prompt"]}] for s in samples]
    )
    reload_matches = again == [s["answer"] for s in samples]
    total_seconds = time.perf_counter() - t0
    print(
        f"saved to {output_dir} (with {CONFIG_FILE}); reloaded with AutoModelForCausalLM and "
        f"AutoTokenizer: {'same answers' if reload_matches else 'DIFFERENT answers'}; "
        f"{total_seconds:.0f}s in all"
    )
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "accuracy_per_task": per_task,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "steps": steps,
        "samples": samples,
        "reload_matches": reload_matches,
        "output_dir": output_dir,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the chatsft offline demo.")
    parser.add_argument("output_dir")
    parser.add_argument("--quick", action="store_true", help="smaller, faster variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    run_demo(args.output_dir, quick=args.quick, seed=args.seed, num_threads=args.threads)


if __name__ == "__main__":
    main()
