"""End-of-training report: loss, learning-rate, throughput and trained-token curves as PNG images,
and a report.html that shows them beside the final metrics and the resolved config.

Plots need matplotlib (the `report` extra). Without it the callback still writes report.html, with
the metrics and config but no images, and says in one line how to get them.
"""

from __future__ import annotations

import html
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .files import write_atomic

PLOT_SIZE_IN = (8, 5)
PLOT_DPI = 100  # 800 × 500 px: a fixed size, so reports of different runs line up
REPORT_FILE = "report.html"
MATPLOTLIB_HINT = (
    "[chatsft] report: no loss-curve images because matplotlib is not installed; "
    "pip install 'chatsft[report]' to get them"
)
Series = tuple[list[float], list[float]]  # (steps, values)


@dataclass
class Chart:
    file: str
    title: str
    ylabel: str
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(xs for xs, _ in self.series.values())


def metric_series(history: Sequence[Mapping[str, Any]], key: str) -> Series:
    """Steps and values of every log entry that has `key`."""
    rows = [(e.get("step", 0), e[key]) for e in history if isinstance(e.get(key), (int, float))]
    return [float(s) for s, _ in rows], [float(v) for _, v in rows]


def eval_loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """eval_loss, and eval_<name>_loss for each dataset of an eval_dataset dict."""
    keys: dict[str, None] = {}
    for entry in history:
        for key in entry:
            if key.startswith("eval_") and key.endswith("_loss"):
                keys[key] = None
    return list(keys)


def throughput(
    history: Sequence[Mapping[str, Any]], times: Mapping[int, float], start: float | None
) -> Series:
    """Trained tokens per second between consecutive training logs.

    `times` maps a log_history index to when on_log saw it. Evaluation time between two training
    logs is taken out (eval entries carry eval_runtime), or every eval would show as a dip.
    """
    steps: list[float] = []
    rates: list[float] = []
    prev_time, prev_tokens, eval_seconds = start, 0, 0.0
    for index, entry in enumerate(history):
        if "eval_runtime" in entry:
            eval_seconds += float(entry["eval_runtime"])
            continue
        if "num_trained_tokens" not in entry or index not in times:
            continue
        now, tokens = times[index], int(entry["num_trained_tokens"])
        if prev_time is not None and tokens >= prev_tokens:
            seconds = now - prev_time - eval_seconds
            if seconds > 0:
                steps.append(float(entry.get("step", 0)))
                rates.append((tokens - prev_tokens) / seconds)
        prev_time, prev_tokens, eval_seconds = now, tokens, 0.0
    return steps, rates


def build_charts(
    history: Sequence[Mapping[str, Any]],
    times: Mapping[int, float] | None = None,
    start: float | None = None,
) -> list[Chart]:
    loss = Chart("loss.png", "Loss", "loss (trained tokens)")
    loss.series["train loss"] = metric_series(history, "loss")
    for key in eval_loss_keys(history):
        loss.series[key.replace("_", " ")] = metric_series(history, key)
    return [
        loss,
        Chart(
            "learning_rate.png",
            "Learning rate",
            "learning rate",
            {"learning rate": metric_series(history, "learning_rate")},
        ),
        Chart(
            "tokens_per_second.png",
            "Throughput",
            "trained tokens / second",
            {"trained tokens / s": throughput(history, times or {}, start)},
        ),
        Chart(
            "trained_tokens.png",
            "Trained tokens (cumulative)",
            "trained tokens",
            {"trained tokens": metric_series(history, "num_trained_tokens")},
        ),
    ]


