"""SFTConfig: transformers.TrainingArguments plus every SFT field, with TRL's names."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

# The components' own tables: SFTConfig checks against them (it sits above data/ and generation/).
from .data.packing import PACKING_STRATEGIES
from .generation.knobs import check_generation_eval

OVERLONG_POLICIES = ("truncate", "drop", "split", "error")
TRUNCATION_MODES = ("keep_start", "keep_end")
LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(TrainingArguments):
    """Training arguments for supervised fine-tuning.

    Field names follow TRL's `SFTConfig`, so a TRL script keeps working after changing its import.
    """

    # --- model -----------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | str | None = field(
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
    column_map: dict[str, str] | str | None = field(
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
    dataset_kwargs: dict[str, Any] | str | None = field(
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
    max_length: int | str | None = field(
        default=1024,
        metadata={"help": "Longest tokenized example (or packed row). None: no limit."},
    )
    max_len: int | str | None = field(
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
    generation_eval: dict[str, Any] | str | None = field(
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

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "`chatsft train`: replace another run's checkpoints and model in output_dir "
            "(without it, such a folder is refused; --resume continues it instead)."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (autocast; the weights stay float32). Unset: on, as in "
            "TRL, when fp16 is off and a GPU with bf16 is present; off on CPU, where bf16 "
            "autocast is slow on most processors."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "`chatsft train`: continue from this checkpoint folder, or from the newest "
            "checkpoint in output_dir with `--resume` (no value) / `latest`, or the newest "
            "undamaged one with `latest_valid`.",
            "aliases": ["--resume"],
            "nargs": "?",
            "const": "latest",
        },
    )

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles its arguments into every checkpoint (training_args.bin): tokens and
        # secrets stay out of them.
        state = dict(self.__dict__)
        for name in state:
            if name.endswith(("_token", "_secret", "_password")) and name not in (
                "eos_token",
                "pad_token",
            ):
                state[name] = None
        return state

    def __post_init__(self) -> None:
        if self.bf16 is None:  # TRL's default (bf16 unless fp16), where the hardware has bf16
            self.bf16 = not self.fp16 and not self.use_cpu and bf16_accelerator()
        if self.max_len is not None:
            self.max_length = self.max_len
        if self.truncate_longer_inputs is not None:
            self.overlong_policy = "truncate" if self.truncate_longer_inputs else "drop"
        self.max_length = _optional_int("max_length", self.max_length)
        for name in DICT_FIELDS:
            setattr(self, name, _mapping(name, getattr(self, name)))
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
        if self.loss_type == "chunked_nll":  # TRL 1.16's deprecated alias; chatsft's nll is chunked
            warnings.warn(
                "`loss_type='chunked_nll'` is deprecated: use `loss_type='nll'` (the same loss)",
                FutureWarning,
                stacklevel=2,
            )
            self.loss_type = "nll"
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
            self.generation_eval = check_generation_eval(self.generation_eval)
        _check_ranges(self)
        _check_report_to(self.report_to)
        super().__post_init__()


# Fields holding a mapping; on the command line (and in YAML as a string) they are JSON or YAML
# flow text, e.g. --model_init_kwargs '{"dtype": "bfloat16"}'.
DICT_FIELDS = ("model_init_kwargs", "dataset_kwargs", "column_map", "generation_eval")


def _optional_int(name: str, value: Any) -> int | None:
    """An int, or None from None / "none" / "null" (`--max_length None` on the command line)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}") from None


