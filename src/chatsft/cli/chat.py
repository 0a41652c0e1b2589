"""`chatsft chat MODEL`: see chatsft.generation.cli."""

from __future__ import annotations


def run(argv: list[str]) -> int:
    from ..generation.cli import build_chat_parser, cmd_chat

    (args,) = build_chat_parser().parse_args_into_dataclasses(argv, look_for_args_file=False)
    return cmd_chat(args)
