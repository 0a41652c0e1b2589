"""The activation-memory formula: what autograd keeps per token for a Llama/Qwen-style decoder
layer (attention + gated MLP + two RMSNorms), with and without gradient checkpointing, and the
buffers of chatsft's chunked loss. Checked against measured memory by
`bench/estimate_vs_measured.py`."""

from __future__ import annotations

import torch

from ..model.loss import CHUNK_ELEMENTS
from .meta_model import ATTN_INPUTS, MLP_INPUTS, MetaModel

# Backward working set on top of the saved activations, per token of the layer being
# differentiated: the incoming gradient of the residual stream and the gradients flowing through
# the MLP (grad of the product, of the activation and of `up`, of `gate`) are alive together.
# Counted from the autograd graph; in the benchmark configs the peak falls elsewhere (the loss),
# so these two numbers are not calibrated by measurement.
BWD_INTERMEDIATE_TENSORS = 2
BWD_HIDDEN_TENSORS = 2


def precision_mode(weight_dtype: torch.dtype, mixed: bool) -> str:
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


def layer_bytes_per_token(model: MetaModel, mode: str, seq_len: int, repeat_kv: bool) -> int:
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


def activation_parts(
    model: MetaModel, mode: str, tokens: int, seq_len: int, repeat_kv: bool, every_n: int = 1
) -> dict[str, int]:
    """Activation bytes for `tokens` tokens: one layer, all layers, what checkpointing keeps
    through the forward and at its backward peak, and the backward working set."""
    s = model.shape
    residual = 4 if model.weight_dtype == torch.float32 else 2
    a = 4 if mode == "fp32" else 2
    layer = tokens * layer_bytes_per_token(model, mode, seq_len, repeat_kv)
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


def loss_buffers(model: MetaModel, tokens: int, mode: str) -> tuple[int, int]:
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
    # The chunk rule of model/loss.py, with its CHUNK_ELEMENTS.
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
