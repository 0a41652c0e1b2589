"""`chatsft train|generate|chat|merge|estimate|inspect|demo`: thin wrappers over the Python API. Bad input → one
line, exit code 2."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback

from .chat import add_chat_parser
from .errors import ChatSFTError
from .estimate import add_estimate_parser
from .generate import add_generate_parser
from .inspect_data import add_inspect_parser


def cmd_train(rest: list[str]) -> int:
    from .data.load import load_data, split_eval
    from .run_config import load_run_config, peft_config_of, quantization_kwargs
    from .trainer import SFTTrainer

    config = rest.pop(0) if rest and not rest[0].startswith("--") else None
    run = load_run_config(config, rest)
    if run.streaming and run.sft.max_steps <= 0:
        raise ChatSFTError(
            "streaming data has no length, so the run needs max_steps", field="max_steps"
        )
    if run.streaming and run.eval_fraction:
        raise ChatSFTError(
            "eval_fraction cannot split a stream", field="eval_fraction", hint="use eval_dataset"
        )
    quantization = quantization_kwargs(run)
    if quantization:
        run.sft.model_init_kwargs = {**(run.sft.model_init_kwargs or {}), **quantization}
    train = load_data(run.dataset, run.dataset_split, streaming=run.streaming)
    evaluation = None
    if run.eval_dataset or run.eval_split:
        evaluation = load_data(run.eval_dataset or run.dataset, run.eval_split or "train")
    elif run.eval_fraction:
        train, evaluation = split_eval(train, run.eval_fraction, run.sft.seed)
    check_writable(run.sft.output_dir)
    try:
        trainer = SFTTrainer(
            model=run.model,
            args=run.sft,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=peft_config_of(run),
        )
    except ChatSFTError as err:
        raise err.with_source(run.dataset) from None
    trainer.train(resume_from_checkpoint=resume_point(run))
    save_final(trainer, run.sft.output_dir)
    if trainer.args.should_save:
        print(f"[chatsft] saved to {run.sft.output_dir}: {describe_files(run.sft.output_dir)}")
    return 0


def check_writable(folder: str) -> None:
    """Fail before training, not after hours of it, when the output folder cannot be written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ChatSFTError("output_dir is a file, not a folder", source=folder, field="output_dir")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".chatsft-write-test-{os.getpid()}")  # one per rank
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ChatSFTError(
            f"cannot write here ({err.strerror})", source=folder, field="output_dir"
        ) from None


def save_final(trainer, output_dir: str) -> None:
    """Save into a hidden folder, then move the files in: a crash or a full disk mid-save never
    leaves output_dir looking like a finished model."""
    staging = os.path.join(output_dir, ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(staging)
    except OSError as err:
        raise ChatSFTError(
            f"saving the model failed ({err.strerror or err}); the previous checkpoints are "
            f"intact and the partial save is in {staging}",
            source=output_dir,
            hint="free disk space, then run again with --resume",
        ) from None
    if trainer.args.should_save:  # only the main process writes
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)


def resume_point(run) -> str | None:
    """`resume: true` → the newest complete checkpoint-N in output_dir (an error if none)."""
    if not run.resume:
        return None
    if isinstance(run.resume, str):
        if not os.path.isdir(run.resume):
            raise ChatSFTError("checkpoint folder not found", source=run.resume, field="resume")
        return run.resume
    from .trainer import newest_complete_checkpoint

    last = newest_complete_checkpoint(run.sft.output_dir)
    if last is None:
        raise ChatSFTError(
            "no checkpoint to resume from",
            source=run.sft.output_dir,
            field="resume",
            hint="train without --resume, or point --resume at a checkpoint folder",
        )
    print(f"[chatsft] resuming from {last}")
    return last


def describe_files(folder: str) -> str:
    sizes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith((".safetensors", ".pt", ".bin")):
            sizes.append(f"{name} {os.path.getsize(path) / 2**20:.1f} MiB")
    return ", ".join(sizes)


def cmd_merge(args: argparse.Namespace) -> int:
    from .model.peft_setup import merge_adapter

    out = merge_adapter(args.adapter_dir, args.output)
    print(f"[chatsft] merged model written to {out}: {describe_files(out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatsft", description="Supervised fine-tuning of chat language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train from a YAML config, with --field value overrides",
        description="Train from CONFIG.yaml. Any SFTConfig field, plus model, dataset, "
        "dataset_split, eval_dataset, eval_split, eval_fraction and output_dir, can be set in the "
        "YAML or overridden as --field value.",
    )
    train.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="[CONFIG.yaml] [--field value ...]",
        help="YAML config (optional if flags give everything), then overrides",
    )
    demo = sub.add_parser(
        "demo", help="train the bundled tiny model offline and show that it learned"
    )
    demo.add_argument("--output-dir", default="demo-output", help="where to save the model")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    merge = sub.add_parser(
        "merge", help="merge a LoRA adapter folder into its base model (a standalone folder)"
    )
    merge.add_argument("adapter_dir")
    merge.add_argument("--output", required=True, help="new folder for the merged model")
    merge.set_defaults(func=cmd_merge)
    add_generate_parser(sub)
    add_chat_parser(sub)
    add_estimate_parser(sub)
    add_inspect_parser(sub)
    # `train` takes free-form --field overrides, which argparse would reorder; main() parses them.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
            return cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ChatSFTError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"chatsft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatsft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