def _mapping(name: str, value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        if parsed is None or isinstance(parsed, dict):
            return parsed
    raise ValueError(f'{name} must be a mapping, e.g. {{"dtype": "bfloat16"}}, got {value!r}')


# (field, lowest allowed value, why): checked before anything is loaded, so a typo fails in a line
# instead of training zero steps or failing an hour in.
MINIMUMS = (
    ("per_device_train_batch_size", 1, "rows per device and step"),
    ("per_device_eval_batch_size", 1, "rows per device and eval step"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step"),
    ("learning_rate", 0, "the step size"),
    ("num_train_epochs", 0, "passes over the data"),
    ("warmup_steps", 0, "steps"),
    ("weight_decay", 0, "the decay rate"),
    ("max_nonfinite_batches", 0, "skipped steps"),
    ("seed", 0, "the random seed"),
    ("max_grad_norm", 0, "the clipping norm; 0 turns clipping off"),
    ("label_smoothing_factor", 0, "the smoothing share"),
    ("neftune_noise_alpha", 0, "the embedding noise scale"),
)


def _check_ranges(config: SFTConfig) -> None:
    for name, low, what in MINIMUMS:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number ({what}), got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low} ({what}), got {value}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(
            f"max_steps must be a positive number of optimizer steps, or -1 to train "
            f"num_train_epochs, got {config.max_steps}"
        )
    if config.label_smoothing_factor >= 1:
        raise ValueError(
            f"label_smoothing_factor must be below 1, got {config.label_smoothing_factor}"
        )
    for name in ("save_steps", "eval_steps", "logging_steps"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0 (a number of steps, or a fraction of the run)")
    if config.max_steps == -1 and config.num_train_epochs == 0:
        raise ValueError("num_train_epochs is 0 and max_steps is not set: nothing would train")


@dataclass
class ScriptArguments:
    """Where the data comes from, with the names of TRL's `trl sft` ScriptArguments."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local JSON/JSONL/CSV/Parquet file or folder, or a hub dataset id "
            "('name:config' also selects a config).",
            "aliases": ["--dataset"],
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "The hub dataset's configuration (subset) name."}
    )
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "Split to train on.", "aliases": ["--dataset_split", "--dataset-split"]},
    )
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate on, used when eval_strategy is not 'no' (as in `trl sft`) "
            "or when eval_split is given.",
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Evaluate on this split of the dataset (sets dataset_test_split)."},
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "A separate file, folder or hub id to evaluate on (its 'train' split)."},
    )
    eval_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction of the training rows for evaluation (0 to 1).",
            "aliases": ["--test_split_size", "--test-split-size"],  # TRL's name
        },
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "Read rows lazily as training consumes them (needs max_steps).",
            "aliases": ["--streaming"],
        },
    )

    ignore_bias_buffers: bool = field(
        default=False,
        metadata={
            "help": "Accepted so `trl sft` configs run; it has no effect (TRL's SFT script does "
            "not use it either)."
        },
    )

    def __post_init__(self) -> None:
        if self.eval_split is not None:
            self.dataset_test_split = self.eval_split
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")

    @property
    def evaluates(self) -> bool:
        """An eval source was named explicitly (eval_strategy can also ask for the test split)."""
        return bool(self.eval_split or self.eval_dataset or self.eval_fraction)


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The model and its adapters, with the names of TRL's ModelConfig."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A local model folder, a hub id, or a .gguf file (or a folder holding one).",
            "aliases": ["--model"],
        },
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype: float32 (default, as TRL), bfloat16, float16, or auto (the "
            "dtype the model was saved in).",
            "choices": [*DTYPES, None],
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation, e.g. sdpa, eager, flash_attention_2."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt, or all-linear (default: every linear layer but the "
            "output head; TRL's default is peft's per-architecture list)."
        },
    )
    lora_target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Parameter names to adapt (e.g. MoE expert weights)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full next to the adapter."}
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "peft task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(
        default=False, metadata={"help": "8-bit base weights (bitsandbytes, CUDA; LoRA only)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "4-bit base weights, QLoRA (bitsandbytes, CUDA; LoRA only)."},
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit quantization type.", "choices": ["fp4", "nf4"]}
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants too."}
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={"help": "dtype the 4-bit weights are stored in (e.g. bfloat16 for FSDP)."},
    )

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: set one")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("quantized base weights cannot be trained directly: add use_peft")


# report_to names → (importable module names, the pip command that brings one).
REPORTERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'chatsft[tensorboard]'"),
    "wandb": (("wandb",), "pip install 'chatsft[wandb]'"),
    "trackio": (("trackio",), "pip install 'chatsft[trackio]'"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "neptune": (("neptune",), "pip install neptune"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
}


def _check_report_to(report_to: Any) -> None:
    """A tracker that is not installed fails here, in one line, not after the model has loaded."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all", None):
            continue
        modules, install = REPORTERS.get(name, ((name,), f"pip install {name}"))
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ValueError(f"report_to names {name}, which is not installed: {install}")


def bf16_accelerator() -> bool:
    """A CUDA device with bf16 (Ampere or newer)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
