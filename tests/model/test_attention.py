"""Document attention: per-document reference, boundary caching, kernel choice; chunked CE under
autocast. (The CUDA kernels themselves are checked by bench/gpu_checks.py on a GPU.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CountSyncs, make_model

from chatsft.model import attention
from chatsft.model.attention import attention_kernel, document_attention, use_document_attention
from chatsft.model.chunked_ce import chunked_linear_cross_entropy


def reference(q, k, v, lengths):
    """float64 causal attention one document at a time, GQA by repetition; [1, T, H, D] out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs = []
    for qd, kd, vd in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
        n = qd.shape[2]
        scores = qd.double() @ kd.double().transpose(-1, -2) / qd.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(scores.softmax(-1) @ vd.double())
    return torch.cat(outs, 2).transpose(1, 2)


def qkv(total, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, total, 16, generator=g) for h in (4, 2, 2))


def positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_each_batch_gets_its_own_boundaries():
    """Consecutive batches (and an in-place edit of position_ids) never reuse stale boundaries."""
    module = torch.nn.Module().eval()
    for lengths in ([5, 9, 2], [1, 15], [16]):
        q, k, v = qkv(sum(lengths), seed=len(lengths))
        pos = positions(lengths)
        out, _ = document_attention(module, q, k, v, None, position_ids=pos)
        torch.testing.assert_close(out.double(), reference(q, k, v, lengths), atol=1e-5, rtol=0)
    pos.copy_(positions([8, 8]))  # same tensor, new content
    out, _ = document_attention(module, q, k, v, None, position_ids=pos)
    torch.testing.assert_close(out.double(), reference(q, k, v, [8, 8]), atol=1e-5, rtol=0)


def test_boundaries_are_read_once_per_forward(tokenizer, monkeypatch):
    calls = []
    original = attention.cu_seqlens_from_position_ids
    monkeypatch.setattr(
        attention,
        "cu_seqlens_from_position_ids",
        lambda p: calls.append(1) or original(p),
    )
    model = make_model(tokenizer)
    use_document_attention(model)
    lengths = [7, 12, 5]
    ids = torch.randint(3, 50, (1, sum(lengths)))
    model(input_ids=ids, position_ids=positions(lengths))
    assert model.config.num_hidden_layers > 1 and len(calls) == 1


def test_kernel_choice_and_log_line(tokenizer):
    has_varlen = attention._torch_varlen_attn is not None
    gpu_bf16 = attention_kernel("cuda", torch.bfloat16)
    if not attention.HAS_FLASH_ATTN:
        expected = "PyTorch varlen flash attention" if has_varlen else "one causal SDPA"
        assert gpu_bf16.startswith(expected)
    # No fp32 flash kernel and no dropout in the varlen kernels; the CPU operator has no dropout.
    assert attention_kernel("cuda", torch.float32) == "one causal SDPA call per document"
    assert (
        attention_kernel("cpu", torch.bfloat16, dropout=0.1) == "one causal SDPA call per document"
    )
    for dtype in (torch.float32, torch.bfloat16):
        assert attention_kernel("cpu", dtype) == attention.CPU_KERNEL
    if not attention.HAS_FLASH_ATTN:
        assert attention_kernel("cuda", torch.bfloat16, dropout=0.1).startswith("one causal")
    line = use_document_attention(make_model(tokenizer), "cuda", torch.bfloat16)
    assert line == f"attention: document-isolated, {gpu_bf16}; no dense mask over packed rows"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_under_bf16_autocast(with_bias, fused):
    """Under autocast the LM-head matmuls run in bf16 like the model's own head; the loss and the
    softmax stay fp32. Compared with F.cross_entropy over autocast logits."""
    torch.manual_seed(0)
    hidden = torch.randn(70, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.1).requires_grad_()
    bias = torch.randn(300, requires_grad=True) if with_bias else None
    target = torch.randint(0, 300, (70,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_linear_cross_entropy(
            hidden, weight, bias, target, chunk_size=16, fused=fused
        )
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight, bias)
    assert logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), target, reduction="sum")
    want = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm() < 2e-2


def test_host_syncs_per_step_do_not_grow_with_layers(tokenizer):
    """The loss and attention read what they need from the device once per forward (positions to
    keep, document boundaries), never once per layer or per chunk of the loss."""
    from chatsft.model.loss import supervised_loss

    lengths = [7, 12, 5, 9]
    ids = torch.randint(3, 50, (1, sum(lengths)))
    labels = ids.clone()
    labels[0, :3] = -100
    counts = []
    for layers in (2, 4):
        model = make_model(tokenizer, layers=layers)
        use_document_attention(model)
        with CountSyncs() as mode:
            parts, _ = supervised_loss(
                model, {"input_ids": ids, "position_ids": positions(lengths)}, labels, chunked=True
            )
            parts.loss_sum.backward()
        counts.append(mode.count)
    # trained positions, document starts, the longest document, transformers' packed-row check
    assert counts == [4, 4]


def test_cpu_operator_gradients_match_the_reference():
    lengths = [6, 1, 11, 4]
    q, k, v = (x.requires_grad_() for x in qkv(sum(lengths), seed=5))
    out, _ = document_attention(
        torch.nn.Module().eval(), q, k, v, None, position_ids=positions(lengths)
    )
    want = reference(q, k, v, lengths)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), grad.float())
    expected = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
