"""`chatsft inspect`'s terminal output: the counts as text, and example rows with their trained
tokens in colour (or between [[ ]] where colour is off, so the marks survive a log file)."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

from .measure import InspectReport, SplitReport, TokenRow, length_histogram

ANSI_TRAINED = "\x1b[1;32m"  # bold green
ANSI_MASKED = "\x1b[90m"  # grey
ANSI_WARN = "\x1b[33m"
ANSI_RESET = "\x1b[0m"


def use_color(choice: str = "auto", stream: Any = None) -> bool:
    """--color always|never win; otherwise NO_COLOR (no-color.org) and FORCE_COLOR, then whether
    the output is a terminal."""
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def _runs(row: TokenRow) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same status, joined."""
    out: list[tuple[str, bool]] = []
    for piece, trained in zip(row.pieces, row.trained):
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + piece, trained)
        else:
            out.append((piece, trained))
    return out


def render_tokens_terminal(row: TokenRow, color: bool) -> str:
    if color:
        return "".join(
            f"{ANSI_TRAINED if t else ANSI_MASKED}{text}{ANSI_RESET}" for text, t in _runs(row)
        )
    return "".join(f"[[{text}]]" if t else text for text, t in _runs(row))


def _split_lines(split: SplitReport) -> list[str]:
    if split.stats is None:
        return [f"{split.name} data: not prepared (see the warnings)"]
    lines = [split.stats.summary(split.name).removeprefix("[chatsft] ")]
    lengths = split.lengths
    if lengths:
        lines.append(
            f"  token lengths ({len(lengths)} rows): min {min(lengths)}, median "
            f"{statistics.median(lengths):g}, max {max(lengths)}"
        )
        hist = length_histogram(lengths)
        top = max(c for _, _, c in hist)
        for lo, hi, c in hist:
            bar = "█" * round(30 * c / top) if c else ""
            lines.append(f"    {lo:>6}–{hi:<6} {bar} {c}")
    if split.roles:
        total_trained = sum(r.trained for r in split.roles.values()) or 1
        lines.append(f"  trained tokens by role ({split.role_rows} rows rendered):")
        for role, r in split.roles.items():
            lines.append(
                f"    {role:<12} {r.trained:>8} of {r.tokens:>8} tokens trained "
                f"({100 * r.trained / max(r.tokens, 1):5.1f}%), "
                f"{100 * r.trained / total_trained:5.1f}% of all trained tokens"
            )
    if split.packing_efficiency is not None:
        lines.append(
            f"  packing (best-fit decreasing): {split.packed_rows} rows, "
            f"{100 * split.packing_efficiency:.1f}% of their slots hold tokens"
        )
    return lines


def render_terminal(report: InspectReport, color: bool = False) -> str:
    """The whole report as terminal text (ANSI colours when `color`)."""
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    lines = [
        f"chatsft inspect: {report.source} (tokenizer {report.tokenizer}, eos "
        f"{report.eos_token!r})",
        f"settings: {settings}",
        "",
    ]
    for split in report.splits:
        lines += [*_split_lines(split), ""]
    warn = (ANSI_WARN, ANSI_RESET) if color else ("", "")
    for finding in report.warnings:
        lines.append(f"{warn[0]}warning: {finding.message}{warn[1]}")
    if report.warnings:
        lines.append("")
    legend = (
        f"{ANSI_TRAINED}trained{ANSI_RESET} {ANSI_MASKED}not trained{ANSI_RESET}"
        if color
        else "[[trained]] not trained"
    )
    for n, row in enumerate(report.examples, start=1):
        lines.append(
            f"--- example {n} of {len(report.examples)} (row {row.index}: {len(row.ids)} tokens, "
            f"{row.num_trained} trained, {row.num_masked} not trained; {legend}) ---"
        )
        lines.append(render_tokens_terminal(row, color))
    return "\n".join(lines) + "\n"
