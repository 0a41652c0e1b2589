"""Predict peak training memory and checkpoint sizes from a model config, without loading weights.

Parameter counts come from the real model class built on `torch.device("meta")` (exact, tied
embeddings and LoRA adapters included). Optimizer state comes from running one real optimizer step
on fake tensors, then laying out its pickle and zip container the way `torch.save` does, so the
predicted `optimizer.pt` is the size the Trainer writes, to the byte (checked by the tests).
Activations use a per-token, per-layer count of the tensors autograd saves in a Llama/Qwen-style
decoder layer (attention + gated MLP + two RMSNorms), written out in `_layer_bytes_per_token`, plus
the chunked loss's buffers, and are checked against measured memory by
`bench/estimate_vs_measured.py`.

    est = estimate("Qwen/Qwen2.5-0.5B-Instruct", max_length=2048, batch_size=8, bf16=True)
    print(est.table())
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ChatSFTError
from .model.load import TRAINING_DTYPE

GiB = 2**30
# chatsft's chunked loss projects CHUNK_ELEMENTS fp32 logits at a time (model/loss.py).
CHUNK_ELEMENTS = 128 * 2**20
# Default AdamW in transformers 5 is the fused torch kernel; these are the optimizers we model.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
OPTIMIZERS = TORCH_OPTIMIZERS + EIGHT_BIT_OPTIMIZERS
# bitsandbytes 8-bit optimizers: block-wise quantisation with one fp32 absmax per 256 values, and
# tensors under 4096 elements stay in fp32 (bnb's min_8bit_size).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
# transformers' save_pretrained default max_shard_size ("50GB", decimal).
MAX_SHARD_BYTES = 50 * 10**9
# Measured on transformers 5.24 checkpoints (tiny model, CPU); they barely depend on the model.
SMALL_FILES = {
    "scheduler.pt": 1_465,
    "rng_state.pth": 14_455,
    "trainer_state.json": 1_000,  # grows by ~0.3 KB per logged step (log_history)
    "training_args.bin": 5_700,
    "training_config.yaml": 3_300,  # chatsft's resolved config
    "generation_config.json": 200,
    "scaler.pt": 1_400,
    "adapter_config.json": 1_000,
    "README.md": 5_100,  # peft's model card beside an adapter
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Modules of a Llama/Qwen/Mistral decoder layer, by the role they play in the activation formula.
ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")

# Backward working set on top of the saved activations, per token of the layer being
# differentiated: the incoming gradient of the residual stream and the gradients flowing through
# the MLP (grad of the product, of the activation and of `up`, of `gate`) are alive together.
# Counted from the autograd graph; in the benchmark configs the peak falls elsewhere (the loss),
# so these two numbers are not calibrated by measurement.
BWD_INTERMEDIATE_TENSORS = 2
BWD_HIDDEN_TENSORS = 2


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointFile:
    name: str
    bytes: int
    exact: bool  # False: a typical size, not computed for this model


@dataclass
class Estimate:
    """Everything `estimate` predicts. Memory figures are bytes per device."""

    model: str
    settings: dict[str, Any]
    total_params: int
    trainable_params: int
    weight_dtype: str
    # weights, gradients, optimizer_state, optimizer_step_temporaries, autocast_weight_copies,
    # ddp_gradient_buckets, activations, backward_working_set, loss_buffers
    memory: dict[str, int]
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    peak_bytes: int
    peak_phase: str  # when the peak happens: "forward/backward" or "optimizer step"
    checkpoint_files: list[CheckpointFile]
    checkpoint_bytes: int  # one checkpoint-N folder
    checkpoints_kept: int | None  # save_total_limit; None = every checkpoint stays
    final_model_bytes: int  # what save_model writes to output_dir at the end
    total_disk_bytes: int | None  # kept checkpoints + final model; None when unbounded
    note: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        return format_estimate(self)


@dataclass
class FitResult:
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    memory_budget: int
    usable_bytes: int
    estimate: Estimate
    reason: str
    tried: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Model on the meta device
# --------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    eager_attention: bool
    logit_transform: bool


@dataclass
class _Model:
    """What the estimator needs from the model, measured once (the batch search reuses it)."""

    name: str
    folder: str | None
    config: Any
    shape: _Shape
    weight_dtype: torch.dtype
    total_params: int
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    linear_weight_params: int  # decoder-layer Linear weights (cast to half under autocast)
    lm_head_params: int
    lm_head_trainable: bool
    saved_tensors: list[tuple[str, tuple[int, ...], torch.dtype]]  # what save_pretrained writes
    is_peft: bool
    layer_kinds: dict[str, str]  # module -> "full" | "lora" | "frozen"
    llama_like: bool  # the first decoder layer has q/k/v/o and gate/up/down projections
    norm_trainable: bool
    lora_r: int
    lora_dropout: float
    device: str  # "cuda" or "cpu": where the run trains (dropout masks, optimizer state location)
    trainable: list[tuple[str, tuple[int, ...], torch.dtype]]


def load_model_config(model: Any) -> tuple[Any, str, str | None]:
    """A folder with config.json, a hub id, or a config → (config, display name, folder)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "_name_or_path", "") or model.model_type, None
    if hasattr(model, "config") and isinstance(model.config, PretrainedConfig):
        return model.config, getattr(model.config, "_name_or_path", "") or "model", None
    if not isinstance(model, (str, os.PathLike)):
        raise ChatSFTError(
            "model must be a folder, a hub id or a transformers config, got "
            f"{type(model).__name__}",
            field="model",
        )
    from .model.load import check_model_ref

    ref = os.fspath(model)
    check_model_ref(ref)  # a missing local path or a folder without config.json: a clear error
    folder = ref if os.path.isdir(ref) else None
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as err:
        raise ChatSFTError(
            f"could not read the model config: {err}",
            source=ref,
            field="model",
            hint="estimate needs only config.json: offline, pass a local folder or a config",
        ) from None
    return config, ref, folder


