"""Data preparation speed: chatsft vs TRL 1.16 on the same conversations (examples/s).

Both trainers are constructed on the shared workload's tokenizer and a tiny model; construction time
is dominated by dataset preparation (templating, tokenization, masks, truncation, packing).

    .venv/bin/python bench/prep_vs_trl.py --rows 20000 [--packing] [--no-assistant-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

SHARED = Path(
    os.environ.get("CHATSFT_SHARED_BENCH", Path(__file__).resolve().parents[2] / "shared" / "bench")
)


def build(framework: str, rows, tok, model, assistant_only: bool, packing: bool) -> float:
    import datasets

    if framework == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from chatsft import SFTConfig, SFTTrainer
    ds = datasets.Dataset.from_list(rows)
    cfg = SFTConfig(
        output_dir=f"/tmp/prep-{framework}",
        max_length=512,
        assistant_only_loss=assistant_only,
        packing=packing,
        report_to="none",
        disable_tqdm=True,
        bf16=False,  # TRL's default; this CPU has none, and training never starts here
    )
    start = time.perf_counter()
    SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--no-assistant-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(SHARED))
    import datasets
    import workload

    datasets.disable_progress_bars()
    tok = workload.tokenizer(str(SHARED / "workload_tokenizer"))
    model = workload.model(tok, "tiny")
    rows = workload.conversations(args.rows)
    assistant_only = not args.no_assistant_only
    print(
        f"{args.rows} conversations, max_length 512, assistant_only_loss={assistant_only}, packing={args.packing}"
    )
    results = {}
    for fw in ("trl", "chatsft"):
        seconds = build(fw, rows, tok, model, assistant_only, args.packing)
        results[fw] = args.rows / seconds
        print(f"{fw:8s} {seconds:7.2f} s  {results[fw]:9.0f} examples/s", flush=True)
    print(f"ratio chatsft/trl: {results['chatsft'] / results['trl']:.2f}x")


if __name__ == "__main__":
    main()
