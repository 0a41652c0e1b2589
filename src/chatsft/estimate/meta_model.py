"""The model to train, built on the meta device: exact parameter counts, what trains and how.

`AutoModelForCausalLM.from_config` under `torch.device("meta")` gives the real module tree and
parameter shapes with no memory and no initialisation cost; peft wraps it exactly as training does,
so tied embeddings and LoRA adapters are counted as they will be.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ChatSFTError
from ..model.load import TRAINING_DTYPE
from ..model.loss import LOGIT_TRANSFORMS
from .files import safetensors_first_dtype

# Modules of a Llama/Qwen/Mistral decoder layer, by the role they play in the activation formula.
ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")

Tensors = list[tuple[str, tuple[int, ...], torch.dtype]]  # (name, shape, dtype) per tensor


@dataclass
class Shape:
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
class MetaModel:
    """What the estimator needs from the model, measured once (the batch search reuses it)."""

    name: str
    folder: str | None
    config: Any
    shape: Shape
    weight_dtype: torch.dtype
    total_params: int
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    linear_weight_params: int  # decoder-layer Linear weights (cast to half under autocast)
    lm_head_params: int
    lm_head_trainable: bool
    saved_tensors: Tensors  # what save_pretrained writes
    is_peft: bool
    layer_kinds: dict[str, str]  # module -> "full" | "lora" | "frozen"
    llama_like: bool  # the first decoder layer has q/k/v/o and gate/up/down projections
    norm_trainable: bool
    lora_r: int
    lora_dropout: float
    device: str  # "cuda" or "cpu": where the run trains (dropout masks, optimizer state location)
    trainable: Tensors


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
    from ..model.load import check_model_ref

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


def resolve_dtype(dtype: Any, config: Any, folder: str | None) -> torch.dtype:
    """Mirror the trainer's loading: no dtype means float32 (TRL's default for training), "auto"
    the config's dtype (from_pretrained's rule)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = TRAINING_DTYPE
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None and folder is not None:
            found = safetensors_first_dtype(folder)
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


def shape_of(config: Any) -> Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return Shape(
        vocab=text.vocab_size,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        # The same test as the loss (model/loss.py): such models take the plain, unchunked path.
        logit_transform=any(getattr(text, n, None) not in (None, 1, 1.0) for n in LOGIT_TRANSFORMS),
    )


def lora_config(lora: Any, target_modules: Any) -> Any:
    """A rank (chatsft's YAML defaults: alpha 2r, dropout 0.05, all linear layers), a dict of
    LoraConfig fields, or a peft config → a peft config (or None)."""
    if lora is None or lora is False or lora == 0:
        return None
    from peft import LoraConfig, PeftConfig

    from ..model.peft_setup import lora_config as rank_config

    if isinstance(lora, PeftConfig):
        return lora
    if isinstance(lora, int) and not isinstance(lora, bool):
        return rank_config(lora, 2 * lora, 0.05, target_modules or "all-linear")
    if not isinstance(lora, dict):
        raise ChatSFTError(
            f"lora must be a rank, a dict or a peft config, got {lora!r}", field="lora"
        )
    kwargs = dict(lora)
    if target_modules is not None:
        kwargs["target_modules"] = target_modules
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**kwargs)


def target_names(peft: Any) -> list[str] | str | None:
    """The target modules as asked (peft later rewrites "all-linear" into module names)."""
    targets = getattr(peft, "target_modules", None)
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def build_model(
    config: Any,
    name: str,
    folder: str | None,
    weight_dtype: torch.dtype,
    peft_config: Any,
    device: str,
) -> MetaModel:
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
    return MetaModel(
        name=name,
        folder=folder,
        config=config,
        shape=shape_of(config),
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


def _saved_tensors(model: torch.nn.Module, is_peft: bool) -> Tensors:
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
