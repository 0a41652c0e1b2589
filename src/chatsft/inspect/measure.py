"""What `chatsft inspect` measures: the preparation training would run, and what it did.

Counts (rows read, kept, dropped, truncated), token lengths, the share of trained tokens per role,
packing efficiency, and example rows with every token marked trained or not. The masks come from
the same functions the trainer calls and the labels from the same collator, so what is measured is
what the loss sees. Findings are the mistakes that ruin a run quietly: an end-of-turn token that is
never trained, a template that is not prefix-preserving, eval rows that are also train rows.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets

from ..data.collate import IGNORE_INDEX, PaddedCollator
from ..data.encode import Encoded, PrepOptions, encode, prep_options_of
from ..data.formats import Example, PromptCompletion, Text, Tokenized, detect_format, normalize
from ..data.load import dataset_spec, datasets_named, load_data
from ..data.packing import best_fit_decreasing
from ..data.prepare import PrepStats, prepare_for_training
from ..data.templates import RenderTimeout, chat_renderer, render_time_limit
from ..data.tokenize import num_trained, trained_of
from ..errors import ChatSFTError
from ..model.load import load_tokenizer

if TYPE_CHECKING:
    from ..config import ScriptArguments, SFTConfig

STREAM_ROWS = 1000  # rows read from a streaming dataset when max_rows is not given
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
    differently cannot be split this way, so its tokens are 'unattributed'. Call it inside the
    example's render_time_limit (attributed_tokens does): a template that never ends is stopped.
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
    try:
        render = chat_renderer(tokenizer, messages, example.tools, example.template_kwargs)
        for k in range(len(messages)):
            upto = render(messages[: k + 1], False)
            if not text.startswith(upto):
                return [inf], ["unattributed"]
            ends.append(len(upto))
    except RenderTimeout:
        raise
    except ChatSFTError:
        return [inf], ["unattributed"]
    ends[-1] = inf
    return ends, [m["role"] for m in messages]


def attributed_tokens(
    example: Any, tokenizer: Any, opts: PrepOptions, row: int = 1
) -> tuple[Encoded, list[str]]:
    """The example encoded exactly as preparation encodes it (data.encode), and the role of each
    of its tokens, found from the tokens' character offsets. One render time limit covers the
    example's renders for encoding and for the roles."""
    with render_time_limit():
        [encoded] = encode([example], tokenizer, opts, rows=[row], with_offsets=True)
        if isinstance(example, Tokenized):
            return encoded, ["tokens"] * len(encoded.input_ids)
        if encoded.offsets is None:  # no character offsets: a slow tokenizer
            return encoded, ["unattributed"] * len(encoded.input_ids)
        ends, names = role_spans(example, tokenizer, encoded.text)
    roles: list[str] = []
    for start, end in encoded.offsets:
        if end > start:
            role = names[min(bisect.bisect_right(ends, start), len(names) - 1)]
        else:  # no characters of its own (a BOS prefix, trimmed offsets): joins its neighbour
            role = roles[-1] if roles else names[0]
        roles.append(role)
    return encoded, roles


