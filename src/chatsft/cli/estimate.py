"""`chatsft estimate [CONFIG.yaml] [--config FILE] [--field value ...]`: the peak memory and the
checkpoint sizes of the run `chatsft train` would start from the same settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig, SFTConfig
from ..errors import ChatSFTError
from .parser import CommandParser, parse, read_yaml, split_config

DESCRIPTION = (
    "Predict per-device peak memory and checkpoint sizes from the model config alone (no weights "
    "are loaded). Reads the same YAML and flags as `chatsft train` (max_length, "
    "per_device_train_batch_size, gradient_accumulation_steps, packing, optim, bf16/fp16, "
    "gradient_checkpointing and activation_checkpointing_kwargs, save_total_limit, "
    "save_only_model, model_init_kwargs/dtype, use_peft and lora_*); flags override the file. "
    "bf16/fp16 are modelled, not checked against this machine. "
    "per_device_train_batch_size auto (in the file or as a flag) picks the largest micro-batch "
    "that fits --memory (default: the free CUDA memory), keeping --effective_batch_size through "
    "gradient accumulation; gradient checkpointing is turned on only if no micro-batch fits "
    "without it, unless the config sets gradient_checkpointing: true or "
    "--no_gradient_checkpointing is given. Older spellings still work: --batch-size "
    "(per_device_train_batch_size), --optimizer (optim), --lora-r 0 (no LoRA: a full "
    "fine-tune), --lora-target-modules a,b (names separated by commas)."
)

# Older `chatsft estimate` flags whose settings have another name now (old → new).
RENAMED = {"batch_size": "per_device_train_batch_size", "optimizer": "optim"}
BATCH = "per_device_train_batch_size"


@dataclass
class EstimateArguments:
    """Settings of the estimate itself: they describe the machine, not the training run."""

    memory: str | None = field(
        default=None,
        metadata={
            "help": "Memory budget per device, e.g. 24GiB (binary), 80GB (decimal) or 16000MiB. "
            "With per_device_train_batch_size auto: the budget to fit (default: the free CUDA "
            "memory); otherwise the table says whether the run fits."
        },
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "With per_device_train_batch_size auto: rows per optimizer step over all "
            "devices, kept through gradient accumulation (default: 8 per device)."
        },
    )
    world_size: int = field(
        default=1, metadata={"help": "Data-parallel devices (DDP: each holds a full replica)."}
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Where the run trains: cuda or cpu (default: cpu with use_cpu, else CUDA if "
            "this machine has it).",
            "choices": ["cuda", "cpu", None],
        },
    )
    every_n_layers: int | None = field(
        default=None,
        metadata={
            "help": "With gradient checkpointing, checkpoint only every N-th decoder layer "
            "(overrides activation_checkpointing_kwargs: {every_n_layers: N})."
        },
    )
    json: bool = field(default=False, metadata={"help": "Print machine-readable JSON."})


def build_parser() -> CommandParser:
    # Every dataclass `chatsft train` parses, so a file train reads is read here too; the keys
    # that only matter to training (dataset_name, torch_num_threads, ...) are accepted and unused.
    from .train import build_parser as train_parser

    return CommandParser(
        (*train_parser().dataclass_types, EstimateArguments),
        prog="chatsft estimate",
        description=DESCRIPTION,
    )


@dataclass
class Request:
    """The command line with what the dataclasses cannot hold taken out of it."""

    argv: list[str]
    fit: bool = False  # per_device_train_batch_size auto: fit the batch to the memory
    no_gradient_checkpointing: bool = False  # fixed off while fitting (--no_gradient_checkpointing)
    full_fine_tune: bool = False  # --lora-r 0


def _option(arg: str) -> tuple[str | None, str | None]:
    """'--max-length=64' → ('max_length', '64'); '--bf16' → ('bf16', None); else (None, None)."""
    if not arg.startswith("--"):
        return None, None
    name, eq, value = arg[2:].partition("=")
    return name.replace("-", "_"), value if eq else None


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def prepare_argv(argv: list[str]) -> Request:
    """Take `per_device_train_batch_size auto` (SFTConfig's int field cannot hold it), the older
    spellings and `--lora-r 0` out of the command line before the parser sees it."""
    request = Request([])
    out = request.argv
    batch_given = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, value = _option(arg)
        i += 1
        if name == "no_gradient_checkpointing":
            # transformers' newer name wins over gradient_checkpointing, so this beats either one.
            out += ["--activation_checkpointing", "false"]
            request.no_gradient_checkpointing = True
            continue
        if name in RENAMED:
            name = RENAMED[name]
            arg = f"--{name}" + (f"={value}" if value is not None else "")
        if name in (BATCH, "lora_r"):
            if value is None and i < len(argv):
                value = argv[i]
                i += 1
                arg_list = [arg, value]
            else:
                arg_list = [arg]
            if name == BATCH and _is_auto(value):
                request.fit = True
                continue
            if name == "lora_r" and value is not None and value.strip() == "0":
                request.full_fine_tune = True
                continue
            batch_given = batch_given or name == BATCH
            out += arg_list
            continue
        out.append(arg)
    path, _ = split_config(argv, positional=True)
    values = read_yaml(path) if path else {}
    in_file = next((v for k, v in values.items() if k.replace("-", "_") == BATCH), None)
    if _is_auto(in_file) and not batch_given:
        request.fit = True
        out += [f"--{BATCH}", "1"]  # stands in for the file's "auto"; the fit decides the batch
    return request


def split_names(modules: list[str] | None) -> list[str] | None:
    """`--lora-target-modules q_proj,v_proj` (the older spelling) → ['q_proj', 'v_proj']: module
    names never hold commas."""
    if modules is None:
        return None
    return [name for item in modules for name in item.split(",") if name]


def run(argv: list[str]) -> int:
    request = prepare_argv(argv)
    parsed = parse(build_parser(), request.argv, training=False)
    by_type = {type(value): value for value in parsed.values}
    sft: SFTConfig = by_type[SFTConfig]
    model_args: ModelConfig = by_type[ModelConfig]
    opts: EstimateArguments = by_type[EstimateArguments]
    if not model_args.model_name_or_path:
        raise ChatSFTError(
            "is required",
            source=parsed.source,
            field="model_name_or_path",
            hint="add model_name_or_path: ... to the config or --model ...",
        )
    if sft.max_length is None:
        raise ChatSFTError(
            "is None, but the estimate sizes every row at max_length tokens",
            source=parsed.source,
            field="max_length",
            hint="set the longest row the run will see, e.g. --max_length 2048",
        )
    if opts.effective_batch_size is not None and not request.fit:
        raise ChatSFTError(
            "only applies when the batch is fitted",
            field="effective_batch_size",
            hint="add --per_device_train_batch_size auto (and --memory 24GiB)",
        )
    from ..estimate import estimate, fit_batch, parse_memory
    from ..estimate.format import human, to_json, wrap

    budget = parse_memory(opts.memory) if opts.memory is not None else None  # fail before work
    kwargs = settings_of(sft, model_args, opts, request, parsed.mixed_precision)
    notes = notes_of(model_args, parsed.record)
    if request.fit:
        # A file's `gradient_checkpointing: false` is usually just the default: only true, or
        # --no_gradient_checkpointing, fixes it; otherwise the fit turns it on where it must.
        gc = kwargs.pop("gradient_checkpointing")
        fixed = True if gc else False if request.no_gradient_checkpointing else None
        kwargs.pop("batch_size")
        kwargs.pop("gradient_accumulation_steps")
        result = fit_batch(
            model_args.model_name_or_path,
            memory=budget,
            effective_batch_size=opts.effective_batch_size or 8 * opts.world_size,
            gradient_checkpointing=fixed,
            **kwargs,
        )
        result.estimate.warnings += notes
        if opts.json:
            print(to_json(result))
            return 0
        print(result.estimate.table())
        print(
            f"\nfit: per_device_train_batch_size={result.batch_size} "
            f"gradient_accumulation_steps={result.gradient_accumulation_steps} "
            f"gradient_checkpointing={str(result.gradient_checkpointing).lower()}"
        )
        print(wrap("  because " + result.reason, indent="  "))
        return 0
    est = estimate(model_args.model_name_or_path, **kwargs)
    est.warnings += notes
    if opts.json:
        print(to_json(est))
        return 0
    print(est.table())
    if budget is not None:
        verdict = "fits" if est.peak_bytes <= budget else "does NOT fit"
        print(
            f"\n  {human(est.peak_bytes)} {verdict} in {human(budget)} "
            "(--per_device_train_batch_size auto picks a batch that fits)"
        )
    return 0


def settings_of(
    sft: SFTConfig,
    model_args: ModelConfig,
    opts: EstimateArguments,
    request: Request,
    mixed_precision: dict[str, bool],
) -> dict[str, Any]:
    """estimate()'s keyword arguments for the run `chatsft train` builds from these settings."""
    from .build import model_init_kwargs, peft_config

    if request.full_fine_tune:
        model_args.use_peft = False
    model_args.lora_target_modules = split_names(model_args.lora_target_modules)
    # train's from_pretrained arguments (model_init_kwargs win over dtype), without the
    # quantization config: building it needs CUDA and bitsandbytes, and the estimate does not
    # model quantized weights (a note says so).
    unquantized = dataclasses.replace(model_args, load_in_4bit=False, load_in_8bit=False)
    init = model_init_kwargs(unquantized, sft) or {}
    ckpt_kwargs = sft.activation_checkpointing_kwargs
    every_n = opts.every_n_layers
    if every_n is None and isinstance(ckpt_kwargs, dict):
        every_n = ckpt_kwargs.get("every_n_layers")
    return {
        "max_length": sft.max_length,
        "batch_size": sft.per_device_train_batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps,
        "packing": sft.packing,
        # None: float32, as the trainer loads weights when nothing names a dtype
        "dtype": init.get("dtype", init.get("torch_dtype")),
        "bf16": mixed_precision.get("bf16", False),
        "fp16": mixed_precision.get("fp16", False),
        "optimizer": getattr(sft.optim, "value", sft.optim),  # an OptimizerNames member
        "gradient_checkpointing": bool(sft.activation_checkpointing),
        "every_n_layers": 1 if every_n is None else every_n,
        "peft_config": peft_config(model_args),  # exactly the LoraConfig train builds
        "save_total_limit": sft.save_total_limit,
        "save_only_model": sft.save_only_model,
        "world_size": opts.world_size,
        "learning_rate": sft.learning_rate,
        "weight_decay": sft.weight_decay,
        "device": opts.device or ("cpu" if sft.use_cpu else None),
    }


def notes_of(model_args: ModelConfig, record: dict[str, Any]) -> list[str]:
    """Settings the estimate reads differently from what a reader might expect."""
    notes = []
    if "lora_r" in record and not model_args.use_peft:
        notes.append(
            "lora_r is set but use_peft is not: this is the full fine-tune `chatsft train` "
            "would run (add use_peft: true for LoRA)"
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        notes.append(
            "quantized base weights (load_in_4bit/load_in_8bit) are not modelled: the base "
            "weights are counted at the dtype above"
        )
    return notes