def _resolve_dtype(dtype: Any, config: Any, folder: str | None) -> torch.dtype:
    """Mirror the trainer's loading: no dtype means float32 (TRL's default for training), "auto"
    the config's dtype (from_pretrained's rule)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = TRAINING_DTYPE
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None and folder is not None:
            found = _safetensors_first_dtype(folder)
        if found is None:
            return torch.float32
        dtype = found
        if isinstance(dtype, torch.dtype):
            return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    name = aliases.get(name, name)
    if name not in ("float32", "bfloat16", "float16"):
        raise ChatSFTError(
            f"unsupported weight dtype {dtype!r}",
            field="dtype",
            hint="float32, bfloat16 or float16",
        )
    return getattr(torch, name)


def _safetensors_first_dtype(folder: str) -> torch.dtype | None:
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] in ("F32", "BF16", "F16"):
            return codes[entry["dtype"]]
    return None


def _shape(config: Any) -> _Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    transforms = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    return _Shape(
        vocab=text.vocab_size,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        logit_transform=any(getattr(text, n, None) not in (None, 1, 1.0) for n in transforms),
    )


def _lora_config(lora: Any, target_modules: Any) -> Any:
    """A rank (chatsft's YAML defaults: alpha 2r, dropout 0.05, all linear layers), a dict of
    LoraConfig fields, or a peft config → a peft config (or None)."""
    if lora is None or lora is False or lora == 0:
        return None
    from peft import LoraConfig, PeftConfig

    from .model.peft_setup import lora_config

    if isinstance(lora, PeftConfig):
        return lora
    if isinstance(lora, int) and not isinstance(lora, bool):
        return lora_config(lora, 2 * lora, 0.05, target_modules or "all-linear")
    if not isinstance(lora, dict):
        raise ChatSFTError(
            f"lora must be a rank, a dict or a peft config, got {lora!r}", field="lora"
        )
    kwargs = dict(lora)
    if target_modules is not None:
        kwargs["target_modules"] = target_modules
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**kwargs)


def _build_model(
    config: Any,
    name: str,
    folder: str | None,
    weight_dtype: torch.dtype,
    peft_config: Any,
    device: str,
) -> _Model:
    from transformers import AutoModelForCausalLM

    # Meta tensors: the real module tree and parameter shapes, no memory, no init cost.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype)
    lora_r = 0
    if peft_config is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, peft_config)
        lora_r = int(getattr(peft_config, "r", 0) or 0)
    params = list(model.named_parameters())  # deduplicated: a tied weight appears once
    total = sum(p.numel() for _, p in params)
    trainable = [(n, tuple(p.shape), p.dtype) for n, p in params if p.requires_grad]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    linear_params = sum(
        m.weight.numel()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and ".lora_" not in n
    )
    kinds, norm_trainable, llama_like = _layer_kinds(base)
    return _Model(
        name=name,
        folder=folder,
        config=config,
        shape=_shape(config),
        weight_dtype=weight_dtype,
        total_params=total,
        trainable_params=sum(math.prod(s) for _, s, _ in trainable),
        weight_bytes=sum(p.numel() * p.element_size() for _, p in params)
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        grad_bytes=sum(math.prod(s) * d.itemsize for _, s, d in trainable),
        linear_weight_params=linear_params,
        lm_head_params=head.weight.numel() if head is not None else 0,
        lm_head_trainable=head is not None and head.weight.requires_grad,
        saved_tensors=_saved_tensors(model, peft_config is not None),
        is_peft=peft_config is not None,
        layer_kinds=kinds,
        llama_like=llama_like,
        norm_trainable=norm_trainable,
        lora_r=lora_r,
        lora_dropout=float(getattr(peft_config, "lora_dropout", 0.0) or 0.0),
        device=device,
        trainable=trainable,
    )


def _layer_kinds(base: torch.nn.Module) -> tuple[dict[str, str], bool, bool]:
    """How each Linear of the first decoder layer trains: 'full', 'lora' (adapter on a frozen
    base) or 'frozen'. Decides which inputs autograd has to keep."""
    layer = None
    for name, module in base.named_modules():
        if re.search(r"layers\.0$", name):
            layer = module
            break
    all_trainable = all(p.requires_grad for p in base.parameters())
    default = "full" if all_trainable else "frozen"
    kinds = dict.fromkeys(ATTN_INPUTS + ("o_proj",) + MLP_INPUTS + ("down_proj",), default)
    norm_trainable = all_trainable
    if layer is None:
        return kinds, norm_trainable, False
    found = set()
    for name, module in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in kinds:
            found.add(short)
            if hasattr(module, "lora_A") and len(module.lora_A):
                kinds[short] = "lora"
            else:
                weight = getattr(module, "weight", None)
                kinds[short] = "full" if weight is not None and weight.requires_grad else "frozen"
        elif short == "input_layernorm":
            norm_trainable = any(p.requires_grad for p in module.parameters())
    return kinds, norm_trainable, found == set(kinds)


def _saved_tensors(
    model: torch.nn.Module, is_peft: bool
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors save_pretrained writes: the adapter only for peft, else the state dict with
    each tied tensor once."""
    if is_peft:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    seen: set[int] = set()
    out = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((key, tuple(tensor.shape), tensor.dtype))
    return out


# --------------------------------------------------------------------------------------------------
# File sizes
# --------------------------------------------------------------------------------------------------


def safetensors_size(tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """Exact size of a .safetensors file holding these tensors: 8-byte length, JSON header padded
    to 8 bytes (entries sorted by dtype size, then name, as safetensors writes them), data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in sorted(tensors, key=lambda t: (-t[2].itemsize, t[0])):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES.get(dtype, "F32"),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text % 8) + offset


def torch_save_size(obj: Any, file_name: str) -> int:
    """Exact size of `torch.save(obj, file_name)` for an object whose tensors may be fake
    (FakeTensorMode): the pickle is built as torch.save builds it, the zip layout (64-byte aligned
    records, data descriptors, zip64 fields past 4 GiB) is laid out as PyTorch's writer does, and
    no tensor bytes are ever produced."""
    storages: dict[int, tuple[str, int]] = {}

    class Pickler(pickle.Pickler):
        # torch.serialization._save's persistent_id: each storage becomes a reference to a zip
        # record. location_tag returns one shared "cpu" string (pickled once, then memoised)
        # but builds "cuda:N" afresh for every storage; the fake device is mapped the same way.
        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, torch.storage.TypedStorage):
                return None
            untyped = obj._untyped_storage
            key, _ = storages.setdefault(untyped._cdata, (str(len(storages)), untyped.nbytes()))
            device = getattr(obj, "_fake_device", None) or untyped.device
            location = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
            storage_type = getattr(torch, obj._pickle_storage_type())
            return ("storage", storage_type, key, location, obj._size())

    buffer = io.BytesIO()
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        Pickler(buffer, protocol=2).dump(obj)  # torch.save's default protocol
    records = [
        ("data.pkl", len(buffer.getvalue())),
        (".format_version", 1),
        (".storage_alignment", 2),
        ("byteorder", 6),
        *((f"data/{key}", nbytes) for key, nbytes in storages.values()),
        ("version", 2),
        (".data/serialization_id", 40),
    ]
    return _zip_size(os.path.splitext(os.path.basename(file_name))[0], records)


def _zip_size(archive: str, records: list[tuple[str, int]], alignment: int = 64) -> int:
    """Length of PyTorch's zip container (caffe2/serialize/inline_container.cc over miniz)."""
    big = 0xFFFFFFFF
    offset = central = 0
    for name, size in records:
        full = len(archive) + 1 + len(name)
        # zip64 extra field: 4-byte header, 16 bytes of sizes and/or 8 of offset past 4 GiB.
        zip64 = 0
        if size >= big or offset >= big:
            zip64 = 4 + (16 if size >= big else 0) + (8 if offset >= big else 0)
        # Local header (30 bytes + name), then an "FB" extra field padding the data to alignment.
        start = offset + 30 + full + zip64 + 4
        data = start + (-start % alignment)
        descriptor = 24 if zip64 else 16  # data descriptor after the data: crc and sizes
        offset = data + size + descriptor
        central += 46 + full + zip64
    # Central directory, then the zip64 end record (56) and locator (20), always written, and
    # the classic end-of-central-directory record (22).
    return offset + central + 56 + 20 + 22


def _torch_optimizer_state(
    model: _Model, optimizer: str, learning_rate: float, weight_decay: float
) -> tuple[int, int | None]:
    """(bytes of optimizer state, bytes of optimizer.pt): one real step of the Trainer's optimizer
    class on fake tensors on the run's device (state tensors and their pickled locations follow
    it), then the exact size of torch.save for that state."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Trainer, TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(
            output_dir="unused", optim=optimizer, learning_rate=learning_rate, report_to="none"
        )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    decay = _decay_names(model)
    device = model.device  # fake CUDA tensors need no GPU
    with FakeTensorMode():
        params = {}
        for name, shape, dtype in model.trainable:
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            p.grad = torch.empty_like(p)
            params[name] = p
        groups = [
            {"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0},
        ]
        opt = cls(groups, **kwargs)
        opt.step()
        state = opt.state_dict()
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in state["state"].values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
    for group in state["param_groups"]:
        group["initial_lr"] = kwargs.get("lr", learning_rate)  # added by the LR scheduler
    try:
        file_bytes: int | None = torch_save_size(state, "optimizer.pt")
    except Exception:  # skip_data and fake tensors are young torch APIs: fall back to arithmetic
        file_bytes = None
    return state_bytes, file_bytes


def _decay_names(model: _Model) -> set[str]:
    # Same rule as Trainer.get_decay_parameter_names: only the param_groups layout depends on it.
    pattern = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    return {n for n, _, _ in model.trainable if not pattern.search(n)}


def _eight_bit_state(model: _Model) -> int:
    total = 0
    for _, shape, _ in model.trainable:
        n = math.prod(shape)
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:  # two uint8 moments, an fp32 absmax per block for each, two 256-entry fp32 maps
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * 4 * 256
    return total


def _folder_file_sizes(folder: str | None, names: tuple[str, ...]) -> dict[str, int]:
    if folder is None:
        return {}
    return {
        n: os.path.getsize(os.path.join(folder, n))
        for n in names
        if os.path.exists(os.path.join(folder, n))
    }


def _model_files(model: _Model) -> list[CheckpointFile]:
    """What save_pretrained (and the tokenizer's save_pretrained) writes."""
    files = []
    if model.is_peft:
        files.append(
            CheckpointFile("adapter_model.safetensors", safetensors_size(model.saved_tensors), True)
        )
        files.append(
            CheckpointFile("adapter_config.json", SMALL_FILES["adapter_config.json"], False)
        )
        files.append(CheckpointFile("README.md", SMALL_FILES["README.md"], False))
    else:
        size = safetensors_size(model.saved_tensors)
        shards = math.ceil(size / MAX_SHARD_BYTES)
        if shards <= 1:
            files.append(CheckpointFile("model.safetensors", size, True))
        else:
            # Each shard has its own header; the index maps every tensor to its shard.
            files.append(
                CheckpointFile(
                    f"model-0000N-of-{shards:05d}.safetensors ({shards} files)", size, False
                )
            )
            files.append(
                CheckpointFile(
                    "model.safetensors.index.json", 120 * len(model.saved_tensors), False
                )
            )
        config_json = len(model.config.to_json_string(use_diff=True).encode())
        files.append(CheckpointFile("config.json", config_json, False))
        files.append(
            CheckpointFile("generation_config.json", SMALL_FILES["generation_config.json"], False)
        )
    for name, size in _folder_file_sizes(model.folder, TOKENIZER_FILES).items():
        files.append(CheckpointFile(name, size, False))
    return files


# --------------------------------------------------------------------------------------------------
# Activation formula
# --------------------------------------------------------------------------------------------------


def _precision_mode(weight_dtype: torch.dtype, mixed: bool) -> str:
    """fp32: everything fp32. autocast: fp32 weights, bf16/fp16 matmuls. half: bf16/fp16 weights
    (half-autocast: with bf16/fp16 mixed precision on, which matters for fp32 LoRA adapters)."""
    if weight_dtype != torch.float32:
        return "half-autocast" if mixed else "half"
    return "autocast" if mixed else "fp32"


def _linear_inputs(
    kinds: list[str], width: int, mode: str, already_half: bool, lora_r: int, dropout: int
) -> int:
    """Bytes per token that autograd keeps for the input of these Linears (which share it).

    A Linear keeps its input only when it computes a weight gradient (trainable weight) or feeds
    a LoRA adapter. Under autocast each Linear casts an fp32 input to half separately, so each
    keeps its own copy; an input that is already half is shared. peft keeps adapters in fp32 on a
    half base model and casts the input up per adapter. With lora_dropout each adapter keeps its
    own dropped-out input and the mask: `dropout` is the mask's bytes per element (0: none)."""
    full = kinds.count("full")
    lora = kinds.count("lora")
    # Bytes lora_A keeps per input element: its fp32 weight under autocast takes a half input.
    adapter_in = 2 if mode in ("autocast", "half-autocast") else 4
    total = 0
    if full:  # inputs kept for trainable base weights
        if mode == "autocast" and not already_half:
            total += 2 * width * full
        else:
            total += (4 if mode == "fp32" else 2) * width
    if lora:  # inputs kept for the adapters
        if dropout:
            total += (adapter_in + dropout) * width * lora
        elif mode == "fp32":
            total += 0 if full else 4 * width  # the very same tensor as the base input
        else:  # half base: an fp32 cast per adapter; autocast: a half cast per adapter
            total += adapter_in * width * lora
    return total + adapter_in * lora_r * lora  # lora_A's output, kept by lora_B


def _norm_bytes(
    hidden: int, mode: str, trainable: bool, consumers: list[str], lora_r: int, dropout: int
) -> int:
    """RMSNorm as transformers writes it: upcast to fp32, x * rsqrt(mean(x²)), weight * x̂."""
    total = 4 * hidden  # the fp32 input, kept by pow() and the multiply by rsqrt
    if trainable:
        total += 4 * hidden  # x̂, kept for the weight's gradient
        if mode.startswith("half"):
            total += 2 * hidden  # x̂ cast back to the input dtype before the weight multiply
    half_out = mode.startswith("half")
    return total + _linear_inputs(consumers, hidden, mode, half_out, lora_r, dropout)


def _layer_bytes_per_token(model: _Model, mode: str, seq_len: int, repeat_kv: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (no gradient checkpointing)."""
    s, k = model.shape, model.layer_kinds
    a = 4 if mode == "fp32" else 2  # matmul outputs: fp32, or half under bf16/fp16
    q_dim = s.heads * s.head_dim
    kv_dim = s.kv_heads * s.head_dim * (s.heads // s.kv_heads if repeat_kv else 1)
    r = model.lora_r
    # CUDA's fused dropout keeps a bool mask; elsewhere dropout multiplies by a float noise tensor.
    drop = 0 if model.lora_dropout <= 0 else 1 if model.device == "cuda" else 4
    total = _norm_bytes(s.hidden, mode, model.norm_trainable, [k[m] for m in ATTN_INPUTS], r, drop)
    # Attention: q, k, v after RoPE are kept by the attention kernel, with its output and fp32
    # log-sum-exp per head; the output is then copied to [tokens, heads*dim] for o_proj.
    total += a * (q_dim + 2 * kv_dim) + a * q_dim + 4 * s.heads
    if s.eager_attention:  # eager keeps the [heads, T, T] probabilities (and their pre-softmax)
        total += 2 * a * s.heads * seq_len
    total += _linear_inputs([k["o_proj"]], q_dim, mode, True, r, drop)
    total += _norm_bytes(s.hidden, mode, model.norm_trainable, [k[m] for m in MLP_INPUTS], r, drop)
    # Gated MLP: act(gate) keeps gate; act(gate) * up keeps both factors; down keeps the product.
    total += 3 * a * s.intermediate
    total += _linear_inputs([k["down_proj"]], s.intermediate, mode, True, r, drop)
    return total


def _activation_parts(
    model: _Model, mode: str, tokens: int, seq_len: int, repeat_kv: bool, every_n: int = 1
) -> dict[str, int]:
    s = model.shape
    residual = 4 if model.weight_dtype == torch.float32 else 2
    a = 4 if mode == "fp32" else 2
    layer = tokens * _layer_bytes_per_token(model, mode, seq_len, repeat_kv)
    # Final norm: its output is only indexed (trained positions) and handed to the loss.
    head = tokens * _norm_bytes(s.hidden, mode, model.norm_trainable, [], 0, 0)
    # Checkpointing keeps only a checkpointed layer's input through the forward (every n-th
    # layer, from the first: transformers' every_n_layers); the other layers keep everything.
    # Backward then recomputes one layer at a time, whose activations come back on top.
    # Backward runs from the last layer down, freeing each layer's activations as it goes, so a
    # recomputed layer adds to what the layers below it still hold, not to everything.
    layer_input = tokens * residual * s.hidden
    held, in_backward = 0, 0
    for i in range(s.layers):
        if i % every_n == 0:
            in_backward = max(in_backward, held + layer_input + layer)
            held += layer_input
        else:
            held += layer
    return {
        "layer": layer,
        "all_layers": s.layers * layer + head,
        "checkpoint_inputs": held + head,
        "checkpointed": max(in_backward, held) + head,
        "backward": tokens
        * (
            BWD_INTERMEDIATE_TENSORS * a * s.intermediate + BWD_HIDDEN_TENSORS * residual * s.hidden
        ),
    }


def _loss_buffers(model: _Model, tokens: int, mode: str) -> tuple[int, int]:
    """(bytes during the loss forward, bytes during its backward) for chatsft's chunked loss.

    The chunked cross-entropy (model/chunked_ce.py) computes gradients in its forward: an fp32
    [vocab, hidden] gradient for the head and a [tokens, hidden] gradient for the hidden states,
    while it walks [chunk, vocab] logits (chunk = max(64, 128 Mi / vocab) rows) in the matmul dtype,
    one chunk alive at a time. On CUDA a chunk also has an fp32 log-softmax; on a CPU, an fp32 exp
    block (the logits themselves when fp32) and, with 16-bit matmuls, a cast of the softmax and of
    the head gradient's partial product. The backward scales both gradients in place. Every
    position is assumed trained (the worst case)."""
    s = model.shape
    hidden_bytes = 4 if model.weight_dtype == torch.float32 else 2
    selected = tokens * s.hidden * hidden_bytes  # hidden states at trained positions: the input
    if s.logit_transform:  # soft-capped/scaled logits: the plain path materialises all logits
        logits = tokens * s.vocab
        return selected + logits * (hidden_bytes + 8), selected + logits * (hidden_bytes + 8)
    mm = 2 if mode in ("autocast", "half-autocast") else 4  # bytes per matmul element
    chunk = min(tokens, max(64, CHUNK_ELEMENTS // s.vocab))
    head = s.vocab * s.hidden
    weight_bytes = 4 if model.weight_dtype == torch.float32 else 2
    head_cast = head * mm if mm != weight_bytes else 0  # weight.to(matmul dtype)
    grad_hidden = tokens * s.hidden * hidden_bytes
    block = chunk * s.vocab
    if model.device == "cuda":
        blocks = block * (mm + 4)  # logits + fp32 log-softmax, then logits + softmax
    elif mm == 4:
        blocks = block * 4  # exp and softmax in place of the logits
    else:
        blocks = max(block * (mm + 4 + mm), block * 2 * mm + head * (mm + 4))
    blocks += 2 * chunk * s.hidden * mm  # h and dh
    forward = selected + head * 4 + grad_hidden + blocks + head_cast
    backward = head * 4 + grad_hidden
    if weight_bytes != 4:
        backward += head * weight_bytes  # the scaled gradient cast back to the weight dtype
    return forward, backward


# --------------------------------------------------------------------------------------------------
# estimate()
# --------------------------------------------------------------------------------------------------


@dataclass
class _Static:
    """Batch-independent parts: computed once per model/optimizer, reused by fit_batch."""

    model: _Model
    optimizer: str
    optimizer_bytes: int
    optimizer_file: CheckpointFile | None
    step_temporaries: int
    files: list[CheckpointFile]
    final_files: list[CheckpointFile]


def _static(
    model: _Model,
    optimizer: str,
    mixed: str | None,
    save_only_model: bool,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
) -> _Static:
    if optimizer not in OPTIMIZERS:
        close = difflib.get_close_matches(optimizer, OPTIMIZERS, n=1)
        raise ChatSFTError(
            f"unsupported optimizer {optimizer!r}",
            field="optim",
            hint=f"did you mean '{close[0]}'?" if close else f"one of {', '.join(OPTIMIZERS)}",
        )
    if optimizer in EIGHT_BIT_OPTIMIZERS:
        opt_bytes = _eight_bit_state(model)
        # torch.save overhead: a zip record and pickle entry per state tensor (~6 per parameter).
        opt_file = CheckpointFile("optimizer.pt", opt_bytes + 600 * len(model.trainable), False)
    else:
        opt_bytes, file_bytes = _torch_optimizer_state(
            model, optimizer, learning_rate, weight_decay
        )
        exact = file_bytes is not None
        opt_file = CheckpointFile(
            "optimizer.pt", file_bytes if exact else opt_bytes + 250 * len(model.trainable), exact
        )
    # Non-fused torch AdamW (foreach) builds sqrt(exp_avg_sq) for all parameters at once.
    step_tmp = opt_bytes // 2 if optimizer == "adamw_torch" else 0
    model_files = _model_files(model)
    files = list(model_files)
    files.append(CheckpointFile("training_args.bin", SMALL_FILES["training_args.bin"], False))
    files.append(CheckpointFile("training_config.yaml", SMALL_FILES["training_config.yaml"], False))
    final_files = list(files)
    if not save_only_model:
        files.append(opt_file)
        files.append(CheckpointFile("scheduler.pt", SMALL_FILES["scheduler.pt"], False))
        if mixed == "fp16":
            files.append(CheckpointFile("scaler.pt", SMALL_FILES["scaler.pt"], False))
        if world_size == 1:
            files.append(CheckpointFile("rng_state.pth", SMALL_FILES["rng_state.pth"], False))
        else:  # one per rank
            files.append(
                CheckpointFile(
                    f"rng_state_0..{world_size - 1}.pth ({world_size} files)",
                    world_size * SMALL_FILES["rng_state.pth"],
                    False,
                )
            )
    files.append(CheckpointFile("trainer_state.json", SMALL_FILES["trainer_state.json"], False))
    return _Static(
        model,
        optimizer,
        opt_bytes,
        opt_file if not save_only_model else None,
        step_tmp,
        files,
        final_files,
    )


def _memory(
    st: _Static,
    *,
    batch_size: int,
    max_length: int,
    gradient_accumulation_steps: int,
    gradient_checkpointing: bool,
    mixed: str | None,
    packing: bool,
    world_size: int,
    every_n_layers: int = 1,
) -> tuple[dict[str, int], int, int, int, str]:
    """Memory components and the peak for one micro-batch size."""
    m = st.model
    mode = _precision_mode(m.weight_dtype, mixed is not None)
    tokens = batch_size * max_length
    # Padded batches reach transformers' SDPA with a mask, which repeats the KV heads; packed rows
    # go to chatsft's document attention, which uses SDPA's native GQA.
    repeat_kv = not packing and m.shape.kv_heads < m.shape.heads
    every_n = every_n_layers if gradient_checkpointing else 1
    acts = _activation_parts(m, mode, tokens, max_length, repeat_kv, every_n)
    loss_fwd, loss_bwd = _loss_buffers(m, tokens, mode)
    # Under autocast every Linear weight gets a half copy, cached until the forward ends; without
    # checkpointing each copy is also saved for backward, with it only the recomputed layer's.
    autocast = 2 * m.linear_weight_params if mode == "autocast" else 0
    kept_copies = m.shape.layers - -(-m.shape.layers // every_n) + 1  # layers 0, n, 2n, ...
    autocast_saved = (
        autocast * kept_copies // m.shape.layers if gradient_checkpointing else autocast
    )
    head_grad = m.lm_head_params * 4 if m.lm_head_trainable else 0
    held_grads = m.grad_bytes if gradient_accumulation_steps > 1 else 0
    # DDP allocates its own gradient buckets (gradient_as_bucket_view is off by default in
    # accelerate): a second copy of the gradients for the whole run.
    buckets = m.grad_bytes if world_size > 1 else 0
    if gradient_checkpointing:
        at_loss_saved, in_backward = acts["checkpoint_inputs"], acts["checkpointed"]
    else:
        at_loss_saved = in_backward = acts["all_layers"]
    base = m.weight_bytes + st.optimizer_bytes + held_grads + buckets
    # Four moments compete for the peak: the loss forward (chatsft computes it inside the LM
    # head's forward, so the autocast cache is still alive), the loss backward, the first layer
    # backward (activations plus the gradients flowing through it) and the optimizer step.
    at_loss = base + at_loss_saved + max(autocast + loss_fwd, autocast_saved + loss_bwd)
    at_layer = base + in_backward + autocast_saved + acts["backward"] + head_grad
    at_step = m.weight_bytes + m.grad_bytes + st.optimizer_bytes + st.step_temporaries + buckets
    peak = max(at_loss, at_layer, at_step)
    phase = "optimizer step" if peak == at_step else "forward/backward"
    memory = {
        "weights": m.weight_bytes,
        "gradients": m.grad_bytes,
        "optimizer_state": st.optimizer_bytes,
        "optimizer_step_temporaries": st.step_temporaries,
        "autocast_weight_copies": autocast,
        "ddp_gradient_buckets": buckets,
        "activations": in_backward,
        "backward_working_set": acts["backward"],
        "loss_buffers": max(loss_fwd, loss_bwd),
    }
    return memory, acts["all_layers"], acts["checkpointed"], peak, phase


def estimate(
    model: Any,
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    packing: bool = False,
    dtype: str | torch.dtype | None = None,
    bf16: bool = False,
    fp16: bool = False,
    optimizer: str = "adamw_torch_fused",
    gradient_checkpointing: bool = False,
    every_n_layers: int = 1,
    lora: int | dict[str, Any] | Any | None = None,
    lora_target_modules: str | list[str] | None = None,
    peft_config: Any | None = None,
    save_total_limit: int | None = None,
    save_only_model: bool = False,
    world_size: int = 1,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    device: str | None = None,
) -> Estimate:
    """Predict per-device peak memory and checkpoint sizes for a chatsft training run.

    `model`: a folder with config.json, a hub id (needs the network or the hub cache) or a
    transformers config. `dtype`: the weights' dtype as loaded (None: float32, as the trainer
    loads them; "auto": the config's, like from_pretrained); `bf16`/`fp16`: mixed precision (autocast) as in SFTConfig. `lora`: a rank, a
    dict of LoraConfig fields or a peft config (`peft_config` is the same, by TRL's name); a rank
    takes chatsft's YAML defaults (alpha 2r, dropout 0.05, all linear layers). `device`: "cuda" or
    "cpu", where the run trains (default: CUDA if this machine has it). `every_n_layers`: with
    gradient checkpointing, only every n-th decoder layer is checkpointed (transformers'
    `activation_checkpointing_kwargs: {every_n_layers: n}`). Every position is assumed
    trained and every row full (max_length tokens): an upper bound."""
    static, settings = _prepare(
        model,
        dtype=dtype,
        bf16=bf16,
        fp16=fp16,
        optimizer=optimizer,
        lora=peft_config if peft_config is not None else lora,
        lora_target_modules=lora_target_modules,
        save_only_model=save_only_model,
        world_size=world_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        device=device,
    )
    return _finish(
        static,
        settings,
        batch_size=batch_size,
        max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        every_n_layers=every_n_layers,
        packing=packing,
        save_total_limit=save_total_limit,
    )


def _prepare(
    model: Any,
    *,
    dtype: Any,
    bf16: bool,
    fp16: bool,
    optimizer: str,
    lora: Any,
    lora_target_modules: Any,
    save_only_model: bool,
    world_size: int,
    learning_rate: float,
    weight_decay: float,
    device: str | None,
) -> tuple[_Static, dict[str, Any]]:
    if bf16 and fp16:
        raise ChatSFTError("bf16 and fp16 are exclusive", field="bf16", hint="set only one")
    if world_size < 1:
        raise ChatSFTError(f"world_size must be >= 1, got {world_size}", field="world_size")
    config, name, folder = load_model_config(model)
    weight_dtype = _resolve_dtype(dtype, config, folder)
    peft = _lora_config(lora, lora_target_modules)
    targets = _target_names(peft)  # as asked: peft rewrites "all-linear" into module names
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ChatSFTError(f"device must be cuda or cpu, got {device!r}", field="device")
    built = _build_model(config, name, folder, weight_dtype, peft, device)
    mixed = "bf16" if bf16 else "fp16" if fp16 else None
    static = _static(
        built, optimizer, mixed, save_only_model, world_size, learning_rate, weight_decay
    )
    settings = {
        "dtype": str(weight_dtype).replace("torch.", ""),
        "mixed_precision": mixed,
        "optimizer": optimizer,
        "lora_r": built.lora_r or None,
        "lora_target_modules": targets,
        "save_only_model": save_only_model,
        "world_size": world_size,
        "device": device,
    }
    return static, settings


def _target_names(peft: Any) -> list[str] | str | None:
    targets = getattr(peft, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def _finish(
    st: _Static,
    settings: dict[str, Any],
    *,
    batch_size: int,
    max_length: int,
    gradient_accumulation_steps: int,
    gradient_checkpointing: bool,
    packing: bool,
    save_total_limit: int | None,
    every_n_layers: int = 1,
) -> Estimate:
    for key, value in (
        ("max_length", max_length),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("every_n_layers", every_n_layers),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ChatSFTError(f"{key} must be a positive integer, got {value!r}", field=key)
    mixed = settings["mixed_precision"]
    memory, act_full, act_gc, peak, phase = _memory(
        st,
        batch_size=batch_size,
        max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        mixed=mixed,
        packing=packing,
        world_size=settings["world_size"],
        every_n_layers=every_n_layers,
    )
    m = st.model
    ckpt = sum(f.bytes for f in st.files)
    final = sum(f.bytes for f in st.final_files)
    kept = save_total_limit if save_total_limit and save_total_limit > 0 else None
    out_settings = {
        "max_length": max_length,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "effective_batch_size": batch_size * gradient_accumulation_steps * settings["world_size"],
        "packing": packing,
        "gradient_checkpointing": gradient_checkpointing,
        "every_n_layers": every_n_layers if gradient_checkpointing else None,
        "save_total_limit": kept,
        **settings,
    }
    notes = []
    s = m.shape
    if s.eager_attention:
        notes.append("eager attention keeps [heads, T, T] probabilities per layer")
    if not m.llama_like:
        notes.append(
            "the decoder layers are not Llama/Qwen-shaped (q/k/v/o, gate/up/down projections): "
            "activations are approximate"
        )
    text = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        notes.append("mixture-of-experts: activations count one dense MLP per token (approximate)")
    if settings["world_size"] > 1:
        notes.append(
            "DDP assumed (replicated weights and optimizer, plus gradient buckets); FSDP and "
            "DeepSpeed ZeRO shard them and are not modelled"
        )
    if st.optimizer in EIGHT_BIT_OPTIMIZERS:
        notes.append("8-bit optimizer state is computed from bitsandbytes' block layout (approx.)")
    return Estimate(
        model=m.name,
        settings=out_settings,
        total_params=m.total_params,
        trainable_params=m.trainable_params,
        weight_dtype=settings["dtype"],
        memory=memory,
        activations_without_checkpointing=act_full,
        activations_with_checkpointing=act_gc,
        peak_bytes=peak,
        peak_phase=phase,
        checkpoint_files=list(st.files),
        checkpoint_bytes=ckpt,
        checkpoints_kept=kept,
        final_model_bytes=final,
        total_disk_bytes=kept * ckpt + final if kept else None,
        note=_note(st, ckpt),
        warnings=notes,
    )


def _note(st: _Static, checkpoint_bytes: int) -> str:
    m = st.model
    weights = next((f.bytes for f in st.files if "safetensors" in f.name), 0)
    n = m.trainable_params
    if st.optimizer_file is None:
        opt_line = (
            "save_only_model is on, so checkpoints hold no optimizer.pt (and cannot resume the "
            "optimizer exactly)."
        )
    elif st.optimizer in ("adamw_torch", "adamw_torch_fused"):
        per = st.optimizer_bytes / max(n, 1)
        # The moments take the parameters' dtype: fp32 master weights give 8 B per parameter.
        dtypes = {d for _, _, d in m.trainable}
        dtype = "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        size = st.optimizer_file.bytes
        opt_line = (
            f"optimizer.pt is {human(size)} ({size / max(weights, 1):.1f}x the "
            f"{'adapter' if m.is_peft else 'model'} file) because AdamW keeps two {dtype} moment "
            f"tensors, exp_avg and exp_avg_sq, for every trainable parameter: {n:,} x "
            f"{per:.0f} B = {human(st.optimizer_bytes)}."
        )
    else:
        opt_line = (
            f"optimizer.pt holds {st.optimizer}'s state for {n:,} trainable parameters: "
            f"{human(st.optimizer_file.bytes)}."
        )
    s = m.shape
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    lora16 = (
        s.layers * 16 * ((s.hidden + q) * 2 + (s.hidden + kv) * 2 + (s.hidden + s.intermediate) * 3)
    )
    shrink = []
    if not m.is_peft:
        shrink.append(
            "LoRA trains adapters only (r=16 on all linear layers: "
            f"~{lora16 / 1e6:.1f}M parameters, "
            f"optimizer.pt ~{human(lora16 * 8)})"
        )
    if st.optimizer not in EIGHT_BIT_OPTIMIZERS:
        shrink.append(
            "an 8-bit AdamW (optim: adamw_bnb_8bit) stores ~2 B per parameter "
            f"(~{human(_eight_bit_state(m))})"
        )
    if st.optimizer_file is not None:
        shrink.append("save_only_model: true drops optimizer.pt from checkpoints (no exact resume)")
    shrink.append(
        f"save_total_limit: k keeps only the last k checkpoints ({human(checkpoint_bytes)} each)"
    )
    return opt_line + " What shrinks it: " + "; ".join(shrink) + "."


# --------------------------------------------------------------------------------------------------
# Fit the batch to the memory
# --------------------------------------------------------------------------------------------------


def parse_memory(text: str | int | float) -> int:
    """'24GiB', '24G' (GiB), '80GB' (10^9), '512MiB', or a number of bytes → bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ChatSFTError(
            f"cannot read memory size {text!r}", field="memory", hint="e.g. 24GiB, 80GB, 16000MiB"
        )
    number, unit, binary = match.groups()
    power = "BKMGT".index(unit.upper() or "B")
    # 'G' alone means GiB, as nvidia-smi and torch report; 'GB' is decimal.
    decimal = unit and not binary and str(text).strip().upper().endswith("B")
    return int(float(number) * ((1000 if decimal else 1024) ** power))


def free_device_memory() -> int | None:
    """Free memory on the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def fit_batch(
    model: Any,
    *,
    memory: int | str | None = None,
    max_length: int = 1024,
    effective_batch_size: int = 8,
    gradient_checkpointing: bool | None = None,
    every_n_layers: int = 1,
    headroom: float = 0.10,
    world_size: int = 1,
    save_total_limit: int | None = None,
    packing: bool = False,
    **kwargs: Any,
) -> FitResult:
    """The largest micro-batch that fits `memory` (bytes or '24GiB'; default: free CUDA memory),
    keeping `effective_batch_size` (over all devices) through gradient accumulation. Gradient
    checkpointing is turned on only when no micro-batch fits without it (None: the choice is
    ours; True/False: fixed). `headroom` of the budget stays free for allocator fragmentation and
    the CUDA context. Other keyword arguments go to `estimate`."""
    if memory is None:
        memory = free_device_memory()
        if memory is None:
            raise ChatSFTError(
                "no CUDA device to measure free memory on",
                field="memory",
                hint="pass --memory 24GiB",
            )
        source = "free CUDA memory"
    else:
        source = "the given budget"
    budget = parse_memory(memory)
    if effective_batch_size < 1 or effective_batch_size % world_size:
        raise ChatSFTError(
            f"effective batch size {effective_batch_size} must be a positive multiple of the "
            f"world size {world_size}",
            field="effective_batch_size",
        )
    per_rank = effective_batch_size // world_size
    usable = int(budget * (1 - headroom))
    static, settings = _prepare(
        model,
        dtype=kwargs.pop("dtype", "auto"),
        bf16=kwargs.pop("bf16", False),
        fp16=kwargs.pop("fp16", False),
        optimizer=kwargs.pop("optimizer", "adamw_torch_fused"),
        lora=kwargs.pop("peft_config", None) or kwargs.pop("lora", None),
        lora_target_modules=kwargs.pop("lora_target_modules", None),
        save_only_model=kwargs.pop("save_only_model", False),
        world_size=world_size,
        learning_rate=kwargs.pop("learning_rate", 2e-5),
        weight_decay=kwargs.pop("weight_decay", 0.0),
        device=kwargs.pop("device", None),
    )
    if kwargs:
        raise TypeError(f"fit_batch got unexpected arguments {sorted(kwargs)}")
    divisors = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    options = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    tried: list[dict[str, Any]] = []
    for gc in options:
        for micro in divisors:
            est = _finish(
                static,
                settings,
                batch_size=micro,
                every_n_layers=every_n_layers,
                max_length=max_length,
                gradient_accumulation_steps=per_rank // micro,
                gradient_checkpointing=gc,
                packing=packing,
                save_total_limit=save_total_limit,
            )
            tried.append(
                {"batch_size": micro, "gradient_checkpointing": gc, "peak_bytes": est.peak_bytes}
            )
            if est.peak_bytes <= usable:
                reason = (
                    f"micro-batch {micro} x {per_rank // micro} accumulation steps"
                    + (f" x {world_size} devices" if world_size > 1 else "")
                    + f" = effective batch {effective_batch_size}; predicted peak "
                    f"{human(est.peak_bytes)} fits {human(usable)} "
                    f"({100 - round(headroom * 100)}% of {human(budget)}, {source})"
                )
                if micro < per_rank:  # the next larger micro-batch, which did not fit
                    bigger = [t for t in tried if t["gradient_checkpointing"] == gc][-2]
                    reason += (
                        f"; micro-batch {bigger['batch_size']} would need "
                        f"{human(bigger['peak_bytes'])}"
                    )
                if gc and gradient_checkpointing is None:
                    reason += (
                        f"; gradient checkpointing on because even micro-batch 1 needs "
                        f"{human(tried[len(divisors) - 1]['peak_bytes'])} without it"
                    )
                elif gc:
                    reason += "; gradient checkpointing on as configured"
                return FitResult(micro, per_rank // micro, gc, budget, usable, est, reason, tried)
    smallest = min(t["peak_bytes"] for t in tried)
    raise ChatSFTError(
        f"even micro-batch 1{' with gradient checkpointing' if True in options else ''} needs "
        f"{human(smallest)}, more than {human(usable)} usable of {human(budget)}",
        field="memory",
        hint="use LoRA (--lora-r 16), an 8-bit optimizer, bf16 weights or a shorter max_length",
    )


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _checkpointing_words(settings: dict[str, Any]) -> str:
    every = settings.get("every_n_layers") or 1
    if not settings["gradient_checkpointing"]:
        return "off"
    return "on" if every == 1 else f"on for 1 decoder layer in {every}"


def format_estimate(est: Estimate) -> str:
    s = est.settings
    lines = [
        f"chatsft estimate: {est.model}",
        f"  parameters      {est.total_params:,} total, {est.trainable_params:,} trainable"
        f" ({100 * est.trainable_params / max(est.total_params, 1):.2f}%),"
        f" weights {est.weight_dtype}",
        f"  run             micro-batch {s['batch_size']} x {s['max_length']} tokens,"
        f" accumulation {s['gradient_accumulation_steps']}, {s['world_size']} device(s),"
        f" optimizer {s['optimizer']}, mixed precision {s['mixed_precision'] or 'off'},"
        f" gradient checkpointing {_checkpointing_words(s)}"
        + (f", LoRA r={s['lora_r']}" if s["lora_r"] else ""),
        "",
        "  memory per device",
    ]
    labels = {
        "weights": "weights",
        "gradients": "gradients",
        "optimizer_state": "optimizer state",
        "optimizer_step_temporaries": "optimizer step temporaries",
        "autocast_weight_copies": "autocast half weight copies",
        "ddp_gradient_buckets": "DDP gradient buckets",
        "activations": "activations (saved for backward)",
        "backward_working_set": "backward working set",
        "loss_buffers": "chunked loss buffers",
    }
    for key, label in labels.items():
        value = est.memory[key]
        if value or key in ("weights", "optimizer_state", "activations"):
            lines.append(f"    {label:<36}{human(value):>12}")
    other = "with" if not s["gradient_checkpointing"] else "without"
    other_bytes = (
        est.activations_with_checkpointing
        if other == "with"
        else est.activations_without_checkpointing
    )
    lines.append(f"    {'(activations ' + other + ' checkpointing)':<36}{human(other_bytes):>12}")
    lines.append(f"    {'estimated peak (' + est.peak_phase + ')':<36}{human(est.peak_bytes):>12}")
    lines += ["", "  checkpoint-N/ folder"]
    for f in est.checkpoint_files:
        size = human(f.bytes) if f.exact else "~" + human(f.bytes)
        lines.append(f"    {f.name:<36}{size:>12}")
    lines.append(f"    {'total per checkpoint':<36}{human(est.checkpoint_bytes):>12}")
    if est.total_disk_bytes is not None:
        lines.append(
            f"    {f'disk: {est.checkpoints_kept} kept + final model':<36}"
            f"{human(est.total_disk_bytes):>12}"
        )
    else:
        lines.append(
            f"    {'disk: no save_total_limit':<36}"
            f"{'+' + human(est.checkpoint_bytes) + ' per save':>12}"
        )
    lines += ["", _wrap("  note: " + est.note, 100, "        ")]
    for w in est.warnings:
        lines.append(f"  ! {w}")
    return "\n".join(lines)


def _wrap(text: str, width: int, indent: str) -> str:
    import textwrap

    # Keep "1.84 GiB" on one line: a no-break space between number and unit while wrapping.
    text = re.sub(r"(\d) (GiB|MiB|KiB|B)\b", "\\1\u00a0\\2", text)
    return textwrap.fill(text, width=width, subsequent_indent=indent).replace("\u00a0", " ")


# --------------------------------------------------------------------------------------------------
# CLI: chatsft estimate
# --------------------------------------------------------------------------------------------------

# YAML keys (the same file as `chatsft train`) that the estimate reads.
_YAML_KEYS = {
    "model": "model",
    "max_length": "max_length",
    "max_len": "max_length",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "packing": "packing",
    "bf16": "bf16",
    "fp16": "fp16",
    "optim": "optimizer",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's newer name
    "save_total_limit": "save_total_limit",
    "save_only_model": "save_only_model",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
}


def _read_yaml(path: str) -> dict[str, Any]:
    from .run_config import read_config_file

    values = read_config_file(path)
    out = {dest: values[key] for key, dest in _YAML_KEYS.items() if key in values}
    if values.get("activation_checkpointing") or values.get("gradient_checkpointing"):
        out["gradient_checkpointing"] = True
    kwargs = (
        values.get("activation_checkpointing_kwargs")
        or values.get("gradient_checkpointing_kwargs")
        or {}
    )
    if isinstance(kwargs, dict) and "every_n_layers" in kwargs:
        out["every_n_layers"] = kwargs["every_n_layers"]
    init = values.get("model_init_kwargs") or {}
    if "dtype" in init or "torch_dtype" in init:
        out["dtype"] = init.get("dtype", init.get("torch_dtype"))
    if values.get("use_peft"):  # the same LoRA `chatsft train` builds from these fields
        from .run_config import RunConfig, peft_config_of

        # sft is not read for LoRA; the RunConfig carries chatsft's defaults for missing fields.
        lora_keys = {k: v for k, v in values.items() if k.startswith("lora_")}
        out["lora"] = peft_config_of(
            RunConfig(model="", dataset="", sft=None, use_peft=True, **lora_keys)
        )
    return out


def add_estimate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `chatsft estimate` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "estimate",
        help="predict peak memory and checkpoint sizes before training; fit the batch to memory",
        description="Predict per-device peak memory and checkpoint sizes from the model config "
        "alone (no weights are loaded). Reads the same YAML as `chatsft train`; flags override it. "
        "With --batch-size auto, picks the largest micro-batch that fits --memory (or the free "
        "CUDA memory) and keeps the effective batch through gradient accumulation.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a `chatsft train` config")
    p.add_argument("--model", help="folder with config.json, or a hub id")
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", help="per-device micro-batch, or 'auto' to fit --memory")
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument(
        "--effective-batch-size",
        type=int,
        help="with --batch-size auto: the batch per optimizer step over all devices, kept through "
        "gradient accumulation (default: 8 per device)",
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, help="Trainer optim name (default adamw_torch_fused)"
    )
    p.add_argument(
        "--dtype",
        help="weight dtype as loaded: float32 (default, as training loads), bfloat16, float16, auto "
        "(the config's)",
    )
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    p.add_argument("--fp16", action="store_true", default=None, help="fp16 mixed precision")
    p.add_argument("--packing", action="store_true", default=None)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--every-n-layers",
        type=int,
        help="with gradient checkpointing, checkpoint only every N-th decoder layer",
    )
    p.add_argument("--lora-r", type=int, help="LoRA rank (0: full fine-tune)")
    p.add_argument(
        "--lora-target-modules",
        help="comma-separated module names, or all-linear (the default, as in `chatsft train`)",
    )
    p.add_argument("--save-total-limit", type=int)
    p.add_argument("--save-only-model", action="store_true", default=None)
    p.add_argument("--world-size", type=int, default=1, help="number of data-parallel devices")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="where the run trains (default: CUDA if this machine has it)",
    )
    p.add_argument("--memory", help="memory budget per device, e.g. 24GiB or 80GB")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_estimate)
    return p


def cmd_estimate(args: argparse.Namespace) -> int:
    values: dict[str, Any] = _read_yaml(args.config) if args.config else {}
    flags = {
        "model": args.model,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "optimizer": args.optimizer,
        "dtype": args.dtype,
        "bf16": args.bf16,
        "fp16": args.fp16,
        "packing": args.packing,
        "gradient_checkpointing": args.gradient_checkpointing,
        "every_n_layers": args.every_n_layers,
        "save_total_limit": args.save_total_limit,
        "save_only_model": args.save_only_model,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values["device"] = args.device
    if args.lora_r is not None:
        values["lora"] = args.lora_r or None
    if args.lora_target_modules:
        t = args.lora_target_modules
        values["lora_target_modules"] = t if t == "all-linear" else t.split(",")
    if not values.get("model"):
        raise ChatSFTError(
            "is required", field="model", hint="pass --model or a CONFIG.yaml with model: ..."
        )
    values.setdefault("max_length", 1024)
    if str(values.get("optimizer", "")).startswith("OptimizerNames."):
        values["optimizer"] = str(values["optimizer"]).split(".", 1)[1].lower()
    batch = values.pop("batch_size", 8)
    accumulation = int(values.get("gradient_accumulation_steps") or 1)
    if str(batch).lower() == "auto":
        target = args.effective_batch_size or 8 * args.world_size
        values.pop("gradient_accumulation_steps", None)
        # A YAML `gradient_checkpointing: false` is usually just the default: only true, or an
        # explicit --no-gradient-checkpointing, fixes it; otherwise fit_batch decides.
        if values.get("gradient_checkpointing") is not True:
            values["gradient_checkpointing"] = args.gradient_checkpointing
        result = fit_batch(
            values.pop("model"),
            memory=args.memory,
            effective_batch_size=target,
            world_size=args.world_size,
            **values,
        )
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            print(result.estimate.table())
            print(
                f"\nfit: per_device_train_batch_size={result.batch_size} "
                f"gradient_accumulation_steps={result.gradient_accumulation_steps} "
                f"gradient_checkpointing={str(result.gradient_checkpointing).lower()}"
            )
            print(_wrap("  because " + result.reason, 100, "  "))
        return 0
    try:
        batch = int(batch)
    except (TypeError, ValueError):
        raise ChatSFTError(
            f"batch size must be a number or 'auto', got {batch!r}",
            field="per_device_train_batch_size",
        ) from None
    values["gradient_accumulation_steps"] = accumulation
    est = estimate(values.pop("model"), batch_size=batch, world_size=args.world_size, **values)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2, default=str))
    else:
        print(est.table())
        if args.memory is not None:
            budget = parse_memory(args.memory)
            verdict = "fits" if est.peak_bytes <= budget else "does NOT fit"
            print(
                f"\n  {human(est.peak_bytes)} {verdict} in {human(budget)} "
                "(--batch-size auto picks a batch that fits)"
            )
    return 0
