"""End-of-training report: loss, learning-rate, throughput and trained-token curves as PNG images,
and a report.html that names the model, the data, the LoRA settings and the loss mask, and shows
the charts, any generation samples, the final metrics and the settings that differ from the
defaults.

Plots need matplotlib (the `report` extra). Without it the callback still writes report.html, with
everything but the images, and says in one line how to get them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..files import write_atomic
from ..log import logger

PLOT_SIZE_IN = (8, 5)
PLOT_DPI = 100  # 800 × 500 px: a fixed size, so reports of different runs line up
REPORT_FILE = "report.html"
TEMPLATE_FILE = "report.html.j2"
GENERATIONS_FILE = "generations.jsonl"  # written by generate.GenerationEvalCallback
MATPLOTLIB_HINT = (
    "[chatsft] report: no loss-curve images because matplotlib is not installed; "
    "pip install 'chatsft[report]' to get them"
)
UNKNOWN = "unknown"
MIN_LOSS_DECADES = 1.0  # a log loss axis spans at least this, so noise does not fill the chart
SMOOTH_FROM = 50  # train-loss points from which a smoothed curve is drawn over the raw one
MAX_SAMPLE_PROMPTS = 8
# Setting names that may hold credentials; eos_token and pad_token are SFT settings (and showing
# them matters when a run does not stop), not secrets.
SECRET_NAME = re.compile(r"(token|secret|password|passwd|(^|_)key|credentials?)$", re.I)
NOT_SECRET = frozenset({"eos_token", "pad_token"})
SECRET_VALUE = re.compile(r"\b(hf|sk|ghp|wandb)_[A-Za-z0-9_]{16,}")
Series = tuple[list[float], list[float]]  # (steps, values)


@dataclass
class Chart:
    file: str
    title: str
    ylabel: str
    series: dict[str, Series] = field(default_factory=dict)
    log_y: bool = False  # loss: log scale, where late progress stays visible
    zero_y: bool = False  # counts and rates: the y axis starts at 0, so noise looks like noise
    hlines: dict[str, float] = field(default_factory=dict)  # labelled reference levels
    si_units: bool = False  # tick labels as 4M, 500k

    @property
    def empty(self) -> bool:
        return not any(xs for xs, _ in self.series.values())


# --- series from log_history ---------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(history: Sequence[Mapping[str, Any]], key: str) -> Series:
    """Steps and values of every log entry that has `key`."""
    rows = [(e.get("step", 0), e[key]) for e in history if _is_number(e.get(key))]
    return [float(s) for s, _ in rows], [float(v) for _, v in rows]


def eval_loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """eval_loss, and eval_<name>_loss for each dataset of an eval_dataset dict."""
    keys: dict[str, None] = {}
    for entry in history:
        for key in entry:
            if key.startswith("eval_") and key.endswith("_loss"):
                keys[key] = None
    return list(keys)


def token_intervals(
    history: Sequence[Mapping[str, Any]], times: Mapping[int, float], start: float | None
) -> list[tuple[float, int, float]]:
    """(step, trained tokens, seconds) between consecutive training logs.

    `times` maps a log_history index to when on_log saw it. Evaluation time between two training
    logs is taken out (eval entries carry eval_runtime), or every eval would show as a dip.
    """
    out: list[tuple[float, int, float]] = []
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
                out.append((float(entry.get("step", 0)), tokens - prev_tokens, seconds))
        prev_time, prev_tokens, eval_seconds = now, tokens, 0.0
    return out


def throughput(
    history: Sequence[Mapping[str, Any]], times: Mapping[int, float], start: float | None
) -> Series:
    """Trained tokens per second between consecutive training logs (evaluation time left out)."""
    return _rates(token_intervals(history, times, start))


def _rates(intervals: Sequence[tuple[float, int, float]]) -> Series:
    return [s for s, _, _ in intervals], [n / sec for _, n, sec in intervals]


def smooth_loss(values: Sequence[float]) -> list[float] | None:
    """Centred geometric moving average (the mean on the log axis the loss is drawn on).

    Centred, and narrowed symmetrically at both ends, so the trend does not lag behind a falling
    loss the way an exponential average does. None when a value cannot go on a log axis.
    """
    if not all(v > 0 and math.isfinite(v) for v in values):
        return None
    n, half = len(values), max(2, len(values) // 100)
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + math.log(value))
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out.append(math.exp((prefix[i + h + 1] - prefix[i - h]) / (2 * h + 1)))
    return out


def build_charts(
    history: Sequence[Mapping[str, Any]],
    times: Mapping[int, float] | None = None,
    start: float | None = None,
) -> list[Chart]:
    loss = Chart("loss.png", "Loss (log scale)", "loss on trained tokens", log_y=True)
    steps, values = metric_series(history, "loss")
    loss.series["train loss"] = (steps, values)
    smoothed = smooth_loss(values) if len(values) >= SMOOTH_FROM else None
    if smoothed:  # per-step loss is noisy: a trend line over the raw one
        loss.series["train loss (smoothed)"] = (steps, smoothed)
    for key in eval_loss_keys(history):
        loss.series[key.replace("_", " ")] = metric_series(history, key)
    intervals = token_intervals(history, times or {}, start)
    rate = Chart(
        "tokens_per_second.png", "Throughput", "trained tokens / second", zero_y=True, si_units=True
    )
    rate.series["trained tokens / s"] = _rates(intervals)
    if len(intervals) > 1:  # beside one point, an average line would only repeat it
        average = sum(n for _, n, _ in intervals) / sum(t for _, _, t in intervals)
        rate.hlines[f"run average {average:,.0f}/s"] = average
    return [
        loss,
        Chart(
            "learning_rate.png",
            "Learning rate",
            "learning rate",
            {"learning rate": metric_series(history, "learning_rate")},
            zero_y=True,
        ),
        rate,
        Chart(
            "trained_tokens.png",
            "Trained tokens (cumulative)",
            "trained tokens",
            {"trained tokens": metric_series(history, "num_trained_tokens")},
            zero_y=True,
            si_units=True,
        ),
    ]


# --- charts --------------------------------------------------------------------------------------


def loss_limits(values: Sequence[float]) -> tuple[float, float] | None:
    """Log-axis limits spanning at least MIN_LOSS_DECADES around the data's geometric middle."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return None
    low, high = min(positive), max(positive)
    half = max(math.log10(high / low) * 1.1, MIN_LOSS_DECADES) / 2  # 10% headroom past the data
    middle = math.log10(low * high) / 2
    return 10 ** (middle - half), 10 ** (middle + half)


