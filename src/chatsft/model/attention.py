"""Document-isolated attention for padding-free / packed rows, without a dense N×N mask.

A padding-free row holds several documents back to back ([1, total_tokens]); their boundaries are
where position_ids restart at 0 (or `cu_seq_lens_q`, when a caller passes it). The
stock SDPA path would build a [total, total] boolean mask for that; instead each document runs its
own causal attention, through the first of these that applies:
- flash-attn's varlen kernel on CUDA when the optional extra is installed;
- PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`, torch >= 2.10) on CUDA in
  bf16/fp16: one kernel launch per layer, no recompilation, no extra package;
- otherwise one causal attention call per document: on a CPU PyTorch's fused flash kernel (it has
  a backward pass, unlike FlexAttention on CPU), wrapped as one operator (`cpu_attention`); with
  dropout, or fp32 on a GPU, one SDPA call per document.
Boundaries are read once per forward (one host sync), not once per layer; chatsft's loss reads
them before the forward and passes them down (`boundary_kwargs`), so that inside a compiled decoder
layer the PyTorch varlen path has no host sync and needs no graph break.
Everything else (padded batches, generation with a KV cache) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cpu_attention import per_document_attention

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # torch < 2.10
    _torch_varlen_attn = None

ATTN_NAME = "chatsft_docs"
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_VARLEN_PARAMS = (
    set(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn else set()
)
HALF = (torch.bfloat16, torch.float16)
CPU_KERNEL = "one causal flash-attention call per document, as one operator"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[1, T] positions restarting at 0 per document → [num_docs + 1] int32 boundaries."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, total]).to(torch.int32)


@dataclass(frozen=True)
class Boundaries:
    cu: torch.Tensor  # [num_docs + 1] int32, on the model's device
    max_len: int  # the longest document (a Python int, or a symbolic one inside a compiled graph)


# Every layer of one forward receives the same position_ids tensor. Holding a reference to it keeps
# its memory from being reused, so identity (plus its version counter) safely says "same batch".
_last_boundaries: tuple[torch.Tensor, int, Boundaries] | None = None


@torch.compiler.disable  # reads the boundaries back to the host (one sync)
def boundaries(position_ids: torch.Tensor) -> Boundaries:
    """Document boundaries of a [1, T] padding-free row, computed once per batch."""
    global _last_boundaries
    cached = _last_boundaries
    if cached is not None and cached[0] is position_ids and cached[1] == position_ids._version:
        return cached[2]
    cu = cu_seqlens_from_position_ids(position_ids)
    found = Boundaries(cu, int((cu[1:] - cu[:-1]).max()))
    _last_boundaries = (position_ids, position_ids._version, found)
    return found


def boundary_kwargs(b: Boundaries) -> dict:
    """The flash-attention keyword arguments transformers passes from a model's forward down to
    every attention call: given these, document attention never reads position_ids again, and
    its PyTorch varlen path has no host sync, so a compiled decoder layer keeps it in its graph."""
    return {
        "cu_seq_lens_q": b.cu,
        "cu_seq_lens_k": b.cu,
        "max_length_q": b.max_len,
        "max_length_k": b.max_len,
    }


@torch.compiler.disable  # splits by lengths read on the host
def _per_document_sdpa(query, key, value, cu: torch.Tensor, scaling, dropout) -> torch.Tensor:
    gqa = key.shape[1] != query.shape[1]
    offsets = cu.tolist()
    lengths = [e - s for s, e in zip(offsets[:-1], offsets[1:])]
    # split() (not one slice per document): its backward is one concatenation, where slices would
    # each allocate a full-size zero gradient (11% of a demo step with 25 documents per row).
    outs = [
        F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa
        )
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        )
    ]
    return torch.cat(outs, dim=2)


@torch.compiler.disable  # flash-attn's own ops are not known to be traceable: keep it eager
def _flash_varlen(query, key, value, b: Boundaries, scaling, dropout):
    from flash_attn import flash_attn_varlen_func

    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, dim]
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        b.cu,
        b.cu,
        b.max_len,
        b.max_len,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return out.transpose(0, 1).unsqueeze(0)


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the attention would run in (flash kernels have no fp32), or None."""
    if query.dtype in HALF:
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        return dtype if dtype in HALF else None
    return None


