"""`chatsft inspect --html`: the report as one self-contained page (inline CSS, no scripts, no
external assets), every token a box marked trained or not.

The markup is a jinja2 template with autoescaping (templates/page.html.j2, CSS in page.css), so
data text (messages, file names, the eos token) can never become markup; this module only turns
the report into plain values for it.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import jinja2

from .measure import InspectReport, SplitReport, TokenRow, length_histogram

TEMPLATE = "page.html.j2"
VISIBLE = {"\n": "↵\n", "\t": "⇥\t", "\r": "␍"}  # whitespace tokens stay visible
BAR_REM = 20  # width of the longest histogram bar


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render instead of vanishing
    )
    return env.get_template(TEMPLATE)


def _visible(piece: str) -> str:
    return "".join(VISIBLE.get(ch, ch) for ch in piece)


def _example(row: TokenRow) -> dict[str, Any]:
    tokens = [
        {"pos": pos, "id": token, "text": _visible(piece), "kind": "trained" if t else "masked"}
        for pos, (token, piece, t) in enumerate(zip(row.ids, row.pieces, row.trained))
    ]
    return {"row": row, "tokens": tokens}


def _split(split: SplitReport) -> dict[str, Any]:
    view: dict[str, Any] = {"name": split.name, "stats": split.stats}
    s = split.stats
    if s is None:
        return view
    counts: list[tuple[str, Any]] = [
        ("rows read", s.rows_read),
        ("kept", s.kept),
        ("dropped", sum(s.dropped.values())),
        *((f"dropped: {why}", n) for why, n in s.dropped.items()),
        ("truncated", s.truncated),
        ("split", s.split),
        ("tokens", s.total_tokens),
        ("trained tokens", s.trained_tokens),
    ]
    if split.packing_efficiency is not None:
        counts.append(("packed rows (best-fit decreasing)", split.packed_rows))
        counts.append(("packing efficiency", f"{100 * split.packing_efficiency:.1f}%"))
    view["counts"] = counts
    lengths = split.lengths
    view["lengths"] = lengths
    hist = length_histogram(lengths)
    view["histogram"] = []
    if hist:
        top = max(c for _, _, c in hist)
        view["histogram"] = [
            {"low": lo, "high": hi, "count": c, "width": f"{BAR_REM * c / top:.2f}"}
            for lo, hi, c in hist
        ]
        view["min"], view["max"] = min(lengths), max(lengths)
        view["median"] = f"{statistics.median(lengths):g}"
    total = sum(r.trained for r in split.roles.values()) or 1
    view["role_rows"] = split.role_rows
    view["roles"] = [
        {
            "name": role,
            "tokens": r.tokens,
            "trained": r.trained,
            "of_role": f"{100 * r.trained / max(r.tokens, 1):.1f}%",
            "of_all": f"{100 * r.trained / total:.1f}%",
        }
        for role, r in split.roles.items()
    ]
    return view


def render_html(report: InspectReport) -> str:
    """The page for `report`, as text."""
    return _template().render(
        report=report,
        eos=repr(report.eos_token),
        settings=", ".join(f"{k}={v}" for k, v in report.settings.items()),
        splits=[_split(s) for s in report.splits],
        examples=[_example(row) for row in report.examples],
    )
