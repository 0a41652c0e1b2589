"""Per-document causal attention on the CPU as one opaque operator.

Packed rows on a CPU run one causal attention per document (PyTorch's fused CPU flash kernel, which
has a backward pass, unlike FlexAttention on CPU). Doing that as a Python loop over documents needs
the boundaries on the host, which `torch.compile` cannot trace: the compiled decoder layer would
break in two at the attention call. Wrapped as a `torch.library` custom op, the loop reads the
boundaries inside the operator, so a compiled layer stays one graph, and the backward is one call
per document of the kernel's own backward instead of autograd through a split and a concatenation.
"""

from __future__ import annotations

import torch

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _spans(cu: torch.Tensor) -> list[tuple[int, int]]:
    offsets = cu.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def _bthd(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, ...] → a new contiguous [B, T, H, ...] (the layout the kernel writes)."""
    return x.new_empty((x.shape[0], x.shape[2], x.shape[1], *x.shape[3:]))


# Inputs are [B, H, T, D] (any strides); outputs are contiguous and token-major ([B, T, H, D],
# [B, T, H]): the kernel writes that layout, so each document's result copies in contiguously and
# transformers' [B, T, H, D] view of the output needs no copy.
@torch.library.custom_op("chatsft::per_document_attention", mutates_args=())
def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _bthd(query), _bthd(query[..., 0]).float()
    for s, e in _spans(cu):
        o, lse_doc = _forward(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], 0.0, True, scale=scale
        )
        out[:, s:e] = o.transpose(1, 2)
        lse[:, s:e] = lse_doc.transpose(1, 2)
    return out, lse


@_attention.register_fake
def _(query, key, value, cu, scale):
    return _bthd(query), _bthd(query[..., 0]).float()


@torch.library.custom_op("chatsft::per_document_attention_backward", mutates_args=())
def _attention_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad, out: [B, T, H, D]; lse [B, T, H] → d query, key, value as [B, T, H(kv), D]."""
    grads = [_bthd(x) for x in (query, key, value)]
    for s, e in _spans(cu):
        doc = _backward(
            grad[:, s:e].transpose(1, 2),
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            out[:, s:e].transpose(1, 2),
            lse[:, s:e].transpose(1, 2),
            0.0,
            True,
            scale=scale,
        )
        for g, d in zip(grads, doc):
            g[:, s:e] = d.transpose(1, 2)
    return tuple(grads)


@_attention_backward.register_fake
def _(grad, query, key, value, out, lse, cu, scale):
    return tuple(_bthd(x) for x in (query, key, value))


def _setup(ctx, inputs, output):
    query, key, value, cu, scale = inputs
    ctx.save_for_backward(query, key, value, *output, cu)
    ctx.scale = scale


def _grad(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, cu = ctx.saved_tensors
    grads = _attention_backward(grad_out, query, key, value, out, lse, cu, ctx.scale)
    return (*(g.transpose(1, 2) for g in grads), None, None)


_attention.register_autograd(_grad, setup_context=_setup)


def per_document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within each document of a packed row: query [1, heads, T, dim], key and
    value [1, kv_heads, T, dim] (GQA when fewer), `cu` the [num_docs + 1] document offsets.
    Returns [1, heads, T, dim]. CPU tensors, no dropout."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    # Like SDPA under autocast: one dtype for all three (the rotary embedding can leave query and
    # key in fp32 while value is bf16).
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    query, key, value = (x.to(dtype) for x in (query, key, value))
    out, _ = _attention(query, key, value, cu, float(scale))
    return out.transpose(1, 2)
