"""The decoding knobs: their table, and every check that needs no model.

Kept free of torch and transformers (a test pins this) so the command line can check its flags, and
SFTConfig its `generation_eval`, without the seconds a torch import costs. Checks against a prompt
and a model take plain numbers (token counts, the context size) for the same reason.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ChatSFTError

Prompt = str | list[dict[str, Any]]
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Knob:
    kind: str  # int | float | bool | strings | early_stopping
    help: str
    low: float | None = None  # smallest allowed value (excluded when low_open)
    high: float | None = None
    low_open: bool = False

    def rule(self) -> str:
        parts = [f"{'>' if self.low_open else '>='} {self.low:g}"] if self.low is not None else []
        return " and ".join(parts + ([f"<= {self.high:g}"] if self.high is not None else []))

    def allows(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or value <= self.high)


KNOBS: dict[str, Knob] = {
    "max_new_tokens": Knob("int", f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})", 1),
    "max_length": Knob("int", "most tokens in prompt + generation (or use max_new_tokens)", 1),
    "min_new_tokens": Knob("int", "end of turn is held back until this many new tokens", 0),
    "min_length": Knob("int", "end of turn is held back until prompt + generation this long", 0),
    "do_sample": Knob("bool", "sample instead of greedy/beam search (implied by sampling knobs)"),
    "temperature": Knob("float", "sampling temperature; 0 means greedy", 0),
    "top_k": Knob("int", "sample from the k most likely tokens (0: all)", 0),
    "top_p": Knob("float", "nucleus sampling: smallest set with this much probability", 0, 1, True),
    "min_p": Knob("float", "drop tokens below min_p x the top token's probability", 0, 1),
    "repetition_penalty": Knob(
        "float", "> 1 discourages tokens already in the text", 0, None, True
    ),
    "no_repeat_ngram_size": Knob("int", "never repeat an n-gram of this size (0: off)", 0),
    "num_beams": Knob("int", "beam search width (1: no beam search)", 1),
    "length_penalty": Knob("float", "beam search: > 0 favours longer, < 0 shorter sequences"),
    "early_stopping": Knob("early_stopping", "beam search: true, false or never"),
    "num_return_sequences": Knob("int", "sequences per prompt (beams, or independent samples)", 1),
    "stop_strings": Knob("strings", "stop once the new text contains one; the text is cut there"),
    "seed": Knob("int", "random seed for sampling (the caller's RNG is left as it was)"),
}
ALIASES = {"stop": "stop_strings"}
SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p")
BEAM_KNOBS = ("length_penalty", "early_stopping")
LENGTH_KNOBS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length")
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
# What load_for_inference accepts as a dtype name ("auto": the dtype saved in the model's config).
DTYPES = ("float32", "bfloat16", "float16", "auto")


def unknown_knob(name: str, known: Iterable[str], prefix: str = "") -> ChatSFTError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"knobs are {', '.join(KNOBS)}"
    return ChatSFTError("unknown generation knob", field=f"{prefix}{name}", hint=hint)


def _coerce(name: str, value: Any) -> Any:
    """Accept real values, and the strings a CLI flag or `/set` line gives."""
    kind = KNOBS[name].kind
    text = value.strip().lower() if isinstance(value, str) else None
    try:
        if kind == "strings":
            items = [value] if isinstance(value, str) else list(value)
            if items and all(isinstance(s, str) and s for s in items):
                return items
        elif kind in ("bool", "early_stopping"):
            if isinstance(value, bool):
                return value
            if text in TRUE | FALSE:
                return text in TRUE
            if kind == "early_stopping" and text == "never":
                return "never"
        elif not isinstance(value, bool):  # True is an int to Python, never a token count
            if kind == "int" and (isinstance(value, int) or text is not None):
                return int(value)
            if kind == "float" and (isinstance(value, (int, float)) or text is not None):
                return float(value)
    except (TypeError, ValueError):
        pass
    expected = {
        "strings": "a non-empty string or list of strings",
        "bool": "true or false",
        "early_stopping": "true, false or never",
    }.get(kind, f"an {kind}" if kind == "int" else "a number")
    raise ChatSFTError(f"expected {expected}, got {value!r}", field=name)


def check_knobs(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Validate decoding knobs; return them normalised, with do_sample and the length limit resolved.

    A value of None means "not set". Sampling knobs imply do_sample; temperature 0 means greedy.
    Knobs left unset fall back to the model's generation_config, then to transformers' defaults.
    """
    out: dict[str, Any] = {}
    for raw_name, value in knobs.items():
        name = ALIASES.get(raw_name, raw_name)
        if name not in KNOBS:
            raise unknown_knob(raw_name, [*KNOBS, *ALIASES])
        if value is None:
            continue
        value = _coerce(name, value)
        knob = KNOBS[name]
        if knob.kind in ("int", "float") and not knob.allows(value):
            raise ChatSFTError(f"must be {knob.rule()}, got {value}", field=name)
        out[name] = value
    return _check_combinations(out)


