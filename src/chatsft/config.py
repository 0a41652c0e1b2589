"""SFTConfig: transformers.TrainingArguments plus every SFT field, with TRL's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .data.packing import PACKING_STRATEGIES

OVERLONG_POLICIES = ("truncate", "drop", "split", "error")
TRUNCATION_MODES = ("keep_start", "keep_end")
LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(TrainingArguments):
    """Training arguments for supervised fine-tuning.

    Field names follow TRL's `SFTConfig`, so a TRL script keeps working after changing its import.
    """

    # --- model -----------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a "
            "hub id or path (e.g. {'dtype': 'bfloat16', 'attn_implementation': 'sdpa'})."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped with a hub model or tokenizer (their own modeling "
            "files). Off by default: only turn it on for repositories you trust."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A .jinja file or a tokenizer folder whose chat template replaces the tokenizer's."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token appended to text and completions, and ending assistant turns. Default: the "
            "tokenizer's eos_token."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Padding token. Default: the tokenizer's pad_token, else its eos_token."},
    )

    # --- data ------------------------------------------------------------------------------------
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding plain text for the `text` format."}
    )
    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": "Force the row format: text | messages | sharegpt | prompt_completion | "
            "query_response | tokenized. Default: detect it from the columns."
        },
    )
    column_map: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Rename columns before format detection, e.g. {'question': 'query', "
            "'answer': 'response'}."
        },
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "query/response rows: a Python format string for the prompt, e.g. "
            "'question: {query} answer: ' (the response follows) or 'query: {query} response: "
            "{response}'. The response and EOS are trained. Without it, query/response rows are "
            "rendered as a one-turn chat with the chat template."
        },
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "TRL compatibility: {'skip_prepare_dataset': True} hands the raw dataset to your "
            "data_collator; other keys are not used (a warning names them)."
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes for tokenizing the dataset. Default: every core (up to 8) for "
            "10,000 rows or more, one process below that."
        },
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized example (or packed row). None: no limit."},
    )
    max_len: int | None = field(
        default=None, metadata={"help": "Alias of max_length; when set it wins."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end survives truncation: keep_start | keep_end."},
    )
    overlong_policy: str = field(
        default="truncate",
        metadata={
            "help": "What to do with examples longer than max_length: truncate | drop | split "
            "(consecutive pieces of max_length) | error. Every dropped, cut or split example is "
            "counted in the preparation summary."
        },
    )
    truncate_longer_inputs: bool | None = field(
        default=None,
        metadata={"help": "False is the same as overlong_policy='drop'; True as 'truncate'."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Prompt/completion rows: train on the completion only. None means yes for "
            "prompt/completion rows."
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Conversations: train only on assistant turns (their end-of-turn token included). "
            "Works with any prefix-preserving chat template, no {% generation %} markers needed."
        },
    )
    last_turn_only: bool = field(
        default=False,
        metadata={
            "help": "Conversations: train only the last assistant turn (earlier turns are context)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several examples into each row of up to max_length tokens (best-fit "
            "decreasing). Documents never attend to each other and positions restart per document."
        },
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "How rows are packed (TRL's names): bfd (best-fit decreasing; an example "
            "longer than max_length follows overlong_policy) | bfd_split (the same, with "
            "overlong_policy split: long examples become several documents) | wrapped (the examples in "
            "order as one stream cut every max_length tokens: no padding at all, but an example "
            "cut at a row end continues in the next row without its beginning; pieces stay "
            "isolated from each other)."
        },
    )
    eval_packing: bool | None = field(
        default=None,
        metadata={"help": "Pack the eval set too. None: the same as packing."},
    )
    shuffle_dataset: bool = field(
        default=False,
        metadata={
            "help": "Shuffle the training rows (with seed) before preparation and packing, so "
            "packed rows mix examples from the whole set. Batches are shuffled every epoch anyway."
        },
    )
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Concatenate each batch into one row without padding; documents stay isolated "
            "and the loss is the same. None (default): on for transformers models whose attention "
            "separates documents without a dense mask, off otherwise. Implied by packing."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Pad each batch to a multiple of this length (padding-free rows: with a filler "
            "document that trains nothing)."
        },
    )

    # --- evaluation ------------------------------------------------------------------------------
    generation_eval: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Sample generations at each evaluation: {'prompts': [...]} or {'num_prompts': "
            "4} (the first prompts of the eval set), plus decoding knobs such as max_new_tokens, "
            "temperature, top_p, num_beams. Samples are printed and appended to "
            "<output_dir>/generations.jsonl."
        },
    )

    # --- training --------------------------------------------------------------------------------
    learning_rate: float = field(
        default=2e-5, metadata={"help": "Peak learning rate for AdamW (TRL's SFT default)."}
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every N optimizer steps (or a fraction of the run)."}
    )
    report_to: None | str | list[str] = field(
        default="none",
        metadata={
            "help": "Where to report metrics (e.g. 'wandb', 'tensorboard'); 'none' by default."
        },
    )

    training_report: bool = field(
        default=True,
        metadata={
            "help": "At the end of training, write loss.png, learning_rate.png, "
            "tokens_per_second.png, trained_tokens.png and report.html (final metrics, resolved "
            "config) into output_dir. Images need matplotlib: pip install 'chatsft[report]'."
        },
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "nll: cross-entropy of the trained tokens. dft (Dynamic Fine-Tuning, "
            "arXiv 2508.05629): each token's cross-entropy weighted by the model's (detached) "
            "probability of it."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Mixture-of-Experts models: weight of the router's load-balancing loss, added "
            "to the training loss (averaged over gradient-accumulation micro-batches). None: the "
            "model config's router_aux_loss_coef; 0 turns it off."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Not offered by chatsft (TRL's field, accepted only as false)."},
    )
    max_nonfinite_batches: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps with a NaN or inf loss or gradient norm to skip (their update "
            "is not applied; they are listed in the log) before the run stops. 0: stop at the "
            "first, naming the step. Found on the device and read when the trainer logs."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' host-side NaN filter for the logged loss (one host sync per "
            "micro-batch). Off: chatsft already leaves skipped steps out of the logged loss."
        },
    )

    def __post_init__(self) -> None:
        if self.max_len is not None:
            self.max_length = self.max_len
        if self.truncate_longer_inputs is not None:
            self.overlong_policy = "truncate" if self.truncate_longer_inputs else "drop"
        if isinstance(self.max_length, str):  # `--max_length None` on the command line
            if self.max_length.strip().lower() not in ("none", "null"):
                raise ValueError(
                    f"max_length must be a positive integer or None, got {self.max_length!r}"
                )
            self.max_length = None
        if str(self.per_device_train_batch_size).lower() == "auto":
            raise ValueError(
                "per_device_train_batch_size: auto is worked out by `chatsft estimate CONFIG "
                "--memory 24GiB` (it reads the same file); training needs a number: put the "
                "per_device_train_batch_size and gradient_accumulation_steps it prints in the config"
            )
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(
                f"packing_strategy must be one of {PACKING_STRATEGIES}, got "
                f"{self.packing_strategy!r}"
            )
        if self.packing_strategy in ("bfd_split", "wrapped"):
            # Both cut long examples instead of truncating them (wrapped cuts at row ends).
            if self.overlong_policy not in ("truncate", "split"):
                raise ValueError(
                    f"packing_strategy {self.packing_strategy} cuts long examples, but "
                    f"overlong_policy is {self.overlong_policy!r}: leave one of them out"
                )
            self.overlong_policy = "split"
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.activation_offloading:
            raise ValueError(
                "activation_offloading is not offered by chatsft: to save activation memory use "
                "gradient_checkpointing (activation_checkpointing_kwargs: {every_n_layers: N} "
                "checkpoints only some layers)"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"max_length must be a positive integer or None, got {self.max_length}"
            )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}"
            )
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(
                f"overlong_policy must be one of {OVERLONG_POLICIES}, got {self.overlong_policy!r}"
            )
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("packing needs max_length: set max_length to the packed row length")
        if self.generation_eval is not None:
            from .generate import check_generation_eval

            self.generation_eval = check_generation_eval(self.generation_eval)
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        super().__post_init__()
