"""Resolve the `model` and `processing_class` arguments the way TRL users expect."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import ChatSFTError

# Weights for training load in float32 unless model_init_kwargs name a dtype, as TRL does: a hub
# model saved in bf16 would otherwise train bf16 weights, where AdamW updates at lr 2e-5 round away.
# "auto" keeps from_pretrained's rule (the dtype saved in the config).
TRAINING_DTYPE = "float32"


def training_init_kwargs(init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """from_pretrained's keyword arguments for a model to train: the given ones, dtype defaulting
    to float32 (TRL's default; transformers 5 would take the config's dtype)."""
    kwargs = dict(init_kwargs or {})
    if kwargs.get("dtype", kwargs.get("torch_dtype")) is None:
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = TRAINING_DTYPE
    return kwargs


HALF_DTYPES = (torch.bfloat16, torch.float16)
# Optimizers that keep their own float32 copy of half-precision weights, or quantise their state.
MASTER_WEIGHT_OPTIMIZERS = ("8bit", "4bit", "bnb", "apollo", "galore", "lomo")


def half_precision_cost(model: torch.nn.Module, optim: str, learning_rate: float) -> str | None:
    """A log line when trainable weights are bf16/fp16 under a plain optimizer: updates smaller than
    a weight's rounding step are lost, so a run can look healthy while weights barely move."""
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    half = sorted(str(d).replace("torch.", "") for d in dtypes & set(HALF_DTYPES))
    if not half or any(key in optim for key in MASTER_WEIGHT_OPTIMIZERS):
        return None
    bits = 8 if torch.bfloat16 in dtypes else 11  # mantissa bits: a step below 2^-bits rounds away
    return (
        f"trainable weights are {'/'.join(half)} and {optim} updates them in place: a change "
        f"smaller than 1/{2**bits} of a weight is rounded away (at learning_rate {learning_rate:g} "
        "most updates are), so weights may not change. For float32 weights with fast half "
        "compute, load float32 (the default; drop dtype from model_init_kwargs) and set bf16: true"
    )


