"""Cross-entropy of `hidden @ weight.T` without materialising all logits at once.

The forward pass walks the selected positions in chunks: per chunk it projects through the LM head,
takes the loss in fp32, and immediately computes the gradients for that chunk (dlogits = softmax -
onehot). Peak extra memory is one [chunk, vocab] fp32 block (logits, turned into softmax in
place) instead of [tokens, vocab] logits, their fp32 copy and their gradient (about 17 GB for
11k tokens × 152k vocab in the GPU benchmark). Under autocast the three matmuls per chunk run in
the autocast dtype, as the model's own LM head would (fp32 matmuls on a GPU are several times slower
than bf16 ones); logits, softmax and the loss are fp32 either way. Autocast itself is off inside, so
that the in-place fp32 updates never mix dtypes.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_size):
        device = hidden.device.type
        matmul_dtype = torch.float32
        if torch.is_autocast_enabled(device):
            matmul_dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device_type=device, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(
                ctx, hidden, weight, bias, target, chunk_size, matmul_dtype
            )

    @staticmethod
    def _forward(ctx, hidden, weight, bias, target, chunk_size, matmul_dtype):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(matmul_dtype)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size].to(matmul_dtype)
            t = target[start : start + chunk_size]
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1)
            correct += (picked >= top).sum()  # the target is (one of) the argmax
            # One exp pass serves both the loss (log-sum-exp) and the gradient (softmax).
            exps = logits.sub_(top[:, None]).exp_()
            total = exps.sum(dim=-1)
            loss += (top + total.log() - picked).sum()
            if need_grad:
                # d(sum CE)/d logits = softmax(logits) - onehot(target), computed in place.
                probs = exps.div_(total[:, None])
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                p = probs.to(matmul_dtype)
                grad_hidden[start : start + chunk_size] = (p @ w).to(hidden.dtype)
                if matmul_dtype == torch.float32:
                    grad_weight.addmm_(p.T, h)
                else:
                    grad_weight += (p.T @ h).float()
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        g = grad_loss
        gh = grad_hidden * g.to(grad_hidden.dtype)
        gw = (grad_weight * g).to(ctx.weight_dtype)
        gb = grad_bias * g if ctx.has_bias else None
        return gh, gw, gb, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy over rows of `hidden` [n, d] against `target` [n], with the LM head
    `weight` [vocab, d]; returns (loss_sum, number of argmax hits)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, chunk_size)
