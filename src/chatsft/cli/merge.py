"""`chatsft merge ADAPTER --output DIR [--base PATH]`: a LoRA adapter merged into its base model."""

from __future__ import annotations

from dataclasses import dataclass, field

from .parser import CommandParser, parse


@dataclass
class MergeArguments:
    adapter_dir: str = field(metadata={"help": "The adapter folder (with adapter_config.json)."})
    output: str = field(metadata={"help": "A new folder for the merged model."})
    base: str | None = field(
        default=None,
        metadata={
            "help": "The base model (folder or hub id); default: the one adapter_config.json "
            "records."
        },
    )


def run(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        argv = ["--adapter_dir", *argv]  # `chatsft merge ADAPTER ...`
    parser = CommandParser((MergeArguments,), prog="chatsft merge", description=__doc__)
    (args,) = parse(parser, argv, positional_config=False).values
    from ..model.peft_setup import merge_adapter
    from .train import describe_files

    out = merge_adapter(args.adapter_dir, args.output, args.base)
    print(f"[chatsft] merged model written to {out}: {describe_files(out)}")
    return 0
