"""Generation: every decoding knob validated up front, batched `model.generate`, sample generations
during evaluation, and `chatsft generate`.

Decoding itself is transformers' (`GenerationConfig` + `model.generate`); this module only checks the
knobs, renders prompts with the same chat-template code the trainer used, pads on the left, and cuts
the decoded text at the end of turn or a stop string.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TrainerCallback

from .data.formats import (
    Conversation,
    PromptCompletion,
    apply_formatting_func,
    check_messages,
    detect_format,
    normalize,
)
from .data.templates import render_chat
from .errors import ChatSFTError
from .files import write_atomic
from .model.load import check_model_ref, load_model, load_tokenizer, read_chat_template

Prompt = str | list[dict[str, Any]]
DEFAULT_MAX_NEW_TOKENS = 256
GENERATIONS_FILE = "generations.jsonl"


# --- knobs -----------------------------------------------------------------------------------------


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
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _unknown(name: str, known: Iterable[str], prefix: str = "") -> ChatSFTError:
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
            raise _unknown(raw_name, [*KNOBS, *ALIASES])
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


# --- prompts ---------------------------------------------------------------------------------------


def check_prompt(prompt: Any, row: int | None = None, source: str | None = None) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return check_messages(prompt, row if row is not None else 0, "prompt", source)
    raise ChatSFTError(
        f"a prompt is a string or a list of {{role, content}} messages, got {type(prompt).__name__}",
        source=source,
        row=row,
        field="prompt",
    )


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Chat prompts through the chat template (which writes every special token itself, so the
    tokenizer adds none); plain strings tokenized as they are, with the tokenizer's own specials."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ChatSFTError(
            "the tokenizer has no chat template, so chat prompts cannot be rendered",
            field="chat_template",
            hint="pass a plain-text prompt, or give a chat template (--chat-template)",
        )
    text = render_chat(tokenizer, prompt, None, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a reply: EOS, the model's configured EOS ids, and the chat template's
    end-of-turn token (base models often have EOS <|endoftext|> but end turns with <|im_end|>)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured, _end_of_turn_id(tokenizer)):
        ids += value if isinstance(value, list) else [value]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _end_of_turn_id(tokenizer: Any) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "chatsft-end-of-turn-probe"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # templates that reject this probe simply get no extra stop token
        return None
    tail = text[text.find(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(tail.lstrip(), add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(
        getattr(tokenizer, "added_tokens_decoder", {})
    )
    return ids[0] if ids and ids[0] in special else None


# --- generation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]  # generated tokens, without end-of-turn and padding (a stop string's kept)
    finish_reason: str  # "eos" | "stop_string" | "length"
    score: float | None = None  # beam search: length-normalised log-probability

    def to_json(self) -> dict[str, Any]:
        out = {"text": self.text, "num_tokens": len(self.token_ids)}
        out["finish_reason"] = self.finish_reason
        return out if self.score is None else {**out, "score": self.score}


@dataclass(frozen=True)
class GenerationResult:
    prompt: Prompt
    generations: list[Generation]  # num_return_sequences of them, best first for beam search

    @property
    def text(self) -> str:
        return self.generations[0].text

    def __str__(self) -> str:
        return self.text


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode and left padding for the duration; both restored after, even on errors.
    Left padding keeps every prompt's last token at the end of the row, where generation starts."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """A seeded RNG that leaves the caller's (e.g. the training loop's) random stream untouched."""
    if seed is None:
        yield
        return
    fork: dict[str, Any] = {"devices": []}  # CPU state is always forked
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fork = {"devices": [index], "device_type": "cuda"}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        yield


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    progress: bool = False,
    **knobs: Any,
) -> list[GenerationResult]:
    """Generate for each prompt (a string, or a list of chat messages), `batch_size` at a time.

    Knobs are `KNOBS` (max_new_tokens, temperature, top_p, num_beams, stop_strings, seed, ...); an
    unknown or out-of-range knob raises ChatSFTError naming it.
    """
    knobs = check_knobs(knobs)
    prompts = [check_prompt(p, row=i) for i, p in enumerate(prompts)]
    if batch_size < 1:
        raise ChatSFTError(f"must be >= 1, got {batch_size}", field="batch_size")
    config, stops = generation_config(model, tokenizer, knobs)
    device = next(model.parameters()).device
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch", file=sys.stderr)
    results: list[GenerationResult] = []
    with inference_mode(model, tokenizer), seeded(knobs.get("seed"), device), torch.no_grad():
        for batch in batches:
            results += _generate_batch(model, tokenizer, batch, config, stops, device)
    return results


def generation_config(
    model: torch.nn.Module, tokenizer: Any, knobs: Mapping[str, Any]
) -> tuple[GenerationConfig, list[str]]:
    stops = list(knobs.get("stop_strings", []))
    # Stop strings go to StopInGeneratedText, not to transformers' StopStringCriteria, which also
    # matches text that begins in the prompt (a "\n\n" stop fires on the first "\n" after a
    # template ending in "\n").
    values = {k: v for k, v in knobs.items() if k not in ("seed", "stop_strings")}
    beams = values.get("num_beams", 1) > 1
    eos = end_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        **values,
        eos_token_id=eos,
        pad_token_id=pad,
        # Beam scores come back only in the dict output; greedy/sampling need neither.
        return_dict_in_generate=beams,
        output_scores=beams,
    )
    return config, stops


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    config: GenerationConfig,
    stops: list[str],
    device: torch.device,
) -> list[GenerationResult]:
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
    prompt_length = enc["input_ids"].shape[1]
    extra = {}
    if stops:
        criterion = StopInGeneratedText(tokenizer, stops, prompt_length)
        extra["stopping_criteria"] = StoppingCriteriaList([criterion])
    out = model.generate(**enc, generation_config=config, **extra)
    sequences = out.sequences if config.return_dict_in_generate else out
    scores = getattr(out, "sequences_scores", None)
    new_tokens = sequences[:, prompt_length:].tolist()
    per_prompt = len(new_tokens) // len(prompts)  # generate repeats each prompt consecutively
    gens = [
        _finish(tokenizer, row, config.eos_token_id, stops, None if scores is None else scores[i])
        for i, row in enumerate(new_tokens)
    ]
    return [
        GenerationResult(p, gens[i * per_prompt : (i + 1) * per_prompt])
        for i, p in enumerate(prompts)
    ]


class StopInGeneratedText(StoppingCriteria):
    """Ends a row once its generated text (never the prompt) contains a stop string.

    Costs a device-to-host copy of each row's last few tokens per step, so it is only installed
    when stop strings are given."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        # Decode a window, not the whole text: a byte-level token carries >= 1/4 of a character.
        self.window = 4 * max(len(s) for s in stops) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(s in tail for s in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _finish(
    tokenizer: Any, row: list[int], eos: list[int], stops: list[str], score: Any
) -> Generation:
    """Cut at the first end-of-turn token, decode, then cut at the first stop string."""
    end = next((i for i, t in enumerate(row) if t in eos), None)
    reason = "length" if end is None else "eos"
    row = row[:end] if end is not None else row
    # Rows that stopped early are padded to the batch's length; padding is a special token.
    text = tokenizer.decode(row, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop_string"
    value = None if score is None else float(score)
    return Generation(text, [t for t in row if t != tokenizer.pad_token_id], reason, value)


# --- loading for inference -------------------------------------------------------------------------


def load_for_inference(
    path: str,
    *,
    dtype: str | None = None,
    device: str | None = None,
    chat_template_path: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A full model folder (or hub id), or a LoRA adapter folder on top of its base model."""
    adapter_file = os.path.join(path, "adapter_config.json")
    init = {"dtype": dtype} if dtype else None
    if os.path.isfile(adapter_file):
        base = _adapter_base(adapter_file)
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base, init), path)
    else:
        check_model_ref(path)
        base, model = path, load_model(path, init)
    tok_source = path if _has_tokenizer(path) or not os.path.isdir(path) else base
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_source)
    except OSError as err:
        raise ChatSFTError(
            f"could not load the tokenizer: {err}", source=tok_source, field="tokenizer"
        ) from None
    tokenizer = load_tokenizer(path, tokenizer)
    if chat_template_path is not None:
        tokenizer.chat_template = read_chat_template(chat_template_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _adapter_base(adapter_file: str) -> str:
    with open(adapter_file, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ChatSFTError(
            "adapter has no base model",
            source=adapter_file,
            field="base_model_name_or_path",
            hint="set it to the base model's hub id or folder",
        )
    return base


def _has_tokenizer(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


# --- sample generations during evaluation ----------------------------------------------------------


class GenerationEvalCallback(TrainerCallback):
    """At each evaluation, generate for fixed prompts; print the samples and append
    {step, epoch, prompt, completion} records to `<output_dir>/generations.jsonl`."""

    def __init__(
        self,
        prompts: Sequence[Prompt],
        tokenizer: Any | None = None,
        *,
        batch_size: int = 8,
        **knobs: Any,
    ) -> None:
        if not prompts:
            raise ChatSFTError("needs at least one prompt", field="generation_eval.prompts")
        self.prompts = [check_prompt(p, row=i) for i, p in enumerate(prompts)]
        self.knobs = check_knobs(knobs)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self._last_step: int | None = None

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        # A dict of eval sets fires on_evaluate once per set; one set of samples per step is enough.
        if model is None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        # Every rank generates: a sharded (FSDP, ZeRO-3) model needs all ranks in each forward.
        results = generate(model, tokenizer, self.prompts, batch_size=self.batch_size, **self.knobs)
        if state.is_world_process_zero:
            self._record(args.output_dir, state, results)

    def _record(self, output_dir: str, state: Any, results: list[GenerationResult]) -> None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, GENERATIONS_FILE), "a", encoding="utf-8") as f:
            for result in results:
                record = {"step": state.global_step, "epoch": state.epoch}
                record.update(prompt=result.prompt, completion=result.text)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for i, result in enumerate(results):
            prompt = _short(result.prompt)
            print(f"[chatsft] step {state.global_step} sample {i}: {prompt} → {result.text!r}")


def _short(prompt: Prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1].get("content") or ""
    return repr(text if len(text) <= width else text[: width - 1] + "…")


EVAL_OPTIONS = ("prompts", "num_prompts", "batch_size")


def check_generation_eval(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an SFTConfig.generation_eval dict early (before any model is loaded)."""
    if not isinstance(config, Mapping):
        raise ChatSFTError(
            f"expected a mapping, got {type(config).__name__}", field="generation_eval"
        )
    for name in config:
        if name not in KNOBS and name not in ALIASES and name not in EVAL_OPTIONS:
            raise _unknown(name, [*KNOBS, *ALIASES, *EVAL_OPTIONS], prefix="generation_eval.")
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


def generation_eval_callback_from_config(
    config: Mapping[str, Any],
    eval_dataset: Any | None,
    tokenizer: Any | None = None,
    **format_options: Any,
) -> GenerationEvalCallback:
    """Build the callback from SFTConfig.generation_eval. Without explicit `prompts`, the first
    `num_prompts` (default 4) usable rows of the raw eval set give them: a conversation up to its
    last assistant turn, or a row's prompt. `format_options` are dataset_format, column_map,
    dataset_text_field, prompt_template and formatting_func, as for training."""
    config = check_generation_eval(config)
    prompts = config.pop("prompts", None)
    num_prompts = config.pop("num_prompts", 4)
    batch_size = config.pop("batch_size", 8)
    if prompts is None:
        prompts = eval_prompts(eval_dataset, num_prompts, **format_options)
    elif not isinstance(prompts, list):
        raise ChatSFTError("expected a list of prompts", field="generation_eval.prompts")
    return GenerationEvalCallback(prompts, tokenizer, batch_size=batch_size, **config)


def eval_prompts(
    dataset: Any | None,
    num_prompts: int,
    *,
    dataset_format: str | None = None,
    column_map: Mapping[str, str] | None = None,
    dataset_text_field: str = "text",
    prompt_template: str | None = None,
    formatting_func: Callable[[Any], Any] | None = None,
) -> list[Prompt]:
    """The first `num_prompts` prompts of a raw (untokenized) eval set, read as training reads it."""
    if isinstance(dataset, Mapping):
        dataset = next(iter(dataset.values()), None)  # a dict of eval sets: the first one
    if dataset is None:
        raise ChatSFTError(
            "no prompts and no eval_dataset to take them from",
            field="generation_eval",
            hint="give generation_eval.prompts, or an eval_dataset",
        )
    prompts: list[Prompt] = []
    fmt = None
    for i, row in enumerate(itertools.islice(iter(dataset), 10 * num_prompts)):
        row = {column_map.get(k, k): v for k, v in row.items()} if column_map else dict(row)
        if formatting_func is not None:
            row = apply_formatting_func(row, formatting_func, i)
        fmt = fmt or detect_format(list(row), dataset_text_field, dataset_format)
        example = normalize(
            row,
            fmt,
            row_index=i,
            dataset_text_field=dataset_text_field,
            prompt_template=prompt_template,
        )
        prompt = _prompt_of(example)
        if prompt is not None:
            prompts.append(prompt)
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise ChatSFTError(
            f"the eval set's rows ({fmt} format) have no prompt to generate from",
            field="generation_eval",
            hint="give generation_eval.prompts",
        )
    return prompts


def _prompt_of(example: Any) -> Prompt | None:
    if isinstance(example, PromptCompletion):
        return example.prompt
    if isinstance(example, Conversation):
        return conversation_prompt(example.messages)
    return None  # plain text and token ids have no prompt/answer boundary


def conversation_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A conversation ending in an assistant turn asks for that turn again: the prompt is what
    comes before it (None if nothing does)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1] or None
    return messages


# --- `chatsft generate` ----------------------------------------------------------------------------


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding knobs (unset: the model's generation_config)")
    for name, knob in KNOBS.items():
        flag = "--stop" if name == "stop_strings" else "--" + name.replace("_", "-")
        if knob.kind == "bool":
            group.add_argument(flag, dest=name, action="store_true", default=None, help=knob.help)
        elif knob.kind == "strings":
            group.add_argument(flag, dest=name, action="append", metavar="TEXT", help=knob.help)
        else:
            types = {"int": int, "float": float}
            kind = types.get(knob.kind, str)
            group.add_argument(
                flag, dest=name, type=kind, metavar=knob.kind.upper(), help=knob.help
            )


def knobs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in KNOBS if getattr(args, name, None) is not None}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_DIR", help="model folder (or hub id), or a LoRA adapter folder"
    )
    parser.add_argument("--dtype", help="weights dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--chat-template", help="a .jinja file or tokenizer folder to use instead")


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate completions for a prompt or a JSONL file of prompts",
        description="Generate with a trained model. --prompt TEXT prints the answer; --input "
        'FILE.jsonl (rows {"prompt": text or messages} or {"messages": [...]}) writes one JSONL '
        "record per row, with the generations and the knobs used, to --output (default stdout).",
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--system", help="system message for --prompt and text prompts")
    parser.add_argument("--input", help="JSONL file of prompts")
    parser.add_argument("--output", help="JSONL file to write (written atomically)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send text prompts as they are, without the chat template",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    add_knob_arguments(parser)
    parser.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    knobs = check_knobs(knobs_from_args(args))
    if bool(args.prompt) == bool(args.input):
        raise ChatSFTError("give --prompt or --input (one of them)", field="prompt")
    if args.batch_size < 1:
        raise ChatSFTError(f"must be >= 1, got {args.batch_size}", field="batch_size")
    rows = [{"prompt": p} for p in args.prompt] if args.prompt else read_prompt_rows(args.input)
    model, tokenizer = load_for_inference(
        args.model, dtype=args.dtype, device=args.device, chat_template_path=args.chat_template
    )
    prompts = [_as_prompt(row, tokenizer, args) for row in rows]
    results = generate(
        model, tokenizer, prompts, batch_size=args.batch_size, progress=bool(args.input), **knobs
    )
    if args.input or args.output:
        records = [_record(row, result, knobs) for row, result in zip(rows, results)]
        write_jsonl(args.output, records)
    else:
        texts = [g.text for r in results for g in r.generations]
        print("\n---\n".join(texts))
    return 0


def read_prompt_rows(path: str) -> list[dict[str, Any]]:
    """Read and check every row before the (slow) model load, so a bad line fails fast."""
    if not os.path.isfile(path):
        raise ChatSFTError("file not found", source=path, field="input")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatSFTError(f"malformed JSON ({err.msg})", source=path, row=lineno) from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise ChatSFTError(
                    'expected an object with "prompt" or "messages"', source=path, row=lineno
                )
            key = "prompt" if "prompt" in row else "messages"
            prompt = check_prompt(row[key], row=lineno, source=path)
            if isinstance(prompt, list) and conversation_prompt(prompt) is None:
                raise ChatSFTError(
                    "nothing comes before the assistant turn", source=path, row=lineno, field=key
                )
            rows.append(row)
    if not rows:
        raise ChatSFTError("no prompts in the file", source=path, field="input")
    return rows


def _as_prompt(row: Mapping[str, Any], tokenizer: Any, args: argparse.Namespace) -> Prompt:
    """Text prompts become a user turn when the tokenizer has a chat template (unless --raw)."""
    prompt = row["prompt"] if "prompt" in row else row["messages"]
    if isinstance(prompt, list):
        return conversation_prompt(prompt) or prompt
    if args.raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": prompt}]


def _record(row: Mapping[str, Any], result: GenerationResult, knobs: dict[str, Any]) -> dict:
    return {
        **row,
        "prompt": result.prompt,
        "generations": [g.to_json() for g in result.generations],
        "knobs": knobs,
    }


def write_jsonl(path: str | None, records: list[dict[str, Any]]) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written file."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        sys.stdout.write(lines)
        return
    write_atomic(path, lines)