def _check_combinations(k: dict[str, Any]) -> dict[str, Any]:
    if k.get("temperature") == 0 and not k.get("do_sample"):
        del k["temperature"]  # the usual "temperature 0 = greedy" convention
        k["do_sample"] = False  # greedy even if the model's generation_config samples
    sampling = [n for n in SAMPLING_KNOBS if n in k]
    if k.get("do_sample") is False and sampling:
        raise ChatSFTError(
            "only applies when sampling, but do_sample is false",
            field=sampling[0],
            hint="set do_sample true, or leave it out",
        )
    if sampling:
        k["do_sample"] = True
    elif k.get("num_beams", 1) > 1:
        k.setdefault("do_sample", False)  # beam search, not beam sampling, unless asked
    # Otherwise do_sample stays unset: the model's generation_config decides.
    if k.get("do_sample") and k.get("temperature") == 0:
        raise ChatSFTError(
            "must be > 0 when sampling",
            field="temperature",
            hint="for greedy decoding use temperature 0 without do_sample",
        )
    beams = k.get("num_beams", 1)
    for name in BEAM_KNOBS:
        if name in k and beams == 1:
            raise ChatSFTError("only applies to beam search", field=name, hint="set num_beams > 1")
    if not k.get("do_sample") and k.get("num_return_sequences", 1) > beams:
        raise ChatSFTError(
            f"greedy/beam search can return at most num_beams ({beams}) distinct sequences",
            field="num_return_sequences",
            hint="raise num_beams, or sample (do_sample true)",
        )
    if "max_length" in k and "max_new_tokens" in k:
        raise ChatSFTError("set either max_length or max_new_tokens, not both", field="max_length")
    if "max_length" not in k:
        k.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    for low, high in (("min_new_tokens", "max_new_tokens"), ("min_length", "max_length")):
        if k.get(low, 0) > k.get(high, float("inf")):
            raise ChatSFTError(f"is larger than {high} ({k[high]})", field=low)
    return k


def fit_lengths(
    knobs: Mapping[str, Any],
    prompt_lengths: Sequence[int],
    context: int | None,
    *,
    max_new_tokens_set: bool = True,
) -> dict[str, Any]:
    """Check knobs (as check_knobs returns them) against the prompts' token counts and the model's
    context (config.max_position_embeddings; None where the model has no such limit).

    Returns the knobs; a default max_new_tokens (`max_new_tokens_set` false) is lowered to the room
    the context leaves, since nobody asked for that many, while one the caller set is an error.
    With several prompts an error names the prompt's index as its row.
    """
    k = dict(knobs)
    if not prompt_lengths:
        return k
    longest = max(prompt_lengths)
    shortest = min(prompt_lengths)
    row = prompt_lengths.index(longest) if len(prompt_lengths) > 1 else None
    where = f"the prompt is {longest} tokens"
    ctx = f"the model's context ({context} tokens, config.max_position_embeddings)"
    if context is not None and longest >= context:
        raise ChatSFTError(
            f"{where}, which fills {ctx}: there is no room to generate",
            row=row,
            field="prompt",
            hint="shorten the prompt (in chat: /reset)",
        )
    if "max_length" in k:
        limit = k["max_length"]
        if limit < longest + 1:
            raise ChatSFTError(
                f"must be at least the prompt length + 1 = {longest + 1} ({where}), got {limit}",
                row=row,
                field="max_length",
                hint="raise max_length, or set max_new_tokens instead",
            )
        if context is not None and limit > context:
            raise ChatSFTError(
                f"is larger than {ctx}, got {limit}",
                field="max_length",
                hint=f"set max_length <= {context}",
            )
        if k.get("min_new_tokens", 0) > limit - longest:
            raise ChatSFTError(
                f"is larger than the {limit - longest} new tokens max_length ({limit}) leaves "
                f"({where})",
                row=row,
                field="min_new_tokens",
            )
        return k
    new = k["max_new_tokens"]
    if context is not None and longest + new > context:
        if max_new_tokens_set:
            raise ChatSFTError(
                f"is {new}, but {where} and {ctx} leaves room for {context - longest}",
                row=row,
                field="max_new_tokens",
                hint=f"set max_new_tokens <= {context - longest}",
            )
        new = k["max_new_tokens"] = context - longest
    if k.get("min_new_tokens", 0) > new:
        raise ChatSFTError(
            f"is larger than the {new} new tokens {ctx} leaves ({where})",
            row=row,
            field="min_new_tokens",
        )
    if k.get("min_length", 0) > shortest + new:
        raise ChatSFTError(
            f"is more than the prompt + max_new_tokens can reach ({shortest} + {new})",
            row=prompt_lengths.index(shortest) if len(prompt_lengths) > 1 else None,
            field="min_length",
        )
    return k


def check_dtype(dtype: Any) -> Any:
    """A dtype name from DTYPES (None: the loader's default); anything else that is not a string
    (a torch.dtype from Python callers) is left for torch to judge."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ChatSFTError(
            f"unknown dtype {dtype!r}", field="dtype", hint=f"use {', '.join(DTYPES)}"
        )
    return dtype


EVAL_OPTIONS = ("prompts", "num_prompts", "batch_size")


def check_generation_eval(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an SFTConfig.generation_eval dict early (before any model is loaded)."""
    if not isinstance(config, Mapping):
        raise ChatSFTError(
            f"expected a mapping, got {type(config).__name__}", field="generation_eval"
        )
    for name in config:
        if name not in KNOBS and name not in ALIASES and name not in EVAL_OPTIONS:
            raise unknown_knob(name, [*KNOBS, *ALIASES, *EVAL_OPTIONS], prefix="generation_eval.")
    try:
        check_knobs({k: v for k, v in config.items() if k not in EVAL_OPTIONS})
    except ChatSFTError as err:
        raise ChatSFTError(
            err.message, field=f"generation_eval.{err.field}", hint=err.hint
        ) from None
    for name in ("num_prompts", "batch_size"):
        value = config.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ChatSFTError(
                f"must be an integer >= 1, got {value!r}", field=f"generation_eval.{name}"
            )
    return dict(config)