def load_model(
    model: str | torch.nn.Module, init_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """A hub id or local folder → AutoModelForCausalLM; a module is used as it is."""
    if isinstance(model, torch.nn.Module):
        return model
    if not isinstance(model, str):
        raise ChatSFTError(
            f"model must be a hub id, a folder or a torch.nn.Module, got {type(model).__name__}",
            field="model",
        )
    kwargs = dict(init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype is not None:
        kwargs["dtype"] = dtype
    check_model_ref(model)
    # Unset, transformers asks on stdin whether to run a repository's code: off unless asked for.
    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except OSError as err:  # not found on the hub, offline, no weights file
        raise ChatSFTError(
            f"could not load the model: {err}", source=model, field="model"
        ) from None
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a weights file
        raise ChatSFTError(
            "refused to load weights that hold objects other than tensors (unsafe to unpickle): "
            f"{str(err).splitlines()[0][:160]}",
            source=model,
            field="model",
            hint="use models you trust, preferably saved as safetensors",
        ) from None
    except ValueError as err:  # an unknown architecture, a config that does not parse, ...
        raise remote_code_refused(err, model) or ChatSFTError(
            f"could not load the model: {str(err).splitlines()[0]}", source=model, field="model"
        ) from None


def remote_code_refused(err: Exception, source: str) -> ChatSFTError | None:
    """transformers' refusal to run a repository's own Python code, as one line."""
    if "trust_remote_code" not in str(err):
        return None
    return ChatSFTError(
        "this model or tokenizer needs its repository's own Python code, which is not run by "
        "default",
        source=source,
        field="trust_remote_code",
        hint="set trust_remote_code: true only for a repository you trust",
    )


def check_model_ref(ref: str) -> None:
    looks_local = ref.startswith((".", "/", "~")) or os.path.sep in ref.strip("/").split("/", 1)[-1]
    if os.path.isdir(ref):
        if not os.path.exists(os.path.join(ref, "config.json")):
            raise ChatSFTError(
                "folder has no config.json, so it is not a saved model",
                source=ref,
                field="model",
                hint="point model at a folder written by save_pretrained, or a hub id",
            )
        return
    if looks_local:
        raise ChatSFTError(
            "model path does not exist", source=ref, field="model", hint="check the path or hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(ref):
        raise ChatSFTError(
            "not a local folder, and not in the Hugging Face cache (HF_HUB_OFFLINE=1)",
            source=ref,
            field="model",
            hint="check the path or hub id, or download it once with network access",
        )


def _in_hub_cache(ref: str) -> bool:
    """A hub id (`gpt2`, `org/name`) whose config.json is already in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def tokenizer_source(model_arg: str | torch.nn.Module) -> str | None:
    if isinstance(model_arg, str):
        return model_arg
    if hasattr(model_arg, "get_base_model"):  # a PeftModel: its base model knows its name
        model_arg = model_arg.get_base_model()
    if isinstance(model_arg, PreTrainedModel):
        name = getattr(model_arg.config, "_name_or_path", "") or getattr(
            model_arg, "name_or_path", ""
        )
        return name or None
    return None


def load_tokenizer(
    model_arg: str | torch.nn.Module,
    processing_class: Any | None = None,
    *,
    chat_template_path: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """The given tokenizer, or the model's own (at `revision`); with chatsft's chat template, EOS
    and pad rules."""
    tokenizer = processing_class
    if tokenizer is None:
        src = tokenizer_source(model_arg)
        if src is None:
            raise ChatSFTError(
                "no tokenizer: the model is a plain module without a saved name",
                field="processing_class",
                hint="pass processing_class=AutoTokenizer.from_pretrained(...)",
            )
        if isinstance(model_arg, str):
            check_model_ref(model_arg)
        try:
            kwargs = {"revision": revision} if revision and isinstance(model_arg, str) else {}
            tokenizer = AutoTokenizer.from_pretrained(
                src, trust_remote_code=trust_remote_code, **kwargs
            )
        except ValueError as err:
            raise remote_code_refused(err, src) or ChatSFTError(
                f"could not load the tokenizer: {str(err).splitlines()[0]}",
                source=src,
                field="processing_class",
                hint="pass processing_class, or save the tokenizer beside the model",
            ) from None
        except OSError as err:
            raise ChatSFTError(
                f"could not load the tokenizer: {err}",
                source=src,
                field="processing_class",
                hint="pass processing_class, or save the tokenizer beside the model",
            ) from None
    if chat_template_path is not None:
        use_chat_template(tokenizer, chat_template_path)
    if eos_token is not None:
        if tokenizer.convert_tokens_to_ids(eos_token) in (None, tokenizer.unk_token_id):
            raise ChatSFTError(
                f"eos_token {eos_token!r} is not in the tokenizer's vocabulary", field="eos_token"
            )
        tokenizer.eos_token = eos_token
    if tokenizer.eos_token is None:
        raise ChatSFTError(
            "the tokenizer has no eos_token, so the model could never learn to stop",
            field="eos_token",
            hint="set eos_token in the config",
        )
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        # Labels come from trained masks, never from pad ids, so pad == eos cannot hide a real EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_chat_template(tokenizer: Any, path: str) -> None:
    """Take the chat template of a .jinja file, or of another tokenizer (a folder or hub id, as
    TRL's chat_template_path). From a tokenizer, its special tokens the template uses and this
    vocabulary lacks are added (the trainer then grows the embeddings), and its EOS becomes the
    EOS: turns must end with the token the template closes them with."""
    is_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    if os.path.isfile(path) or (os.path.isdir(path) and not is_tokenizer):
        tokenizer.chat_template = read_chat_template(path)
        return
    local = path.startswith((".", "/", "~")) or path.endswith((".jinja", ".j2"))
    if local and not os.path.exists(path):
        raise ChatSFTError("file not found", source=path, field="chat_template_path")
    try:
        source = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ChatSFTError(
            f"not a template file, tokenizer folder or hub id ({err})",
            source=path,
            field="chat_template_path",
        ) from None
    template = source.chat_template
    if not isinstance(template, str) or not template:
        raise ChatSFTError("this tokenizer has no chat template", source=path)
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = [t for t in source.all_special_tokens if t in template and t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if source.eos_token and source.eos_token in template:
        tokenizer.eos_token = source.eos_token


def sync_special_tokens(model: torch.nn.Module, tokenizer: Any, eos_given: bool) -> str | None:
    """Make the model agree with the tokenizer (as TRL does): embeddings for added tokens, the
    pad id in its configs, and a given EOS in its config and generation config (added to the
    generation config's stop tokens, not replacing them). Returns a log line if it grew."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return None
    line = None
    embeddings = base.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        before = embeddings.num_embeddings
        base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        line = f"embeddings grown from {before} to {base.get_input_embeddings().num_embeddings} rows for the tokens the chat template added"
    config = base.config.get_text_config()
    generation = getattr(base, "generation_config", None)
    config.pad_token_id = tokenizer.pad_token_id
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if eos_given:
        config.eos_token_id = tokenizer.eos_token_id
        if generation is not None:
            ids = generation.eos_token_id
            ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
            if tokenizer.eos_token_id not in ids:
                generation.eos_token_id = [tokenizer.eos_token_id, *ids]
    return line


def has_tokenizer(path: str) -> bool:
    """A folder holding tokenizer files (a model or adapter folder saved with its tokenizer)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(path, name)) for name in names)


def read_chat_template(path: str) -> str:
    if os.path.isdir(path):
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja):
            path = jinja
        else:
            template = AutoTokenizer.from_pretrained(path).chat_template
            if not template:
                raise ChatSFTError("tokenizer folder has no chat template", source=path)
            return template
    if not os.path.exists(path):
        raise ChatSFTError("file not found", source=path, field="chat_template_path")
    with open(path, encoding="utf-8") as f:
        return f.read()


def apply_peft(model: torch.nn.Module, peft_config: Any | None) -> torch.nn.Module:
    if peft_config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)
