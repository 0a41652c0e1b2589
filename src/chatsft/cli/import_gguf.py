"""`chatsft import-gguf FILE.gguf OUT_DIR`: a GGUF model saved once as a safetensors folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from .parser import CommandParser, parse


@dataclass
class ImportArguments:
    gguf: str = field(metadata={"help": "The .gguf file, or a folder holding one."})
    output_dir: str = field(metadata={"help": "The model folder to write."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the dequantized weights (float32 trains as TRL does).",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )


def run(argv: list[str]) -> int:
    positional = [a for a in argv[:2] if not a.startswith("-")]
    flags = [f"--{name}" for name in ("gguf", "output_dir")[: len(positional)]]
    argv = [x for pair in zip(flags, positional) for x in pair] + argv[len(positional) :]
    parser = CommandParser((ImportArguments,), prog="chatsft import-gguf", description=__doc__)
    (args,) = parse(parser, argv, positional_config=False).values
    from ..model.gguf import import_gguf

    folder = import_gguf(args.gguf, args.output_dir, args.dtype)
    print(f"[chatsft] imported {args.gguf} into {folder}: train from it with --model {folder}")
    return 0
