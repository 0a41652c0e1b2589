"""`chatsft generate MODEL --prompt TEXT ...`: see chatsft.generation.cli."""

from __future__ import annotations


def run(argv: list[str]) -> int:
    from ..generation.cli import build_generate_parser, cmd_generate

    (args,) = build_generate_parser().parse_args_into_dataclasses(argv, look_for_args_file=False)
    return cmd_generate(args)
