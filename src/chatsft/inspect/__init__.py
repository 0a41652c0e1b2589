"""`chatsft inspect`'s library side: run the preparation training would run and report on it.

measure:  what preparation did (counts, lengths, trained tokens per role, packing, findings),
          `inspect_run` for a whole run
terminal: the report as terminal text, trained tokens in colour
html:     the report as one self-contained HTML page (jinja2 template under templates/)

The command line is chatsft.cli.inspect. (Always imported as `chatsft.inspect`: absolute imports
mean this package never stands in for the standard library's `inspect` module.)
"""

from __future__ import annotations

from .html import render_html
from .measure import (
    STREAM_ROWS,
    Finding,
    InspectReport,
    RoleCount,
    SplitReport,
    TokenRow,
    attributed_tokens,
    collator_trained,
    count_roles,
    inspect_run,
    inspect_split,
    length_histogram,
    load_splits,
    packing_efficiency,
    shared_rows,
    trained_positions,
)
from .terminal import ANSI_MASKED, ANSI_RESET, ANSI_TRAINED, render_terminal, use_color

__all__ = [
    "ANSI_MASKED",
    "ANSI_RESET",
    "ANSI_TRAINED",
    "STREAM_ROWS",
    "Finding",
    "InspectReport",
    "RoleCount",
    "SplitReport",
    "TokenRow",
    "attributed_tokens",
    "collator_trained",
    "count_roles",
    "inspect_run",
    "inspect_split",
    "length_histogram",
    "load_splits",
    "packing_efficiency",
    "render_html",
    "render_terminal",
    "shared_rows",
    "trained_positions",
    "use_color",
]
