"""`chatsft inspect`: run the preparation training would run, then show what it did.

Counts (rows read, kept, dropped, truncated), token lengths, the share of trained tokens per role,
packing efficiency, and examples with every token marked trained or not (terminal or HTML). The
masks come from the same functions the trainer calls and the labels from the same collator, so
what is shown is what the loss sees. It also warns about mistakes that ruin a run quietly: an
end-of-turn token that is never trained, a template that is not prefix-preserving, eval rows that
are also in the train data.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import html
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets

from .data.collate import IGNORE_INDEX, PaddedCollator
from .data.formats import PromptCompletion, Text, Tokenized, detect_format, normalize
from .data.load import load_data, split_eval
from .data.packing import best_fit_decreasing
from .data.prepare import prepare_for_training
from .data.templates import chat_renderer, render_segments
from .data.tokenize import (
    PrepOptions,
    PrepStats,
    fit_length,
    num_trained,
    special_prefix_ids,
    tokenize_segments,
    trained_of,
)
from .errors import ChatSFTError
from .files import write_atomic
from .model.load import load_tokenizer
from .run_config import RunConfig, load_run_config, parse_overrides
from .trainer import prep_options

STREAM_ROWS = 1000  # rows read from a streaming dataset when --max-rows is not given
HIST_BINS = 10
SHOWN_SETTINGS = (
    "dataset_format",
    "assistant_only_loss",
    "completion_only_loss",
    "last_turn_only",
    "max_length",
    "overlong_policy",
    "truncation_mode",
    "packing",
)


@dataclass
class RoleCount:
    tokens: int = 0
    trained: int = 0


@dataclass(frozen=True)
class Finding:
    message: str
    blocking: bool = False  # training would fail on this


@dataclass
class SplitReport:
    name: str
    stats: PrepStats | None = None
    lengths: list[int] = field(default_factory=list)
    roles: dict[str, RoleCount] = field(default_factory=dict)
    role_rows: int = 0  # raw rows rendered for the per-role counts
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    eos_rows: int = 0  # rows that contain the eos token
    eos_trained_rows: int = 0  # rows where it is trained


@dataclass
class TokenRow:
    """One prepared row as the loss sees it: `trained[i]` is True where labels[i] != -100."""

    index: int
    ids: list[int]
    pieces: list[str]
    trained: list[bool]

    @property
    def num_trained(self) -> int:
        return sum(self.trained)

    @property
    def num_masked(self) -> int:
        return len(self.trained) - self.num_trained


@dataclass
class InspectReport:
    source: str
    tokenizer: str
    eos_token: str
    settings: dict[str, Any]
    splits: list[SplitReport] = field(default_factory=list)
    examples: list[TokenRow] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)


# --- what the collator trains ----------------------------------------------------------------------


def collator_trained(ids: list[int], labels: list[int]) -> list[bool]:
    """The trained positions of one row, from the collator training uses (it also masks the first
    token of every document, which nothing predicts)."""
    batch = PaddedCollator(pad_token_id=0)([{"input_ids": ids, "labels": labels}])
    return (batch["labels"][0] != IGNORE_INDEX).tolist()


def trained_positions(labels: list[int]) -> list[bool]:
    """Same rule as collator_trained without building tensors (used over whole datasets)."""
    return [False, *trained_of(labels[1:])] if labels else []


def token_rows(dataset: datasets.Dataset, tokenizer: Any, count: int) -> list[TokenRow]:
    rows = []
    for index in range(min(count, len(dataset))):
        ids, labels = dataset[index]["input_ids"], dataset[index]["labels"]
        pieces = tokenizer.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)
        rows.append(TokenRow(index, ids, pieces, collator_trained(ids, labels)))
    return rows


# --- per-role counts -------------------------------------------------------------------------------


def role_spans(example: Any, tokenizer: Any, text: str) -> tuple[list[float], list[str]]:
    """Character end offsets of each part of the rendered text and who wrote it.

    Message k of a conversation ends where the rendering of messages[:k + 1] ends; text the
    template adds after the last message belongs to it. A template that renders prefixes
    differently cannot be split this way, so its tokens are 'unattributed'.
    """
    inf = float("inf")
    if isinstance(example, Text):
        return [inf], ["text"]
    if isinstance(example, PromptCompletion) and isinstance(example.prompt, str):
        return [len(example.prompt), inf], ["prompt", "completion"]
    if isinstance(example, PromptCompletion):
        messages = [*example.prompt, *example.completion]
    else:
        messages = example.messages
    ends: list[float] = []
    for k in range(len(messages)):
        try:
            render = chat_renderer(tokenizer, messages, example.tools, example.template_kwargs)
            upto = render(messages[: k + 1], False)
        except ChatSFTError:
            return [inf], ["unattributed"]
        if not text.startswith(upto):
            return [inf], ["unattributed"]
        ends.append(len(upto))
    ends[-1] = inf
    return ends, [m["role"] for m in messages]


def attributed_tokens(
    example: Any, tokenizer: Any, opts: PrepOptions, prefix_ids: list[int]
) -> tuple[list[int], list[bool], list[str]]:
    """Token ids, trained mask and the role of each token, built exactly like preparation builds
    them (tokenize_segments), with character offsets to find the role."""
    if isinstance(example, Tokenized):
        mask = trained_of(example.labels)
        return example.input_ids, mask, ["tokens"] * len(example.input_ids)
    segments = render_segments(
        example,
        tokenizer,
        eos_token=opts.eos_token,
        assistant_only_loss=opts.assistant_only_loss,
        completion_only_loss=opts.completion_only_loss,
        last_turn_only=opts.last_turn_only,
    )
    text = "".join(t for t, _ in segments)
    ends, names = role_spans(example, tokenizer, text)
    plain = isinstance(example, Text) or isinstance(getattr(example, "prompt", None), str)
    ids = list(prefix_ids) if plain else []
    mask = [False] * len(ids)
    roles = [names[0]] * len(ids)
    [(text_ids, text_mask)] = tokenize_segments(tokenizer, [segments])
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    for token, trained, (start, end) in zip(text_ids, text_mask, offsets):
        if end > start:
            role = names[min(bisect.bisect_right(ends, start), len(names) - 1)]
        else:  # a token with no characters of its own (trimmed offsets) joins its neighbour
            role = roles[-1] if roles else names[0]
        ids.append(token)
        mask.append(trained)
        roles.append(role)
    return ids, mask, roles


def count_roles(
    dataset: datasets.Dataset, tokenizer: Any, opts: PrepOptions, limit: int
) -> tuple[dict[str, RoleCount], int]:
    """Tokens and trained tokens per role over the first `limit` raw rows, after the same
    max_length policy and first-token rule as training (so over all rows, the trained counts add
    up to PrepStats.trained_tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        return {}, 0  # character offsets need a fast (Rust) tokenizer
    fmt = detect_format(dataset.column_names, opts.dataset_text_field, opts.dataset_format)
    prefix_ids = special_prefix_ids(tokenizer)
    counts: dict[str, RoleCount] = {}
    sample = dataset.select(range(min(limit, len(dataset))))
    for i, row in enumerate(sample):
        example = normalize(
            row,
            fmt,
            row_index=i + 1,
            dataset_text_field=opts.dataset_text_field,
            prompt_template=opts.prompt_template,
        )
        ids, mask, roles = attributed_tokens(example, tokenizer, opts, prefix_ids)
        pieces, _ = fit_length(
            list(range(len(ids))), mask, opts.max_length, opts.overlong_policy, opts.truncation_mode
        )
        for positions, piece_mask in pieces:
            if not any(piece_mask[1:]):
                continue  # preparation drops such rows
            for position, trained in zip(positions, [False, *piece_mask[1:]]):
                count = counts.setdefault(roles[position], RoleCount())
                count.tokens += 1
                count.trained += trained
    return counts, len(sample)


# --- other measurements ----------------------------------------------------------------------------


def packing_efficiency(lengths: list[int], max_length: int | None) -> tuple[int, float] | None:
    """Packed rows and the share of their max_length slots holding real tokens (best-fit
    decreasing, as packing=True would pack them)."""
    if not lengths or max_length is None:
        return None
    bins = best_fit_decreasing(lengths, max_length)
    return len(bins), sum(lengths) / (len(bins) * max_length)


def length_histogram(lengths: list[int], bins: int = HIST_BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) with integer bounds, both inclusive."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    out = [(lo, min(lo + width - 1, high), 0) for lo in range(low, high + 1, width)]
    counts = [0] * len(out)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [(lo, hi, c) for (lo, hi, _), c in zip(out, counts)]


def _squash(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {k: _squash(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_squash(v) for v in value]
    return value


def row_keys(dataset: datasets.Dataset, opts: PrepOptions) -> list[str]:
    """A hash per row of its normalised example (format and extra columns ignored, whitespace
    collapsed), so the same conversation in a train file and an eval file compares equal."""
    fmt = detect_format(dataset.column_names, opts.dataset_text_field, opts.dataset_format)
    keys = []
    for i, row in enumerate(dataset):
        example = normalize(
            row,
            fmt,
            row_index=i + 1,
            dataset_text_field=opts.dataset_text_field,
            prompt_template=opts.prompt_template,
        )
        canonical = json.dumps(_squash(dataclasses.asdict(example)), sort_keys=True)
        keys.append(hashlib.sha1(canonical.encode("utf-8")).hexdigest())
    return keys


def shared_rows(train: datasets.Dataset, evaluation: datasets.Dataset, opts: PrepOptions) -> int:
    """How many eval rows also appear in the train data."""
    seen = set(row_keys(train, opts))
    return sum(key in seen for key in row_keys(evaluation, opts))


def _is_prefix_error(err: ChatSFTError) -> bool:
    return err.field == "chat_template" and "prefix-preserving" in err.message


def _eos_counts(dataset: datasets.Dataset, eos_id: int) -> tuple[int, int]:
    present = trained = 0
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        hits = [p for p, t in enumerate(ids) if t == eos_id]
        present += bool(hits)
        trained += any(trained_positions(labels)[p] for p in hits)
    return present, trained


# --- running it ------------------------------------------------------------------------------------


def inspect_split(
    dataset: datasets.Dataset,
    tokenizer: Any,
    opts: PrepOptions,
    *,
    name: str,
    column_map: dict[str, str] | None = None,
    num_proc: int | None = None,
    source: str | None = None,
    sample_rows: int = 1000,
) -> tuple[SplitReport, datasets.Dataset | None, list[Finding]]:
    """Prepare one split as training would (unpacked: packing only regroups these rows) and
    measure it. Returns the report, the prepared rows (None if preparation failed) and warnings."""
    split = SplitReport(name)
    try:
        prepared, stats = prepare_for_training(
            dataset,
            tokenizer,
            opts,
            num_proc=num_proc,
            column_map=column_map,
            source=source,
            name=name,
        )
    except ChatSFTError as err:
        if not _is_prefix_error(err):
            raise
        return split, None, [Finding(f"{name} data: {err}", blocking=True)]
    if column_map:
        dataset = dataset.rename_columns(column_map)
    split.lengths = [len(x) for x in prepared["input_ids"]]
    split.stats = stats or _stats_of_prepared(prepared)
    packed = packing_efficiency(split.lengths, opts.max_length)
    if packed is not None:
        split.packed_rows, split.packing_efficiency = packed
    if stats is not None:  # raw rows: rendering them gives the roles
        split.roles, split.role_rows = count_roles(dataset, tokenizer, opts, sample_rows)
    eos_id = tokenizer.convert_tokens_to_ids(opts.eos_token)
    split.eos_rows, split.eos_trained_rows = _eos_counts(prepared, eos_id)
    findings = []
    if split.eos_trained_rows == 0:
        findings.append(Finding(_eos_message(name, opts.eos_token, split)))
    return split, prepared, findings


def _stats_of_prepared(prepared: datasets.Dataset) -> PrepStats:
    labels = prepared["labels"]
    n = len(prepared)
    return PrepStats(
        rows_read=n,
        kept=n,
        total_tokens=sum(len(x) for x in labels),
        trained_tokens=sum(num_trained(x) for x in labels),
    )


def _eos_message(name: str, eos: str, split: SplitReport) -> str:
    rows = len(split.lengths)
    where = (
        f"it appears in {split.eos_rows} of {rows} rows but is trained in none"
        if split.eos_rows
        else f"it appears in none of the {rows} rows"
    )
    return (
        f"{name} data: the end-of-turn token {eos!r} is never trained ({where}), so the model "
        "will not learn to stop — set eos_token to the token that ends assistant turns in the "
        "chat template (or use a template that ends them with the tokenizer's eos token)"
    )


def load_splits(
    run: RunConfig, max_rows: int | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train and eval data exactly as `chatsft train` would load and split them (streaming
    data is read up to max_rows, default STREAM_ROWS, so it has a length)."""
    train = _load(run.dataset, run.dataset_split, run.streaming, max_rows)
    if run.eval_dataset or run.eval_split:
        evaluation = _load(
            run.eval_dataset or run.dataset, run.eval_split or "train", False, max_rows
        )
        return train, evaluation
    if run.eval_fraction:
        return split_eval(train, run.eval_fraction, run.sft.seed)
    return train, None


def _load(spec: str, split: str, streaming: bool, max_rows: int | None) -> datasets.Dataset:
    data = load_data(spec, split, streaming=streaming)
    if streaming:
        return datasets.Dataset.from_list(list(data.take(max_rows or STREAM_ROWS)))
    if max_rows is not None and max_rows < len(data):
        return data.select(range(max_rows))
    return data


def inspect_run(
    run: RunConfig,
    *,
    tokenizer: Any | None = None,
    num_examples: int = 3,
    sample_rows: int = 1000,
    max_rows: int | None = None,
) -> InspectReport:
    """Everything `chatsft inspect` shows, for a run config (tokenizer: one to use instead of the
    model's own)."""
    tok = load_tokenizer(
        run.model,
        tokenizer,
        chat_template_path=run.sft.chat_template_path,
        eos_token=run.sft.eos_token,
        pad_token=run.sft.pad_token,
    )
    opts = prep_options(run.sft, tok)
    report = InspectReport(
        source=run.dataset,
        tokenizer=getattr(tok, "name_or_path", "") or str(run.model),
        eos_token=opts.eos_token,
        settings={k: getattr(run.sft, k) for k in SHOWN_SETTINGS},
    )
    train, evaluation = load_splits(run, max_rows)
    common = dict(
        column_map=run.sft.column_map,
        num_proc=run.sft.dataset_num_proc,
        sample_rows=sample_rows,
    )
    split, prepared, findings = inspect_split(
        train, tok, opts, name="train", source=run.dataset, **common
    )
    report.splits.append(split)
    report.warnings += findings
    if prepared is not None:
        report.examples = token_rows(prepared, tok, num_examples)
    if evaluation is not None:
        source = run.eval_dataset or run.dataset
        split, _, findings = inspect_split(
            evaluation, tok, opts, name="eval", source=source, **common
        )
        report.splits.append(split)
        report.warnings += findings
        report.warnings += _duplicate_findings(train, evaluation, run, opts)
    return report


def _duplicate_findings(
    train: datasets.Dataset, evaluation: datasets.Dataset, run: RunConfig, opts: PrepOptions
) -> list[Finding]:
    if run.sft.column_map:
        train = train.rename_columns(run.sft.column_map)
        evaluation = evaluation.rename_columns(run.sft.column_map)
    shared = shared_rows(train, evaluation, opts)
    if not shared:
        return []
    return [
        Finding(
            f"{shared} of {len(evaluation)} eval rows also appear in the train data (compared "
            "after normalising whitespace), so eval loss overstates how well the model "
            "generalises — deduplicate the data before splitting off the eval set"
        )
    ]


# --- terminal ----------------------------------------------------------------------------------

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


# --- HTML ------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:90rem;
color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}h3{font-size:1rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
td,th{padding:.2rem .7rem;border-bottom:1px solid #e4e4e4;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8rem;background:#3584e4;vertical-align:middle}
.warning{background:#fff4ce;border-left:4px solid #e5a50a;padding:.4rem .8rem;margin:.4rem 0}
.warning.blocking{background:#fde2e1;border-left-color:#c01c28}
.tokens{font-family:ui-monospace,'SFMono-Regular',Menlo,monospace;font-size:.85rem;
white-space:pre-wrap;word-break:break-all;line-height:2;border:1px solid #ddd;border-radius:4px;
padding:.6rem}
.tok{border:1px solid rgba(0,0,0,.18);border-radius:2px;padding:0 1px;margin-right:1px}
.tok.trained{background:#c6f0c2;color:#0b3d0b}
.tok.masked{background:#ececec;color:#777}
.tok:hover{outline:2px solid #1a5fb4}
.legend .tok{margin-right:.5rem}
.meta{color:#555}
#stats{display:flex;flex-wrap:wrap;gap:0 3rem}
"""

VISIBLE = {"\n": "↵\n", "\t": "⇥\t", "\r": "␍"}  # whitespace tokens stay visible


def _visible(piece: str) -> str:
    return html.escape("".join(VISIBLE.get(ch, ch) for ch in piece))


def _token_span(pos: int, token: int, piece: str, trained: bool) -> str:
    kind = "trained" if trained else "masked"
    return (
        f'<span class="tok {kind}" title="id {token} · pos {pos}" data-id="{token}" '
        f'data-pos="{pos}">{_visible(piece)}</span>'
    )


def _example_html(n: int, row: TokenRow) -> str:
    spans = "".join(
        _token_span(pos, token, piece, trained)
        for pos, (token, piece, trained) in enumerate(zip(row.ids, row.pieces, row.trained))
    )
    return (
        f'<div class="example" id="example-{n}" data-row="{row.index}" '
        f'data-tokens="{len(row.ids)}" data-trained="{row.num_trained}" '
        f'data-masked="{row.num_masked}"><h3>Example {n + 1}: row {row.index}, '
        f"{len(row.ids)} tokens, {row.num_trained} trained, {row.num_masked} not trained</h3>"
        f'<div class="tokens">{spans}</div></div>'
    )


def _split_html(split: SplitReport) -> str:
    if split.stats is None:
        return f"<h3>{split.name}</h3><p>Not prepared (see the warnings).</p>"
    s = split.stats
    counts = [
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
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num">{html.escape(str(v))}</td></tr>'
        for k, v in counts
    )
    out = (
        f'<section class="split" data-split="{split.name}" data-rows-read="{s.rows_read}" '
        f'data-kept="{s.kept}" data-tokens="{s.total_tokens}" '
        f'data-trained-tokens="{s.trained_tokens}"><h3>{split.name}</h3>'
        f'<table class="counts">{rows}</table>'
    )
    return out + _histogram_html(split.lengths) + _roles_html(split) + "</section>"


def _histogram_html(lengths: list[int]) -> str:
    hist = length_histogram(lengths)
    if not hist:
        return ""
    top = max(c for _, _, c in hist)
    rows = "".join(
        f'<tr><td class="num">{lo}–{hi}</td><td><span class="bar" '
        f'style="width:{20 * c / top:.2f}rem"></span></td><td class="num">{c}</td></tr>'
        for lo, hi, c in hist
    )
    return (
        f"<p>Token lengths of {len(lengths)} rows: min {min(lengths)}, median "
        f"{statistics.median(lengths):g}, max {max(lengths)}</p>"
        f'<table class="histogram"><tr><th>tokens</th><th></th><th>rows</th></tr>{rows}</table>'
    )


def _roles_html(split: SplitReport) -> str:
    if not split.roles:
        return ""
    total = sum(r.trained for r in split.roles.values()) or 1
    rows = "".join(
        f'<tr data-role="{html.escape(role)}" data-tokens="{r.tokens}" '
        f'data-trained="{r.trained}"><td>{html.escape(role)}</td>'
        f'<td class="num">{r.trained}</td><td class="num">{r.tokens}</td>'
        f'<td class="num">{100 * r.trained / max(r.tokens, 1):.1f}%</td>'
        f'<td class="num">{100 * r.trained / total:.1f}%</td></tr>'
        for role, r in split.roles.items()
    )
    return (
        f"<p>Trained tokens by role ({split.role_rows} rows rendered)</p>"
        '<table class="roles"><tr><th>role</th><th>trained</th><th>tokens</th>'
        f"<th>trained share of role</th><th>share of all trained</th></tr>{rows}</table>"
    )


def render_html(report: InspectReport) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    warnings = "".join(
        f'<div class="warning{" blocking" if f.blocking else ""}">{html.escape(f.message)}</div>'
        for f in report.warnings
    )
    legend = (
        '<p class="legend"><span class="tok trained">trained</span>'
        '<span class="tok masked">not trained</span> Boxes are tokens; hover one for its id and '
        "position. ↵ is a newline.</p>"
    )
    examples = "".join(_example_html(n, row) for n, row in enumerate(report.examples))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>chatsft inspect: {html.escape(report.source)}</title>"
        f"<style>{CSS}</style></head><body><h1>chatsft inspect</h1>"
        f'<p class="meta">data {html.escape(report.source)} · tokenizer '
        f"{html.escape(report.tokenizer)} · eos {html.escape(repr(report.eos_token))}<br>"
        f"{html.escape(settings)}</p>"
        f'<h2>Warnings</h2><section id="warnings" data-count="{len(report.warnings)}">'
        f"{warnings or '<p>None.</p>'}</section>"
        '<h2>Statistics</h2><section id="stats">'
        + "".join(_split_html(s) for s in report.splits)
        + f'</section><h2>Examples</h2><section id="examples">{legend}{examples}</section>'
        "</body></html>\n"
    )


# --- command line ---------------------------------------------------------------------------------


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer", help="tokenizer folder or hub id (default: the config's model)"
    )
    parser.add_argument("--num-examples", type=int, default=3, help="examples to show (3)")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour trained tokens (auto: on a terminal, unless NO_COLOR is set)",
    )
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=1000,
        help="rows rendered for the per-role counts (1000)",
    )
    parser.add_argument(
        "--max-rows", type=int, help=f"read only the first N rows (streaming: {STREAM_ROWS})"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if there is any warning")


def _flags_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsft inspect", allow_abbrev=False)
    _add_flags(parser)
    return parser


def add_inspect_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="show what training would train on: counts, lengths, trained vs masked tokens",
        description="Run the data preparation `chatsft train` would run and show its counts, "
        "token lengths, trained tokens per role, packing efficiency and examples with every "
        "token marked trained or not; warn about an end-of-turn token that is never trained, a "
        "template that is not prefix-preserving and eval rows that are also train rows. Any "
        "training setting can follow as --field value, as for `chatsft train`.",
    )
    parser.add_argument(
        "source",
        metavar="CONFIG.yaml|DATA",
        help="a run config, or a data file, folder or hub id (then give --tokenizer)",
    )
    _add_flags(parser)
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="--field value", help="setting overrides"
    )
    parser.set_defaults(func=cmd_inspect)
    return parser


def _run_config(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    if args.source.endswith((".yaml", ".yml")):
        return load_run_config(args.source, overrides)
    # DATA form: the tokenizer stands in for the model (only its tokenizer is loaded).
    if args.tokenizer is None and "model" not in parse_overrides(overrides):
        raise ChatSFTError(
            "inspecting a data file needs a tokenizer",
            field="tokenizer",
            hint="add --tokenizer PATH (a tokenizer or model folder, or a hub id), or pass a "
            "run config",
        )
    extra = ["--model", args.tokenizer] if args.tokenizer else []
    return load_run_config(None, ["--dataset", args.source, *extra, *overrides])


def _load_given_tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ChatSFTError(
            f"could not load the tokenizer: {err}", source=path, field="tokenizer"
        ) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    # Flags may also come after SOURCE, mixed with --field overrides: pick ours out of the rest.
    args, overrides = _flags_parser().parse_known_args(args.overrides, namespace=args)
    if args.num_examples < 0 or args.sample_rows < 0:
        raise ChatSFTError("--num-examples and --sample-rows must be >= 0", field="num_examples")
    run = _run_config(args, overrides)
    report = inspect_run(
        run,
        tokenizer=_load_given_tokenizer(args.tokenizer),
        num_examples=args.num_examples,
        sample_rows=args.sample_rows,
        max_rows=args.max_rows,
    )
    sys.stdout.write(render_terminal(report, use_color(args.color)))
    if args.html:
        write_atomic(args.html, render_html(report))
        print(f"[chatsft] wrote {args.html}")
    if any(f.blocking for f in report.warnings):
        return 1
    return 1 if args.strict and report.warnings else 0