def count_roles(
    dataset: datasets.Dataset, tokenizer: Any, opts: PrepOptions, limit: int
) -> tuple[dict[str, RoleCount], int]:
    """Tokens and trained tokens per role over the first `limit` raw rows, in the rows training
    keeps (the same length policy and first-token rule: over all rows, the trained counts add up
    to PrepStats.trained_tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        return {}, 0  # character offsets need a fast (Rust) tokenizer
    counts: dict[str, RoleCount] = {}
    sample = dataset.select(range(min(limit, len(dataset))))
    for row_number, example in _examples(sample, opts):
        encoded, roles = attributed_tokens(example, tokenizer, opts, row_number)
        for a, b in encoded.pieces:
            # Nothing predicts a row's first token.
            trained = [False, *trained_of(encoded.labels[a + 1 : b])]
            for role, is_trained in zip(roles[a:b], trained):
                count = counts.setdefault(role, RoleCount())
                count.tokens += 1
                count.trained += is_trained
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


def _examples(dataset: datasets.Dataset, opts: PrepOptions) -> Iterator[tuple[int, Example]]:
    """(1-based row number, normalised example) for every row, in order."""
    fmt = detect_format(dataset.column_names, opts.dataset_text_field, opts.dataset_format)
    for i, row in enumerate(dataset):
        example = normalize(
            row,
            fmt,
            row_index=i + 1,
            dataset_text_field=opts.dataset_text_field,
            prompt_template=opts.prompt_template,
        )
        yield i + 1, example


def row_keys(dataset: datasets.Dataset, opts: PrepOptions) -> list[str]:
    """A hash per row of its normalised example (format and extra columns ignored, whitespace
    collapsed), so the same conversation in a train file and an eval file compares equal."""
    keys = []
    for _, example in _examples(dataset, opts):
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


# --- one split -------------------------------------------------------------------------------------


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


def _duplicate_findings(
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    column_map: dict[str, str] | None,
    opts: PrepOptions,
) -> list[Finding]:
    if column_map:
        train = train.rename_columns(column_map)
        evaluation = evaluation.rename_columns(column_map)
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


# --- a whole run -----------------------------------------------------------------------------------


def load_splits(
    script: ScriptArguments,
    *,
    seed: int = 42,
    eval_strategy: str = "no",
    max_rows: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train and eval data as `chatsft train` chooses them (data.load.train_and_eval), cut
    to the first max_rows rows. Streaming data is read up to max_rows (default STREAM_ROWS) so
    that it has a length."""
    if not script.dataset_name:
        raise ChatSFTError(
            "is required", field="dataset_name", hint="add dataset_name: ... or --dataset_name ..."
        )
    return datasets_named(
        script,
        seed=seed,
        eval_strategy=eval_strategy,
        load=lambda spec, split, streaming: _load(spec, split, streaming, max_rows),
    )


def _load(spec: str, split: str, streaming: bool, max_rows: int | None) -> datasets.Dataset:
    data = load_data(spec, split, streaming=streaming)
    if streaming:
        return datasets.Dataset.from_list(list(data.take(max_rows or STREAM_ROWS)))
    if max_rows is not None and max_rows < len(data):
        return data.select(range(max_rows))
    return data


def inspect_run(
    script: ScriptArguments,
    sft: SFTConfig,
    model: str | None = None,
    *,
    tokenizer: Any | None = None,
    num_examples: int = 3,
    sample_rows: int = 1000,
    max_rows: int | None = None,
) -> InspectReport:
    """Everything `chatsft inspect` shows for a run: where its data comes from (`script`), how it
    is prepared (`sft`) and the model whose tokenizer is used (`model`, a folder or hub id).
    `tokenizer`: a loaded tokenizer to use instead of the model's own (then `model` may be None).
    """
    if not model and tokenizer is None:
        raise ChatSFTError(
            "inspecting data needs a tokenizer",
            field="tokenizer",
            hint="give a tokenizer, or the model_name_or_path whose tokenizer training uses",
        )
    tok = load_tokenizer(
        model or "",  # only read when no tokenizer is given
        tokenizer,
        chat_template_path=sft.chat_template_path,
        eos_token=sft.eos_token,
        pad_token=sft.pad_token,
        trust_remote_code=sft.trust_remote_code,
    )
    opts = prep_options_of(sft, tok.eos_token)
    source = dataset_spec(script.dataset_name or "", script.dataset_config)
    report = InspectReport(
        source=source,
        tokenizer=getattr(tok, "name_or_path", "") or str(model),
        eos_token=opts.eos_token,
        settings={k: getattr(sft, k) for k in SHOWN_SETTINGS},
    )
    train, evaluation = load_splits(
        script, seed=sft.seed, eval_strategy=sft.eval_strategy, max_rows=max_rows
    )
    common: dict[str, Any] = dict(
        column_map=sft.column_map, num_proc=sft.dataset_num_proc, sample_rows=sample_rows
    )
    split, prepared, findings = inspect_split(
        train, tok, opts, name="train", source=source, **common
    )
    report.splits.append(split)
    report.warnings += findings
    if prepared is not None:
        report.examples = token_rows(prepared, tok, num_examples)
    if evaluation is not None:
        eval_source = script.eval_dataset or source
        split, _, findings = inspect_split(
            evaluation, tok, opts, name="eval", source=eval_source, **common
        )
        report.splits.append(split)
        report.warnings += findings
        report.warnings += _duplicate_findings(train, evaluation, sft.column_map, opts)
    return report
