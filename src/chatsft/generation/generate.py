"""Generation: batched `model.generate` over checked knobs and prompts, the results, and loading a
model folder (or LoRA adapter folder) for inference.

Decoding itself is transformers' (`GenerationConfig` + `model.generate`); this module renders
prompts with the same chat-template code the trainer used, checks the knobs against the prompts and
the model, pads on the left, and cuts the decoded text at the end of turn or a stop string.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from ..data.encode import encode_prompt
from ..data.formats import check_messages
from ..errors import ChatSFTError
from ..files import safetensors_problem
from ..model.load import (
    check_model_ref,
    has_tokenizer,
    load_model,
    load_tokenizer,
    read_chat_template,
)
from ..model.peft_setup import adapter_base
from .knobs import Prompt, check_dtype, check_knobs, fit_lengths

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


def conversation_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A conversation ending in an assistant turn asks for that turn again: the prompt is what
    comes before it (None if nothing does)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1] or None
    return messages


def prompt_ids(tokenizer: Any, prompt: Prompt, row: int | None = None) -> list[int]:
    """What the model continues: encoded exactly as training encodes it (data.encode)."""
    if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        raise ChatSFTError(
            "the tokenizer has no chat template, so chat prompts cannot be rendered",
            field="chat_template",
            hint="pass a plain-text prompt, or give a chat template (--chat_template)",
        )
    return encode_prompt(tokenizer, prompt, row)


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


def model_context(model: torch.nn.Module) -> int | None:
    """The most positions the model was built for (None where its config names no limit)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # multimodal configs keep it on the text model
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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