def _x_limits(chart: Chart, last_step: float | None) -> tuple[float, float]:
    # Every chart spans 0 … the last step of the run, so the four line up step for step; the pad
    # keeps an eval point at the very end off the frame.
    steps = [x for xs, _ in chart.series.values() for x in xs]
    last = max([last_step or 0.0, *steps, 1.0])
    return 0.0, last + max(0.5, 0.03 * last)


def _label_last(ax: Any, xs: Sequence[float], ys: Sequence[float]) -> None:
    ax.annotate(
        f"{ys[-1]:.4g}",
        (xs[-1], ys[-1]),
        xytext=(6, 6),
        textcoords="offset points",
        fontsize=9,
        zorder=6,
    )


def _plot_eval(ax: Any, label: str, xs: Sequence[float], ys: Sequence[float], color: str) -> None:
    # Evals are few: big markers in their own colour above the train line, the last value written
    # out, and not clipped when the only eval is at the run's last step.
    ax.plot(
        xs,
        ys,
        label=label,
        color=color,
        marker="o",
        markersize=7,
        markeredgecolor="white",
        linewidth=1.5,
        zorder=5,
        clip_on=False,
    )
    _label_last(ax, xs, ys)


def _plot_series(ax: Any, chart: Chart) -> None:
    evals = 0
    for label, (xs, ys) in chart.series.items():
        if not xs:
            continue
        if label.startswith("eval"):
            evals += 1
            _plot_eval(ax, label, xs, ys, color=f"C{evals}")  # C0 is the train loss
        elif label.endswith("(smoothed)"):
            ax.plot(xs, ys, label=label, color="C0", linewidth=2)
        else:
            faint = f"{label} (smoothed)" in chart.series  # the raw line under its trend
            ax.plot(
                xs,
                ys,
                label=label,
                color="C0",
                alpha=0.3 if faint else 1.0,
                marker="o" if len(xs) <= 30 else None,
                markersize=6 if len(xs) == 1 else 3,
            )
            if len(xs) == 1:  # a lone dot says little without its value
                _label_last(ax, xs, ys)
    for label, level in chart.hlines.items():
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=label)


def _log_subs(low: float, high: float) -> tuple[float, ...]:
    """Tick mantissas for a log axis: more of them when it spans few decades."""
    decades = math.log10(high / low)
    return (1.0, 2.0, 3.0, 5.0) if decades <= 2 else (1.0, 2.0, 5.0) if decades <= 4 else (1.0,)


