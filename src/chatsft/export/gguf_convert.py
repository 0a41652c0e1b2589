"""A compact Hugging Face → GGUF converter for the Llama and Qwen2 families.

The file format, the tensor names and the metadata keys are the `gguf` library's (GGUFWriter,
`get_tensor_name_map`, `gguf.quants`); this module only decides what goes in: the hyperparameters,
every weight under its GGUF name (Llama's q/k rows reordered for llama.cpp's rotary layout), and the
byte-level BPE tokenizer with its chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ChatSFTError
from ..model.gguf import gguf_module

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# For these two, transformers' model_type and the GGUF architecture name are the same string.
ARCHS = ("llama", "qwen2")


def write_gguf(
    model: Any, tokenizer: Any, path: str, outtype: str, *, name: str, source: str
) -> None:
    """Write `model` + `tokenizer` to the GGUF file `path` (`source` names the input in errors)."""
    gguf = gguf_module()
    arch = check_model(model.config, source)
    writer = gguf.GGUFWriter(path, arch)
    try:
        add_hparams(writer, model.config, name, outtype)
        add_tokenizer(writer, tokenizer, model.config.vocab_size, source)
        for gguf_name, data in hf_tensors(model, arch):
            array, raw_dtype = encode(data, outtype)
            writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# --- hyperparameters -------------------------------------------------------------------------------


def rope(config: Any) -> tuple[str, float]:
    """(rope type, theta): transformers 5 keeps both in `rope_parameters`, older configs flat."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params.get("rope_type", "default"), float(theta)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_model(config: Any, source: str) -> str:
    """The GGUF architecture, or an error naming what GGUF (as transformers reads it) cannot hold."""
    arch = config.model_type
    if arch not in ARCHS:
        raise ChatSFTError(
            f"cannot export model type {arch!r} to GGUF",
            source=source,
            hint=f"supported: {', '.join(ARCHS)}",
        )
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (only silu)")
    rope_type, _ = rope(config)
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if arch == "llama" and (config.attention_bias or config.mlp_bias):
        problems.append("attention or MLP biases in a Llama model")
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if arch == "qwen2" and head_dim(config) != config.hidden_size // config.num_attention_heads:
        # transformers reads no head size for qwen2 GGUFs: it would rebuild hidden/heads.
        problems.append(f"head_dim {head_dim(config)} != hidden_size / num_attention_heads")
    if problems:
        raise ChatSFTError(
            f"the GGUF {arch} layout cannot represent: {'; '.join(problems)}", source=source
        )
    return arch


def add_hparams(writer: Any, config: Any, name: str, outtype: str) -> None:
    gguf = gguf_module()
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(file_types[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(rope(config)[1])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # transformers reads a Llama's head_dim from here; llama.cpp rotates this many dims (all of them).
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


# --- tensors ---------------------------------------------------------------------------------------


def hf_tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight the file needs, in state-dict order."""
    gguf = gguf_module()

    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a file without output.weight is read back as tied
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ChatSFTError(f"no GGUF name for the {arch} tensor {hf_name!r}")
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if arch == "llama":
            data = rope_layout(data, gguf_name, config)
        yield gguf_name, data


def rope_layout(data: np.ndarray, gguf_name: str, config: Any) -> np.ndarray:
    """llama.cpp rotates Llama q/k as interleaved pairs, transformers as two halves: reorder the
    rows of each head from halves to pairs (transformers' GGUF loader undoes exactly this)."""
    if gguf_name.endswith("attn_q.weight"):
        heads = config.num_attention_heads
    elif gguf_name.endswith("attn_k.weight"):
        heads = config.num_key_value_heads or config.num_attention_heads
    else:
        return data
    rows = data.shape[0]
    halves = data.reshape(heads, 2, rows // heads // 2, *data.shape[1:])
    return halves.swapaxes(1, 2).reshape(data.shape)


def encode(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """The array to store and its GGML type (None: the writer infers F32/F16 from the dtype)."""
    gguf = gguf_module()

    if data.ndim == 1 or outtype == "f32":
        return data.astype(np.float32), None  # norms and biases stay f32, as llama.cpp keeps them
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return data.astype(np.float16), None  # rows must split into whole Q8_0 blocks
    return gguf.quants.quantize(data, qtype), qtype


# --- tokenizer -------------------------------------------------------------------------------------


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source: str) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    check_byte_level(backend, source)
    tokens, types = token_table(tokenizer, vocab_size, source)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(backend.get("pre_tokenizer"), source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    )
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def check_byte_level(backend: dict, source: str) -> None:
    model_type = backend["model"].get("type")
    text = json.dumps([backend.get("pre_tokenizer"), backend.get("decoder")])
    if model_type != "BPE" or '"ByteLevel"' not in text:
        raise ChatSFTError(
            f"only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style) can be "
            f"exported; this one is {model_type} without a ByteLevel step",
            source=source,
            field="tokenizer",
        )


def token_table(tokenizer: Any, vocab_size: int, source: str) -> tuple[list[str], list[int]]:
    """Every id's token string and GGUF token type; ids the tokenizer lacks (embedding rows padded
    past the vocabulary) become unused `[PADn]` tokens, as llama.cpp's converter writes them."""
    TokenType = gguf_module().TokenType  # noqa: N806
    by_id = {i: t for t, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ChatSFTError(
            f"the tokenizer has ids up to {max(by_id)} but the model embeds only {vocab_size}",
            source=source,
            field="tokenizer",
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def pre_tokenizer_name(pre: dict | None, source: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how the text is split before the merges."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        # llama.cpp's SmolLM split; transformers reads it back without the digit step (as it
        # reads SmolLM's own GGUFs), which differs only where a merge joins a space to a digit.
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        # the first name per regex in transformers' own table, so its reader picks the same split
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == known:
                return name
    raise ChatSFTError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no "
        "llama.cpp name (supported: GPT-2 byte-level, SmolLM digits, and the regex splits "
        "transformers' GGUF reader knows, such as Llama 3's and Qwen2's)",
        source=source,
        field="tokenizer",
    )