def _torch_varlen(query, key, value, b: Boundaries, scaling, dtype: torch.dtype):
    """PyTorch's varlen flash attention; its signature changed between 2.10 and 2.12."""
    q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))
    kwargs: dict = {}  # q, k, v: [T, heads, dim]
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if scaling is not None:
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = scaling
        else:
            q = q * (scaling * math.sqrt(q.shape[-1]))  # the kernel applies 1/sqrt(dim)
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    out = _torch_varlen_attn(q, k, v, b.cu, b.cu, b.max_len, b.max_len, **kwargs)
    return out.transpose(0, 1).unsqueeze(0)


def attention_kernel(device_type: str, dtype: torch.dtype | None, dropout: float = 0.0) -> str:
    """Which kernel document attention uses for these inputs (also what the log says)."""
    if device_type == "cuda" and HAS_FLASH_ATTN:
        return "flash-attn varlen"
    if device_type == "cuda" and _torch_varlen_attn and dtype in HALF and not dropout:
        return "PyTorch varlen flash attention"
    if device_type == "cpu" and not dropout:
        return CPU_KERNEL
    return "one causal SDPA call per document"


def document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, heads, T, dim] → output [batch, T, heads, dim], as transformers expects.

    Boundaries come from `cu_seq_lens_q` / `max_length_q` when the caller passes them (chatsft's
    loss does, see `boundary_kwargs`), else from position_ids."""
    single_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    position_ids = kwargs.get("position_ids")
    given = kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None
    from_positions = position_ids is not None and position_ids.shape[0] == 1
    if attention_mask is not None or not single_row or not (given or from_positions):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if given:
        bounds = Boundaries(kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["max_length_q"])
    else:
        bounds = boundaries(position_ids)
    dropout = dropout if module.training else 0.0
    half = _half_dtype(query)
    kernel = attention_kernel(query.device.type, half, dropout)
    if kernel == "flash-attn varlen":
        out = _flash_varlen(query, key, value, bounds, scaling, dropout)
    elif kernel == "PyTorch varlen flash attention":
        out = _torch_varlen(query, key, value, bounds, scaling, half)
    elif kernel == CPU_KERNEL:
        out = per_document_attention(query, key, value, bounds.cu, scaling)
    else:
        out = _per_document_sdpa(query, key, value, bounds.cu, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def document_mask(*args, **kwargs):
    """No mask for a padding-free row (the attention separates documents itself); the usual SDPA
    mask whenever there is padding or a cache offset."""
    q_length = kwargs.get("q_length")
    no_offsets = not kwargs.get("q_offset") and not kwargs.get("kv_offset")
    if kwargs.get("attention_mask") is None and no_offsets and q_length == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_NAME, document_attention)
AttentionMaskInterface.register(ATTN_NAME, document_mask)


def _uses_windows_or_softcap(config) -> bool:
    return "sliding_attention" in (getattr(config, "layer_types", None) or []) or bool(
        getattr(config, "attn_logit_softcapping", None)
    )


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A peft prompt-learning model (prompt tuning, p-tuning, prefix tuning): its forward prepends
    virtual tokens (or a prefix cache) and ignores position_ids and logits_to_keep."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def keeps_documents_apart(model: torch.nn.Module) -> bool:
    """Does this model, as it is, keep two documents of one row apart through position_ids alone?

    Checked by running it: the second document's logits in a packed row must equal its logits when
    it is alone. For the dense-mask path (windows, soft-capping, sinks), where it is up to each
    architecture's mask code to read position_ids (GPT-OSS's does not). Costs one no-grad forward
    of 12 tokens, in eval mode so dropout cannot differ between the two runs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(base.parameters())
    vocab = base.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=generator).to(param.device)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(param.device)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            packed = base(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 5:]
            alone = base(input_ids=ids[:, 5:], use_cache=False).logits[0]
    finally:
        base.train(was_training)
    tolerance = 1e-3 if param.dtype == torch.float32 else 3e-2
    scale = alone.float().abs().max().clamp(min=1.0)
    return bool(((packed.float() - alone.float()).abs().max() <= tolerance * scale).item())


