"""A compiled decoder layer keeps document attention in its graph: no graph break, no
recompilation per batch, the same loss and gradients as eager.

Both kernels are checked: the CPU's per-document operator as it is, and the GPU's PyTorch varlen
path through a CPU stand-in with the same calling convention (a torch.library custom op, as
PyTorch's is); bench/gpu_checks.py runs the real varlen kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from chatsft.model import attention
from chatsft.model.attention import use_document_attention
from chatsft.model.compile import compile_decoder_layers
from chatsft.model.loss import supervised_loss


def _per_document(q, k, v, cu, scale):
    """q [T, H, D], k/v [T, Hk, D] → [T, H, D]: causal attention one document at a time."""
    offsets = cu.tolist()
    outs = []
    for s, e in zip(offsets[:-1], offsets[1:]):
        qd, kd, vd = (x[s:e].transpose(0, 1) for x in (q, k, v))
        outs.append(
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
        )
    return torch.cat(outs, 1).transpose(0, 1).contiguous()


@torch.library.custom_op("chatsft_test::varlen", mutates_args=())
def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float) -> torch.Tensor:  # fmt: skip
    assert max_len == int((cu[1:] - cu[:-1]).max())
    return _per_document(q, k, v, cu, scale)


@_varlen.register_fake
def _(q, k, v, cu, max_len, scale):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.scale = inputs[5]


@torch.library.custom_op("chatsft_test::varlen_backward", mutates_args=())
def _varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    # Written out by hand: a custom op's body runs below autograd.
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    offsets = cu.tolist()
    for s, e in zip(offsets[:-1], offsets[1:]):
        qd = q[s:e].transpose(0, 1)  # [H, n, D]
        kd, vd = (x[s:e].transpose(0, 1).repeat_interleave(groups, 0) for x in (k, v))
        go = grad[s:e].transpose(0, 1)
        n = e - s
        scores = (qd @ kd.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        p = scores.softmax(-1)
        dp = go @ vd.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[s:e] = ((ds @ kd) * scale).transpose(0, 1)
        dk_full, dv_full = (ds.transpose(-1, -2) @ qd) * scale, p.transpose(-1, -2) @ go
        dk[s:e] = dk_full.unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
        dv[s:e] = dv_full.unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
    return dq, dk, dv


@_varlen_backward.register_fake
def _(grad, q, k, v, cu, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = torch.ops.chatsft_test.varlen_backward(grad, q, k, v, cu, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen.register_autograd(_backward, setup_context=_setup)


def _stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False, **_):
    return torch.ops.chatsft_test.varlen(q, k, v, cu_q, max_q, scale)


def _batch(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)
    labels[0, starts] = -100
    return {"input_ids": ids, "position_ids": positions}, labels


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["cpu operator", "varlen stand-in"])
def test_compiled_layer_keeps_attention_in_its_graph(tokenizer, monkeypatch, kernel):
    eager = make_model(tokenizer, hidden=64, layers=2)
    use_document_attention(eager)
    compiled = copy.deepcopy(eager)
    compile_decoder_layers(compiled)

    real_kernel = attention.attention_kernel
    varlen = real_kernel
    if kernel == "varlen stand-in":
        monkeypatch.setattr(attention, "_torch_varlen_attn", _stand_in)
        monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"enable_gqa", "scale", "window_size"})
        monkeypatch.setattr(attention, "_half_dtype", lambda q: q.dtype)
        varlen = lambda *a, **k: "PyTorch varlen flash attention"  # noqa: E731
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for i, lengths in enumerate(([5, 9, 2, 14], [1, 20, 3], [7, 7, 7, 7, 2], [30])):
        inputs, labels = _batch(lengths, len(tokenizer), seed=i)
        grads = []
        for model, choose in ((eager, real_kernel), (compiled, varlen)):
            monkeypatch.setattr(attention, "attention_kernel", choose)
            model.zero_grad()
            parts, _ = supervised_loss(model, inputs, labels, chunked=True)
            parts.loss_sum.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            if model is eager:
                want = parts.loss_sum.detach()
            else:
                torch.testing.assert_close(parts.loss_sum.detach(), want, rtol=1e-5, atol=1e-5)
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph per layer call site shape class: four different batches compile at most twice
    # (the first batch, then once more with sizes made dynamic), never once per batch.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("attn", ["chatsft_docs", "sdpa"])
def test_boundaries_are_passed_only_to_document_attention(tokenizer, attn):
    from chatsft.model.loss import with_document_boundaries

    model = make_model(tokenizer)
    if attn == "chatsft_docs":
        use_document_attention(model)
    inputs, _ = _batch([3, 4], len(tokenizer), seed=0)
    out = with_document_boundaries(model, inputs)
    if attn == "sdpa":
        assert out is inputs
    else:
        assert out["cu_seq_lens_q"].tolist() == [0, 3, 7] and out["max_length_q"] == 4
        assert out["cu_seq_lens_q"].dtype == torch.int32
