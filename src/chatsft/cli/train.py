"""`chatsft train [CONFIG.yaml] [--config FILE] [--field value ...]`: `trl sft`'s surface."""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field

from ..config import ModelConfig, ScriptArguments, SFTConfig
from ..errors import ChatSFTError
from ..train.checkpoints import save_failed
from ..train.output_dir import COMPLETE_FILE, OutputLock, claim
from .parser import CommandParser, Parsed, parse

DESCRIPTION = (
    "Train from a YAML config and/or flags. The keys are TRL's: every SFTConfig field, "
    "ScriptArguments (dataset_name, dataset_config, dataset_train_split, dataset_test_split, ...) "
    "and ModelConfig (model_name_or_path, dtype, use_peft, lora_r, ...); a `trl sft --config` "
    "file runs unchanged. Flags override the file. chatsft's short names (model, dataset, "
    "dataset_split, streaming, resume) are aliases."
)


@dataclass
class TrainCommandArguments:
    """Settings of the command itself (not of the training run)."""

    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (default: chosen for the model size on CPU and logged; "
            "OMP_NUM_THREADS also sets it)."
        },
    )


def build_parser() -> CommandParser:
    return CommandParser(
        (ScriptArguments, SFTConfig, ModelConfig, TrainCommandArguments),
        prog="chatsft train",
        description=DESCRIPTION,
    )


AUTO_BATCH = (
    "per_device_train_batch_size: auto is worked out by `chatsft estimate CONFIG --memory 24GiB` "
    "(it reads the same file); training needs a number: put the per_device_train_batch_size and "
    "gradient_accumulation_steps it prints in the config"
)


def run(argv: list[str]) -> int:
    try:
        parsed = parse(build_parser(), argv)
    except ChatSFTError as err:
        if "per_device_train_batch_size" in err.message and "'auto'" in err.message:
            raise ChatSFTError(AUTO_BATCH, source=err.source) from None
        raise
    script, sft, model_args, command = parsed.values
    for name, value in (
        ("model_name_or_path", model_args.model_name_or_path),
        ("dataset_name", script.dataset_name),
    ):
        if not value:
            raise ChatSFTError(
                "is required",
                source=parsed.source,
                field=name,
                hint=f"add {name}: ... to the config or --{name} ...",
            )
    if script.dataset_streaming and sft.max_steps <= 0:
        raise ChatSFTError(
            "streaming data has no length, so the run needs max_steps", field="max_steps"
        )
    check_writable(sft.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if not main_process:
        return train_run(parsed, argv)
    resume = bool(sft.resume_from_checkpoint)
    claim(
        sft.output_dir,
        model_args.model_name_or_path,
        overwrite=sft.overwrite_output_dir,
        resume=resume,
    )
    with OutputLock(sft.output_dir):
        return train_run(parsed, argv)


def train_run(parsed: Parsed, argv: list[str]) -> int:
    script, sft, model_args, command = parsed.values
    from ..train.trainer import SFTTrainer
    from .build import datasets_of, model_init_kwargs, peft_config
    from .threads import set_cpu_threads

    set_cpu_threads(sft, command.torch_num_threads, model_args.model_name_or_path)
    sft.model_init_kwargs = model_init_kwargs(model_args, sft)
    record = {k: v for k, v in parsed.record.items() if k not in NOT_RECORDED}
    resume = resume_point(sft, record)
    train, evaluation = datasets_of(script, sft)
    try:
        trainer = SFTTrainer(
            model=model_args.model_name_or_path,
            args=sft,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=peft_config(model_args),
        )
    except ChatSFTError as err:
        raise err.with_source(script.dataset_name) from None
    trainer.run_record = record
    trainer.run_command = shlex.join(["chatsft", "train", *argv])
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, sft.output_dir)
    if trainer.args.should_save:
        print(f"[chatsft] saved to {sft.output_dir}: {describe_files(sft.output_dir)}")
    return 0


# Settings of this invocation, not of the run: a re-run from training_config.yaml starts afresh.
NOT_RECORDED = ("resume_from_checkpoint", "torch_num_threads")


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
        shutil.rmtree(staging, ignore_errors=True)
        raise save_failed(err, output_dir, "the final model", trainer.model) from None
    if trainer.args.should_save:  # only the main process writes
        # The completion file goes last: a run killed while moving never looks finished.
        marker = os.path.join(output_dir, COMPLETE_FILE)
        if os.path.exists(marker):
            os.remove(marker)
        names = sorted(os.listdir(staging), key=lambda n: n == COMPLETE_FILE)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)


def resume_point(sft: SFTConfig, record: dict) -> str | None:
    """`--resume` / `latest` → the newest complete checkpoint-N in output_dir; `latest_valid` →
    the newest that is undamaged; a folder → that checkpoint. Each is checked: complete, readable, and trained
    with the same settings as this run (an error names what differs)."""
    from ..train.checkpoints import (
        check_checkpoint,
        checkpoints,
        newest_complete_checkpoint,
        same_run,
    )

    value = sft.resume_from_checkpoint
    if not value:
        return None
    if value.lower() in ("latest", "true", "latest_valid"):
        found = checkpoints(sft.output_dir)
        if not found:
            raise ChatSFTError(
                "no checkpoint to resume from",
                source=sft.output_dir,
                field="resume",
                hint="train without --resume, or point --resume at a checkpoint folder",
            )
        if value.lower() == "latest_valid":
            found = [c for c in found if check_checkpoint(c) is None] or found[-1:]
        else:  # a save cut short by a kill is expected: skip it
            found = [newest_complete_checkpoint(sft.output_dir) or found[-1]]
        value = found[-1]
    elif not os.path.isdir(value):
        raise ChatSFTError("checkpoint folder not found", source=value, field="resume")
    problem = check_checkpoint(value)
    if problem is not None:
        valid = [c for c in checkpoints(os.path.dirname(value) or ".") if not check_checkpoint(c)]
        hint = (
            f"resume from {valid[-1]} instead: --resume latest_valid"
            if valid
            else "train without --resume"
        )
        raise ChatSFTError(f"cannot resume: {problem}", source=value, field="resume", hint=hint)
    same_run(value, record)
    print(f"[chatsft] resuming from {value}")
    return value


def describe_files(folder: str) -> str:
    sizes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith((".safetensors", ".pt", ".bin")):
            sizes.append(f"{name} {os.path.getsize(path) / 2**20:.1f} MiB")
    return ", ".join(sizes)
