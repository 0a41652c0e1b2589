"""Sample generations during evaluation: SFTConfig.generation_eval → GenerationEvalCallback."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from ..data.encode import encode, prompt_of
from ..data.formats import Conversation, Text, apply_formatting_func, detect_format, normalize
from ..errors import ChatSFTError
from ..log import logger
from .generate import GenerationResult, check_prompt, generate, model_context
from .knobs import Prompt, check_generation_eval, check_knobs, fit_lengths

GENERATIONS_FILE = "generations.jsonl"


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
        # generate() gets the knobs as given: it tells a max_new_tokens someone set (checked
        # against the model's context) from the default (fitted to it).
        self._given = {k: v for k, v in knobs.items() if v is not None}
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self._last_step: int | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        # The knobs meet the prompts and the model here, so a max_length shorter than a prompt or
        # a max_new_tokens past the model's context fails before the first step, not at the
        # first evaluation hours later.
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if model is not None and tokenizer is not None:
            self.check(model, tokenizer)

    def check(self, model: Any, tokenizer: Any) -> None:
        """Check the knobs against the prompts and the model, as generate() does first."""
        examples = [Text(p) if isinstance(p, str) else Conversation(p) for p in self.prompts]
        # Errors name a prompt by its 0-based position, as generate() does; a lone one by none.
        rows = list(range(len(examples))) if len(examples) > 1 else [None]
        encoded = encode(examples, tokenizer, rows=rows, for_generation=True)
        lengths = [len(e.input_ids) for e in encoded]
        set_max = self._given.get("max_new_tokens") is not None
        fit_lengths(self.knobs, lengths, model_context(model), max_new_tokens_set=set_max)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        # A dict of eval sets fires on_evaluate once per set; one set of samples per step is enough.
        if model is None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        # Every rank generates: a sharded (FSDP, ZeRO-3) model needs all ranks in each forward.
        results = generate(
            model, tokenizer, self.prompts, batch_size=self.batch_size, **self._given
        )
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
            logger.info(f"step {state.global_step} sample {i}: {prompt} → {result.text!r}")


def _short(prompt: Prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1].get("content") or ""
    return repr(text if len(text) <= width else text[: width - 1] + "…")


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
        # Plain text has no prompt/answer boundary, so no prompt to ask for here.
        prompt = None if isinstance(example, Text) else prompt_of(example)
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
