"""Cross-entropy of `hidden @ weight.T` without materialising all logits at once.

The forward pass walks the selected positions in chunks: per chunk it projects through the LM head,
takes the loss in fp32, and immediately computes the gradients for that chunk (dlogits = softmax -
onehot). Peak extra memory is one [chunk, vocab] block instead of [tokens, vocab] logits, their
fp32 copy and their gradient (about 17 GB for 11k tokens × 152k vocab in the GPU benchmark).

Under autocast the three matmuls per chunk run in the autocast dtype, as the model's own LM head
would (fp32 matmuls on a GPU are several times slower than bf16 ones); the loss is fp32 either way.
How the per-chunk softmax is computed depends on what is scarce (`_chunk_loss`): on a GPU, memory
traffic (fused log-softmax and softmax kernels over the 16-bit logits, and the head's gradient
accumulated straight into fp32 by the matmul); on a CPU, exp (computed once per logit, in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ADDMM_FP32_OUT: dict[torch.device, bool] = {}


def _addmm_fp32_out_works(device: torch.device) -> bool:
    """Whether this device accumulates a 16-bit product straight into an fp32 tensor
    (`torch.addmm(..., out_dtype=float32)`: CUDA in recent PyTorch). Checked once per device on a
    tiny case, so an older build or another backend falls back to the cast-and-add path."""
    if device not in _ADDMM_FP32_OUT:
        works = False
        if device.type == "cuda":
            try:
                a = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                works = bool((acc == 9).all())
            except (RuntimeError, TypeError):
                works = False
        _ADDMM_FP32_OUT[device] = works
    return _ADDMM_FP32_OUT[device]


def _chunk_loss(
    logits: torch.Tensor, t: torch.Tensor, need_grad: bool, fused: bool, dft: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed fp32 loss, argmax hits, d loss / d logits in the logits' dtype or None) for one
    chunk of logits [rows, vocab] against targets t [rows, 1].

    d(sum CE)/d logits = softmax(logits) - onehot(target). `fused` (for GPUs, where these passes are
    memory-bound) uses the fused log-softmax and softmax kernels: ~20 bytes of memory traffic per
    logit against ~44 for the separate passes. Without it (for CPUs, where exp is the cost) exp runs
    once per logit, in place. `dft` weights each row's loss, and so its gradient, by the target's
    probability, held constant (Dynamic Fine-Tuning)."""
    picked = logits.gather(1, t)
    top = logits.amax(dim=-1, keepdim=True)
    correct = (picked >= top).sum()  # the target is (one of) the argmax
    if fused:
        logp_target = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, t)
        weight = logp_target.exp() if dft else None
        loss = -(logp_target * weight).sum() if dft else -logp_target.sum()
        if not need_grad:
            return loss, correct, None
        probs = torch.softmax(logits, dim=-1)
        # The target entry from the fp32 log-probability, so that it is rounded once.
        probs.scatter_(1, t, (logp_target.exp() - 1.0).to(probs.dtype))
        if dft:
            probs.mul_(weight.to(probs.dtype))
        return loss, correct, probs
    exps = logits.float().sub_(top.float()).exp_()  # a fresh fp32 block unless already fp32
    total = exps.sum(dim=-1, keepdim=True)
    nll = top.float() + total.log() - picked.float()  # [rows, 1]
    weight = torch.exp(-nll) if dft else None
    loss = (nll * weight).sum() if dft else nll.sum()
    if not need_grad:
        return loss, correct, None
    probs = exps.div_(total)
    probs.scatter_add_(1, t, torch.full_like(total, -1.0))
    if dft:
        probs.mul_(weight)
    return loss, correct, probs.to(logits.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_size, fused, dft):
        device = hidden.device.type
        matmul_dtype = torch.float32
        if torch.is_autocast_enabled(device):
            matmul_dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device_type=device, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(
                ctx, hidden, weight, bias, target, chunk_size, matmul_dtype, fused, dft
            )

    @staticmethod
    def _forward(ctx, hidden, weight, bias, target, chunk_size, matmul_dtype, fused, dft):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(matmul_dtype)
        b = bias.to(matmul_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        fp32_out = matmul_dtype != torch.float32 and _addmm_fp32_out_works(hidden.device)
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size].to(matmul_dtype)
            t = target[start : start + chunk_size, None]
            logits = F.linear(h, w, b)  # oneDNN on CPUs where the trainer routes it there
            chunk_loss, chunk_correct, probs = _chunk_loss(logits, t, need_grad, fused, dft)
            loss += chunk_loss
            correct += chunk_correct
            if not need_grad:
                continue
            grad_hidden[start : start + chunk_size] = probs @ w
            if matmul_dtype == torch.float32:
                grad_weight.addmm_(probs.T, h)
            elif fp32_out:
                torch.addmm(grad_weight, probs.T, h, out_dtype=torch.float32, out=grad_weight)
            else:
                grad_weight += (probs.T @ h).float()
            if grad_bias is not None:
                grad_bias += probs.sum(0, dtype=torch.float32)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.backward_done = False
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        if ctx.backward_done:
            # The gradients were scaled in place (no second full-size copy at the moment all
            # activations are still alive), so they cannot serve a second backward.
            raise RuntimeError("chunked cross-entropy supports one backward pass per forward")
        ctx.backward_done = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        gh = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        gb = grad_bias.mul_(grad_loss) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    chunk_size: int = 4096,
    fused: bool | None = None,
    dft: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over rows of `hidden` [n, d] against `target` [n], with the LM head
    `weight` [vocab, d]; returns (loss_sum, number of argmax hits). `fused` picks the per-chunk
    softmax arithmetic (see `_chunk_loss`); None: fused on CUDA, not elsewhere. `dft`: each row's
    loss weighted by its target's detached probability (loss_type "dft")."""
    if fused is None:
        fused = hidden.device.type == "cuda"
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, chunk_size, fused, dft)
