"""`chatsft demo`: train the bundled tiny model offline and show that it learned."""

from __future__ import annotations

from dataclasses import dataclass, field

from .parser import CommandParser, parse


@dataclass
class DemoArguments:
    output_dir: str = field(default="demo-output", metadata={"help": "Where to save the model."})
    quick: bool = field(default=False, metadata={"help": "A smaller, faster run."})
    seed: int = field(default=0, metadata={"help": "Seed for the data and the model."})


def run(argv: list[str]) -> int:
    parser = CommandParser((DemoArguments,), prog="chatsft demo", description=__doc__)
    (args,) = parse(parser, argv, positional_config=False).values
    from ..demo.run import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)
    return 0