# Class-name parts of token mixers that carry state along the sequence instead of attending.
_RECURRENT_NAMES = ("Mamba", "SSM", "GatedDeltaNet", "LinearAttention", "Rwkv", "RWKV", "Recurrent")


def sequence_state_mixers(model: torch.nn.Module) -> list[str]:
    """Class names of layers that mix tokens outside attention: Mamba/SSM scans, short causal
    convolutions (a depthwise Conv1d), linear attention. They ignore position_ids, so in a
    packed or padding-free row one document's state runs into the next."""
    found = set()
    for module in model.modules():
        name = type(module).__name__
        if any(part in name for part in _RECURRENT_NAMES):
            found.add(name)
        for child in module.children():
            if isinstance(child, torch.nn.Conv1d) and child.groups == child.in_channels > 1:
                found.add(name)
    return sorted(found)


def isolates_without_dense_mask(model: torch.nn.Module) -> bool:
    """True if padding-free rows cost this model nothing extra: flash-attn's varlen path, or an
    SDPA/eager model that chatsft's document attention can take over."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel) or sequence_state_mixers(base):
        return False
    current = base.config._attn_implementation
    if current in (ATTN_NAME,) or str(current).startswith("flash_attention"):
        return True
    return current in ("sdpa", "eager", None) and not _uses_windows_or_softcap(base.config)


def use_document_attention(
    model: torch.nn.Module, device_type: str = "cpu", dtype: torch.dtype | None = None
) -> str | None:
    """Switch an SDPA/eager transformers model to document attention. Returns a line for the log
    naming the kernel that will run on `device_type` with activations in `dtype`, or None if the
    model keeps its own implementation (flash-attn handles packed rows natively)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return None
    config = base.config
    current = config._attn_implementation
    if current not in ("sdpa", "eager", None):
        return f"attention: {current} (handles packed rows through position_ids)"
    if _uses_windows_or_softcap(config):
        # Sliding windows and soft-capping are not implemented per document: keep transformers'
        # own path, which isolates packed documents with a dense mask (correct, slower).
        return f"attention: {current} with a dense document mask (model uses windows/soft-capping)"
    base.set_attn_implementation(ATTN_NAME)
    kernel = attention_kernel(device_type, dtype)
    return f"attention: document-isolated, {kernel}; no dense mask over packed rows"


def shared_rows_refusal(model: torch.nn.Module) -> str | None:
    """Why this model cannot train several documents in one row (packing, padding-free) without
    them seeing each other; None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return "a plain torch module cannot be told where documents start (position_ids)"
    if is_prompt_learning(model):
        return (
            "peft's prompt-learning models (prompt tuning, p-tuning, prefix tuning) ignore the "
            "position_ids that separate documents"
        )
    mixers = sequence_state_mixers(base)
    if mixers:
        return (
            f"this model's {', '.join(mixers)} layers carry state along the row (they ignore "
            "position_ids), so each document would see the one before it"
        )
    # Only the dense-mask path (SDPA/eager with windows or soft-capping) is checked by running it:
    # flash-style kernels (transformers' or the hub's) take documents from position_ids.
    dense = base.config._attn_implementation in ("sdpa", "eager", None)
    if dense and not isolates_without_dense_mask(base) and not keeps_documents_apart(base):
        return (
            f"{type(base).__name__}'s attention mask does not follow the position_ids that "
            "separate documents, so they would attend to each other"
        )
    return None