class ReplyStreamer(TextStreamer):
    """Writes a reply to `out` while it is generated.

    transformers' TextStreamer decodes the new tokens and releases text a word at a time; on top of
    that, text that could be the start of a stop string is held back until it is clear, so what is
    printed ends exactly where `generate` cuts the returned text. One prompt, one sequence.
    """

    def __init__(self, tokenizer: Any, out: TextIO, stop_strings: Sequence[str] = ()) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.stops = out, [s for s in stop_strings if s]
        self.text = ""  # everything written so far
        self._pending = ""
        self._stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self._stopped:
            return
        self._pending += text
        cuts = [self._pending.find(s) for s in self.stops if s in self._pending]
        if cuts:
            self._write(self._pending[: min(cuts)])
            self._pending, self._stopped = "", True
            return
        keep = 0 if stream_end else self._held_back()
        self._write(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that a stop string starts with."""
        longest = max((len(s) for s in self.stops), default=0)
        for n in range(min(len(self._pending), longest - 1), 0, -1):
            if any(s.startswith(self._pending[-n:]) for s in self.stops):
                return n
        return 0

    def _write(self, text: str) -> None:
        if text:
            self.text += text
            self.out.write(text)
            self.out.flush()


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    progress: bool = False,
    streamer: Any | None = None,
    **knobs: Any,
) -> list[GenerationResult]:
    """Generate for each prompt (a string, or a list of chat messages), `batch_size` at a time.

    Knobs are `KNOBS` (max_new_tokens, temperature, top_p, num_beams, stop_strings, seed, ...); an
    unknown or out-of-range knob, or one the prompt and the model's context leave no room for,
    raises ChatSFTError naming it. Nothing is generated before every check has passed.
    `streamer` (e.g. a ReplyStreamer) receives the tokens as they come: one prompt, one sequence.
    """
    max_new_tokens_set = knobs.get("max_new_tokens") is not None
    knobs = check_knobs(knobs)
    prompts = [check_prompt(p, row=i) for i, p in enumerate(prompts)]
    if batch_size < 1:
        raise ChatSFTError(f"must be >= 1, got {batch_size}", field="batch_size")
    if streamer is not None and (
        len(prompts) != 1
        or knobs.get("num_beams", 1) > 1
        or knobs.get("num_return_sequences", 1) > 1
    ):
        raise ChatSFTError(
            "streaming needs one prompt, one sequence and no beam search", field="streamer"
        )
    row = (lambda i: i) if len(prompts) > 1 else (lambda i: None)
    ids = [prompt_ids(tokenizer, p, row(i)) for i, p in enumerate(prompts)]
    lengths = [len(x) for x in ids]
    knobs = fit_lengths(knobs, lengths, model_context(model), max_new_tokens_set=max_new_tokens_set)
    config, stops = generation_config(model, tokenizer, knobs)
    device = next(model.parameters()).device
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch", file=sys.stderr)
    results: list[GenerationResult] = []
    with inference_mode(model, tokenizer), seeded(knobs.get("seed"), device), torch.no_grad():
        for i in starts:
            batch = (prompts[i : i + batch_size], ids[i : i + batch_size])
            results += _generate_batch(model, tokenizer, *batch, config, stops, device, streamer)
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
    ids: list[list[int]],
    config: GenerationConfig,
    stops: list[str],
    device: torch.device,
    streamer: Any | None = None,
) -> list[GenerationResult]:
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
    prompt_length = enc["input_ids"].shape[1]
    extra: dict[str, Any] = {} if streamer is None else {"streamer": streamer}
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


def check_device(device: str | None) -> str:
    """The device to generate on: the given one once it is known to exist here, else cuda when a
    GPU is there, else cpu. Checked before the (slow) model load."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    hint = "use cpu, cuda or cuda:N (or leave it out: cuda when there is a GPU, else cpu)"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChatSFTError(f"unknown device {device!r}", field="device", hint=hint) from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.xpu, ...
        if not hasattr(backend, "is_available"):
            raise ChatSFTError(f"cannot generate on {device!r}", field="device", hint=hint)
        available = backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        raise ChatSFTError(
            f"{device!r} was asked for, but this machine has no {parsed.type} device "
            "(or torch was built without its support)",
            field="device",
            hint=hint,
        )
    if parsed.index is not None and parsed.index >= count:
        raise ChatSFTError(
            f"{device!r} was asked for, but there are {count} {parsed.type} device(s), "
            f"numbered from 0",
            field="device",
            hint=hint,
        )
    return device


def load_for_inference(
    path: str,
    *,
    dtype: str | None = None,
    device: str | None = None,
    chat_template_path: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A full model folder (or hub id), or a LoRA adapter folder on top of its base model.

    Everything that can be checked without loading (dtype, device, the tokenizer's files, weight
    files cut short by an interrupted copy) is checked first, each failure one ChatSFTError."""
    check_dtype(dtype)
    device = check_device(device)
    adapter_file = os.path.join(path, "adapter_config.json")
    adapter = os.path.isfile(adapter_file)
    base = adapter_base(os.path.dirname(adapter_file)) if adapter else path
    check_model_ref(base)
    tok_source = path if has_tokenizer(path) or not os.path.isdir(path) else base
    if os.path.isdir(tok_source) and not has_tokenizer(tok_source):
        raise ChatSFTError(
            "the folder has no tokenizer (tokenizer.json, tokenizer_config.json or "
            "tokenizer.model)",
            source=tok_source,
            field="tokenizer",
            hint="save the tokenizer beside the model (tokenizer.save_pretrained(folder))",
        )
    for folder in dict.fromkeys((path, base)):
        if os.path.isdir(folder):
            check_weights(folder)
    tokenizer = _load_tokenizer(tok_source)
    tokenizer = load_tokenizer(path, tokenizer)
    if chat_template_path is not None:
        tokenizer.chat_template = read_chat_template(chat_template_path)
    init = {"dtype": dtype} if dtype else None
    from safetensors import SafetensorError

    try:
        model = load_model(base, init)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
    except SafetensorError as err:  # damaged in a way the size check cannot see
        raise ChatSFTError(
            f"the weights could not be read ({_first_line(err)})",
            source=path,
            field="weights",
            hint="copy or download the model again",
        ) from None
    return model.to(device).eval(), tokenizer


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # missing files, or files it cannot build a tokenizer of
        raise ChatSFTError(
            f"could not load the tokenizer: {_first_line(err)}", source=source, field="tokenizer"
        ) from None


def _first_line(err: BaseException) -> str:
    """Library errors can run over several lines; a ChatSFTError is one."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), repr(err))


def check_weights(folder: str) -> None:
    """Refuse, in one line and before a slow load, weight files that an interrupted copy or
    download left short: safetensors files whose header describes more bytes than the file has,
    zip-format torch files without their directory, and shards an index names but lacks."""
    hint = "copy or download the model again"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ChatSFTError(
                    "not a readable shard index", source=index, field="weights", hint=hint
                ) from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise ChatSFTError(
                    f"{len(missing)} weight file(s) it names are missing, e.g. {missing[0]}",
                    source=index,
                    field="weights",
                    hint=hint,
                )
    for name in sorted(os.listdir(folder)):
        file = os.path.join(folder, name)
        problem = None
        if name.endswith(".safetensors") and os.path.isfile(file):
            problem = safetensors_problem(file)
        elif name.endswith(".bin") and os.path.isfile(file):
            with open(file, "rb") as f:
                # torch.save writes zip files; one that starts like a zip but has no central
                # directory was cut short (older pickle-format files are left to torch).
                if f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(file):
                    problem = "the zip directory at its end is missing"
        if problem:
            raise ChatSFTError(
                f"the weights file is truncated or damaged: {problem}",
                source=file,
                field="weights",
                hint=hint,
            )
