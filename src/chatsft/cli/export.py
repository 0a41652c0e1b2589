"""`chatsft export MODEL_OR_ADAPTER --gguf OUT.gguf [--outtype f16]`: a saved model (or a LoRA
adapter, merged into its base first) as a GGUF file for llama.cpp, Ollama or LM Studio."""

from __future__ import annotations

from dataclasses import dataclass, field

from .parser import CommandParser, parse


@dataclass
class ExportArguments:
    model_dir: str = field(metadata={"help": "A saved model folder, or a LoRA adapter folder."})
    gguf: str = field(metadata={"help": "The .gguf file to write."})
    outtype: str = field(
        default="f16",
        metadata={
            "help": "Weights in the file: f16, bf16, q8_0 (8-bit, about half of f16) or f32.",
            "choices": ["f16", "bf16", "q8_0", "f32"],
        },
    )


def run(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", *argv]
    parser = CommandParser((ExportArguments,), prog="chatsft export", description=__doc__)
    (args,) = parse(parser, argv, positional_config=False).values
    import os

    from ..export import export_gguf

    out = export_gguf(args.model_dir, args.gguf, args.outtype)
    print(f"[chatsft] wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB, {args.outtype})")
    return 0