def _scale_y(ax: Any, chart: Chart) -> None:
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    values = [y for _, ys in chart.series.values() for y in ys]
    if chart.log_y:
        ax.set_yscale("log")
        limits = loss_limits(values)
        if limits:
            ax.set_ylim(*limits)
        # Plain-number ticks ("2", "0.5"), not 2×10⁰ or a crowd of minor-tick labels.
        ax.yaxis.set_major_locator(LogLocator(subs=_log_subs(*ax.get_ylim())))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif chart.zero_y:
        top = max([*values, *chart.hlines.values(), 0.0])
        ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    if chart.si_units:
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 4M, 500k: token counts


def draw_chart(chart: Chart, last_step: float | None = None) -> Any:
    """One chart as a matplotlib Figure of PLOT_SIZE_IN at PLOT_DPI, on the Agg canvas."""
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no GUI, no state
    # shared with the user's own plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _plot_series(ax, chart)
    if chart.empty:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(chart.title)
    ax.set_xlabel("step")
    ax.set_xlim(*_x_limits(chart, last_step))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(chart.ylabel)
    _scale_y(ax, chart)
    if chart.empty:
        ax.set_yticks([])  # no scale for no data
    ax.grid(alpha=0.3, which="major")
    # The loss chart always names its lines (train vs eval); the others only when there are two.
    if (chart.log_y and not chart.empty) or len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(loc="best")
    fig.tight_layout()  # moves the axes inside the canvas; unlike bbox_inches, keeps its size
    return fig


def plot_chart(chart: Chart, last_step: float | None = None) -> bytes:
    """One chart as PNG bytes, exactly PLOT_SIZE_IN × PLOT_DPI pixels."""
    import io

    buf = io.BytesIO()
    draw_chart(chart, last_step).savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


# --- what the page says --------------------------------------------------------------------------


def final_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """The last logged value of every metric, with the step it was logged at."""
    out: dict[str, tuple[Any, Any]] = {}
    for entry in history:
        for key, value in entry.items():
            if key != "step":
                out[key] = (value, entry.get("step"))
    return out


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def model_name(model: Any) -> str:
    """The hub id or path the model was loaded from, else its class name."""
    if model is None:
        return UNKNOWN
    model = _unwrap(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(
        model, "name_or_path", ""
    )
    base = getattr(model, "get_base_model", lambda: model)()
    return str(name) if name else f"{type(base).__name__} (built in Python, no name)"


def parameter_counts(model: Any) -> str | None:
    if model is None or not hasattr(model, "parameters"):
        return None
    params = list(_unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if not total:
        return None
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3g}%)"


def _lora_text(config: Any) -> str:
    targets = config.target_modules
    if isinstance(targets, (set, list, tuple)):
        targets = ", ".join(sorted(targets))
    parts = [f"LoRA r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout:g}"]
    parts.append(f"targets: {targets}")
    if getattr(config, "use_dora", False):
        parts.append("DoRA")
    if getattr(config, "use_rslora", False):
        parts.append("rsLoRA scaling")
    if getattr(config, "modules_to_save", None):
        parts.append(f"trained in full: {', '.join(config.modules_to_save)}")
    return "; ".join(parts)


def finetuning_text(model: Any) -> str:
    """LoRA rank/alpha/targets when a PEFT adapter is trained, else full fine-tuning."""
    if model is None:
        return UNKNOWN
    configs = getattr(_unwrap(model), "peft_config", None)
    if not configs:
        return "full fine-tuning (no adapter)"
    texts = []
    for name, config in configs.items():
        kind = str(getattr(config.peft_type, "value", config.peft_type))
        text = _lora_text(config) if hasattr(config, "lora_alpha") else kind
        texts.append(text if len(configs) == 1 else f"{name}: {text}")
    if getattr(getattr(model, "get_base_model", lambda: model)(), "is_loaded_in_4bit", False):
        texts.append("4-bit base weights (QLoRA)")
    return " | ".join(texts)


def _conversation_mask(args: Any) -> str:
    if getattr(args, "last_turn_only", False):
        return "last assistant turn only (last_turn_only)"
    if getattr(args, "assistant_only_loss", False):
        return "assistant turns only (assistant_only_loss)"
    return "every token"


def _completion_mask(args: Any) -> str:
    if getattr(args, "completion_only_loss", None) is False:
        return "every token (completion_only_loss=False)"
    return "completion only (completion_only_loss)"


