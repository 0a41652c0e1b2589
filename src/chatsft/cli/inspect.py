"""`chatsft inspect CONFIG.yaml [--field value ...]` or `chatsft inspect DATA --tokenizer PATH`:
run the data preparation `chatsft train` would run and show what the loss will see."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig, ScriptArguments, SFTConfig
from ..errors import ChatSFTError
from .parser import CommandParser, parse

DESCRIPTION = (
    "Run the data preparation `chatsft train` would run and show its counts, token lengths, "
    "trained tokens per role, packing efficiency and examples with every token marked trained or "
    "not; warn about an end-of-turn token that is never trained, a template that is not "
    "prefix-preserving and eval rows that are also train rows. The first argument is a run config "
    "(CONFIG.yaml, the file `chatsft train` reads) or a data file, folder or hub id (then give "
    "--tokenizer). Every training setting can follow as --field value, as for `chatsft train`. "
    "Exit status: 0, or 1 when training would fail on the data (or with --strict, on any "
    "warning), 2 for bad input."
)
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass
class InspectArguments:
    """Settings of `chatsft inspect` itself."""

    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or hub id (default: the tokenizer of model_name_or_path). "
            "Needed when the first argument is data rather than a config."
        },
    )
    num_examples: int = field(default=3, metadata={"help": "Example rows to show (3)."})
    html: str | None = field(
        default=None,
        metadata={"help": "Also write a self-contained HTML page to this file.", "metavar": "FILE"},
    )
    color: str = field(
        default="auto",
        metadata={
            "help": "Colour trained tokens: auto (on a terminal, unless NO_COLOR is set; "
            "FORCE_COLOR forces it), always or never.",
            "choices": ["auto", "always", "never"],
        },
    )
    sample_rows: int = field(
        default=1000, metadata={"help": "Rows rendered for the per-role counts (1000)."}
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "Read only the first N rows of each split (streaming data: 1000)."},
    )
    strict: bool = field(default=False, metadata={"help": "Exit 1 if there is any warning."})

    def __post_init__(self) -> None:
        # ValueError: parse() reports it as one line naming the setting (exit 2).
        for name in ("num_examples", "sample_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")


def build_parser() -> CommandParser:
    return CommandParser(
        (ScriptArguments, SFTConfig, ModelConfig, InspectArguments),
        prog="chatsft inspect",
        # argparse's own usage line lists every training field and not the first argument.
        usage="chatsft inspect CONFIG.yaml|DATA [--tokenizer PATH] [--field value ...]",
        description=DESCRIPTION,
    )


def parse_inspect(
    argv: list[str],
) -> tuple[ScriptArguments, SFTConfig, ModelConfig, InspectArguments, bool]:
    """The four settings objects, and whether the first argument was data (not a config).

    A first argument that is not a .yaml/.yml file is the dataset: it becomes --dataset_name, so
    flags given later still override it. Hardware checks are off (training=False): a bf16 GPU
    config can be inspected on a laptop."""
    argv = list(argv)
    data_form = bool(argv) and not argv[0].startswith("-") and not argv[0].endswith(CONFIG_SUFFIXES)
    if data_form:
        argv = ["--dataset_name", argv[0], *argv[1:]]
    parsed = parse(build_parser(), argv, positional_config=not data_form, training=False)
    script, sft, model_args, args = parsed.values
    if not script.dataset_name:
        raise ChatSFTError(
            "is required",
            source=parsed.source,
            field="dataset_name",
            hint="chatsft inspect CONFIG.yaml, or chatsft inspect DATA --tokenizer PATH",
        )
    if args.tokenizer is None and not model_args.model_name_or_path:
        what = "a data file" if data_form else "a config without model_name_or_path"
        raise ChatSFTError(
            f"inspecting {what} needs a tokenizer",
            field="tokenizer",
            hint="add --tokenizer PATH (a tokenizer or model folder, or a hub id), or "
            "--model_name_or_path",
        )
    return script, sft, model_args, args, data_form


def load_given_tokenizer(path: str | None, trust_remote_code: bool = False) -> Any:
    """--tokenizer, loaded (None: inspect_run loads the model's own)."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ChatSFTError(
            f"could not load the tokenizer: {err}", source=path, field="tokenizer"
        ) from None


def run(argv: list[str]) -> int:
    script, sft, model_args, args, _ = parse_inspect(argv)
    # Imported after parsing, so --help and bad flags answer before datasets and the
    # tokenizer machinery load.
    from ..files import write_atomic
    from ..inspect import inspect_run, render_html, render_terminal, use_color

    report = inspect_run(
        script,
        sft,
        model_args.model_name_or_path,
        tokenizer=load_given_tokenizer(args.tokenizer, sft.trust_remote_code),
        num_examples=args.num_examples,
        sample_rows=args.sample_rows,
        max_rows=args.max_rows,
    )
    sys.stdout.write(render_terminal(report, use_color(args.color)))
    if args.html:
        write_atomic(args.html, render_html(report))
        print(f"[chatsft] wrote {args.html}")
    if any(f.blocking for f in report.warnings):
        return 1
    return 1 if args.strict and report.warnings else 0