def plot_chart(chart: Chart) -> bytes:
    """One chart as PNG bytes, exactly PLOT_SIZE_IN × PLOT_DPI pixels."""
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no GUI, no state
    # shared with the user's own plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in chart.series.items():
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None, markersize=3)
    if chart.empty:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(chart.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(chart.ylabel)
    ax.grid(alpha=0.3)
    if sum(1 for xs, _ in chart.series.values() if xs) > 1:
        ax.legend()
    fig.tight_layout()  # moves the axes inside the canvas; unlike bbox_inches, keeps its size
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def final_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """The last logged value of every metric, with the step it was logged at."""
    out: dict[str, tuple[Any, Any]] = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step":
                out[key] = (value, entry.get("step"))
    return out


def config_table(args: TrainingArguments | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(args, Mapping):
        return dict(args)
    values = args.to_dict()
    # to_dict() hides every field ending in _token (hub_token is a secret); eos_token and pad_token
    # are SFT settings, and showing them matters when a run does not stop.
    for key in ("eos_token", "pad_token"):
        if key in values:
            values[key] = getattr(args, key)
    return values


def write_report(
    output_dir: str,
    history: Sequence[Mapping[str, Any]],
    config: TrainingArguments | Mapping[str, Any],
    *,
    times: Mapping[int, float] | None = None,
    start: float | None = None,
) -> str:
    """Write the PNG charts (if matplotlib is there) and report.html; returns the report's path."""
    charts = build_charts(history, times, start)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MATPLOTLIB_HINT, flush=True)
        images: list[Chart] = []
    else:
        for chart in charts:
            write_atomic(os.path.join(output_dir, chart.file), plot_chart(chart))
        images = charts
    path = os.path.join(output_dir, REPORT_FILE)
    write_atomic(path, render_report_html(images, final_metrics(history), config_table(config)))
    return path


class TrainingReportCallback(TrainerCallback):
    """On train end, write loss/learning-rate/throughput/trained-token charts and report.html into
    output_dir (main process only)."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.log_times: dict[int, float] = {}  # log_history index → when it was logged
        self.start: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start = time.monotonic()
        self.log_times = {}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The Trainer appends the entry to log_history before calling on_log.
        self.log_times[len(state.log_history) - 1] = time.monotonic()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        output_dir = self.output_dir or args.output_dir
        path = write_report(
            output_dir, state.log_history, args, times=self.log_times, start=self.start
        )
        print(f"[chatsft] training report: {path}", flush=True)


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:80rem;
color:#222;padding:0 1rem}
#charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(26rem,1fr));gap:1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figure.missing::after{content:"image missing: keep the PNG files beside report.html";color:#a00}
table{border-collapse:collapse;font-size:.9rem}
td,th{padding:.2rem .7rem;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
td.value{font-family:ui-monospace,monospace;word-break:break-all}
.note{background:#fff4ce;border-left:4px solid #e5a50a;padding:.4rem .8rem}
"""

# Marks images that did not load (report.html copied without its PNGs) so the page says so, and
# records each image's decoded size.
SCRIPT = """
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.dataset.size = img.naturalWidth + "x" + img.naturalHeight;
    if (!img.naturalWidth) img.closest("figure").classList.add("missing");
  }
});
"""


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (str, int, bool)) or value is None:
        return str(value)
    return json.dumps(value, default=str)


def _table(table_id: str, head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + f'<td class="key">{html.escape(str(r[0]))}</td>'
        + "".join(f'<td class="value">{html.escape(_value_text(v))}</td>' for v in r[1:])
        + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def render_report_html(
    charts: list[Chart], metrics: Mapping[str, tuple[Any, Any]], config: Mapping[str, Any]
) -> str:
    if charts:
        figures = "".join(
            f'<figure><img src="{html.escape(c.file)}" width="{PLOT_SIZE_IN[0] * PLOT_DPI}" '
            f'height="{PLOT_SIZE_IN[1] * PLOT_DPI}" alt="{html.escape(c.title)}"></figure>'
            for c in charts
        )
    else:
        figures = (
            '<p class="note">No charts: matplotlib is not installed. '
            "<code>pip install 'chatsft[report]'</code> and train again to get them.</p>"
        )
    metric_rows = [(k, v, step) for k, (v, step) in metrics.items()]
    config_rows = [(k, config[k]) for k in sorted(config)]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>chatsft training report</title>"
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>"
        "<h1>chatsft training report</h1><h2>Final metrics</h2>"
        + _table("metrics", ("metric", "last value", "step"), metric_rows)
        + f'<h2>Charts</h2><section id="charts">{figures}</section><h2>Resolved config</h2>'
        + _table("config", ("setting", "value"), config_rows)
        + "</body></html>\n"
    )