def loss_mask_policy(args: Any, dataset_format: str | None = None) -> str:
    """Which tokens the loss is computed on, in the row format's terms (see data/templates.py)."""
    fmt = dataset_format or getattr(args, "dataset_format", None)
    if fmt in ("messages", "sharegpt"):
        return _conversation_mask(args)
    if fmt in ("prompt_completion", "query_response"):
        return _completion_mask(args)
    if fmt == "text":
        return "every token (text rows)"
    if fmt == "tokenized":
        return "the dataset's own labels (tokenized rows)"
    # Format unknown here (detected from the columns at preparation): say what each would get.
    return (
        f"conversations: {_conversation_mask(args)}; "
        f"prompt/completion rows: {_completion_mask(args)}; text rows: every token"
    )


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: "<hidden>" if _secret_name(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return SECRET_VALUE.sub("<hidden>", value)
    return value


def _secret_name(name: str) -> bool:
    return name not in NOT_SECRET and bool(SECRET_NAME.search(name))


def config_values(args: TrainingArguments | Mapping[str, Any]) -> dict[str, Any]:
    """Every setting, JSON-like (enums as their values), eos_token/pad_token with their values."""
    if isinstance(args, Mapping):
        return dict(args)
    values = args.to_dict()  # hides every *_token value; the two SFT ones are put back
    for key in NOT_SECRET:
        if key in values:
            values[key] = getattr(args, key)
    return values


def config_changes(
    args: TrainingArguments | Mapping[str, Any],
) -> tuple[list[tuple[str, Any, Any]], int]:
    """(setting, value, default) for each setting that differs from SFTConfig's declared default,
    and how many secret-looking settings were left out."""
    if isinstance(args, Mapping):  # a logged config: no defaults to compare with
        values = dict(args)
        hidden = sum(_secret_name(k) for k in values)
        rows = [(k, _redact(v), "") for k, v in sorted(values.items()) if not _secret_name(k)]
        return rows, hidden
    from .model_card import setting_changes

    hidden = sum(
        _secret_name(f) and getattr(args, f, None) is not None for f in args.__dataclass_fields__
    )
    rows = [
        (name, _redact(value), "" if default is None else _redact(default))
        for name, value, default in sorted(setting_changes(args))
        if not _secret_name(name) and name != "output_dir"  # the header names the folder
    ]
    return rows, hidden


def read_generations(output_dir: str) -> list[dict[str, Any]]:
    """generations.jsonl records ({step, epoch, prompt, completion}); unreadable lines skipped."""
    path = os.path.join(output_dir, GENERATIONS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
            if isinstance(record, dict) and "prompt" in record:
                records.append(record)
    return records


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(
            f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict)
        )
    return json.dumps(prompt, ensure_ascii=False, default=str)


def sample_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Per prompt (first MAX_SAMPLE_PROMPTS), its completion at the first and the last step."""
    by_prompt: dict[str, dict[Any, str]] = {}
    for record in records:
        steps = by_prompt.setdefault(prompt_text(record["prompt"]), {})
        steps[record.get("step")] = str(record.get("completion", ""))
    rows = []
    for prompt, steps in list(by_prompt.items())[:MAX_SAMPLE_PROMPTS]:
        order = list(steps)
        shown = order if len(order) <= 2 else [order[0], order[-1]]
        rows.append({"prompt": prompt, "completions": [(s, steps[s]) for s in shown]})
    return rows, max(0, len(by_prompt) - MAX_SAMPLE_PROMPTS)


def format_value(value: Any, *, grouped: bool = True) -> str:
    """A metric or setting as text; `grouped` puts thousands separators in integers (counts, not
    settings one would copy into a config)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if grouped else str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _run_text(history: Sequence[Mapping[str, Any]]) -> str:
    metrics = final_metrics(history)
    step = max([int(e.get("step") or 0) for e in history] or [0])
    parts = [f"{step:,} steps"]
    if "epoch" in metrics:
        parts.append(f"{float(metrics['epoch'][0]):.3g} epochs")
    if "train_runtime" in metrics:
        parts.append(duration_text(float(metrics["train_runtime"][0])))
    if "num_trained_tokens" in metrics:
        parts.append(f"{int(metrics['num_trained_tokens'][0]):,} trained tokens")
    return ", ".join(parts)


def _loss_text(history: Sequence[Mapping[str, Any]]) -> str:
    _, train = metric_series(history, "loss")
    parts = [f"train {train[0]:.4g} → {train[-1]:.4g}"] if train else []
    for key in eval_loss_keys(history):
        _, values = metric_series(history, key)
        if values:
            parts.append(f"{key.removesuffix('_loss').replace('_', ' ')} {values[-1]:.4g}")
    return "; ".join(parts) or "none logged"


def summary_items(
    history: Sequence[Mapping[str, Any]],
    config: TrainingArguments | Mapping[str, Any],
    model: Any,
    dataset_name: str | None,
    dataset_format: str | None,
) -> list[dict[str, Any]]:
    return [
        {
            "id": "model",
            "label": "Model",
            "value": model_name(model),
            "detail": parameter_counts(model),
        },
        {"id": "dataset", "label": "Dataset", "value": dataset_name or UNKNOWN},
        {"id": "finetuning", "label": "Fine-tuning", "value": finetuning_text(model)},
        {"id": "loss-mask", "label": "Loss on", "value": loss_mask_policy(config, dataset_format)},
        {"id": "run", "label": "Run", "value": _run_text(history)},
        {"id": "loss", "label": "Loss", "value": _loss_text(history)},
    ]


# --- report.html ---------------------------------------------------------------------------------


def _setting_text(value: Any) -> str:
    return "" if value == "" else format_value(value, grouped=False)


def _template() -> Any:
    import jinja2

    text = resources.files("chatsft.train").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(text)


def render_report_html(
    charts: Sequence[Chart],
    history: Sequence[Mapping[str, Any]],
    config: TrainingArguments | Mapping[str, Any],
    *,
    output_dir: str = ".",
    model: Any = None,
    dataset_name: str | None = None,
    dataset_format: str | None = None,
) -> str:
    changes, hidden = config_changes(config)
    samples, left_out = sample_rows(read_generations(output_dir))
    metrics = [(k, format_value(v), s) for k, (v, s) in final_metrics(history).items()]
    return _template().render(
        model=model_name(model),
        unknown=UNKNOWN,
        written=time.strftime("%Y-%m-%d %H:%M"),
        output_dir=os.path.abspath(output_dir),
        summary=summary_items(history, config, model, dataset_name, dataset_format),
        charts=charts,
        width=PLOT_SIZE_IN[0] * PLOT_DPI,
        height=PLOT_SIZE_IN[1] * PLOT_DPI,
        samples=samples,
        samples_left_out=left_out,
        samples_file=GENERATIONS_FILE,
        metrics=metrics,
        config=[(k, _setting_text(v), _setting_text(d)) for k, v, d in changes],
        hidden=hidden,
    )


def write_report(
    output_dir: str,
    history: Sequence[Mapping[str, Any]],
    config: TrainingArguments | Mapping[str, Any],
    *,
    times: Mapping[int, float] | None = None,
    start: float | None = None,
    model: Any = None,
    dataset_name: str | None = None,
    dataset_format: str | None = None,
) -> str:
    """Write the PNG charts (if matplotlib is there) and report.html; returns the report's path."""
    charts = build_charts(history, times, start)
    last_step = max([float(e.get("step") or 0) for e in history] or [0.0])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info(MATPLOTLIB_HINT.removeprefix("[chatsft] "))
        images: list[Chart] = []
    else:
        for chart in charts:
            write_atomic(os.path.join(output_dir, chart.file), plot_chart(chart, last_step))
        images = charts
    page = render_report_html(
        images,
        history,
        config,
        output_dir=output_dir,
        model=model,
        dataset_name=dataset_name,
        dataset_format=dataset_format,
    )
    path = os.path.join(output_dir, REPORT_FILE)
    write_atomic(path, page)
    return path


class TrainingReportCallback(TrainerCallback):
    """On train end, write loss/learning-rate/throughput/trained-token charts and report.html into
    output_dir (main process only).

    `dataset_name` (e.g. "HuggingFaceH4/ultrachat_200k [train_sft]") and `dataset_format`
    (messages, prompt_completion, ...) can be set after construction by whoever knows them; the
    page says "unknown" for a missing name and lists each format's loss mask for a missing format.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        *,
        dataset_name: str | None = None,
        dataset_format: str | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.dataset_name = dataset_name
        self.dataset_format = dataset_format
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
            output_dir,
            state.log_history,
            args,
            times=self.log_times,
            start=self.start,
            model=kwargs.get("model"),
            dataset_name=self.dataset_name,
            dataset_format=self.dataset_format,
        )
        logger.info(f"training report: {path}")
