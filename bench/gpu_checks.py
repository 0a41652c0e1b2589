"""Correctness checks of chatsft's GPU-only code paths, run before any GPU timing.

1. Document attention in bf16 on CUDA (the kernel the trainer picks) against a float64 reference:
   one causal softmax attention per document, forward output and q/k/v gradients, with GQA.
2. The chunked cross-entropy under bf16 autocast against F.cross_entropy on bf16-autocast logits.
3. A small Qwen2 under bf16 autocast: summed loss and gradients of packed (padding-free) documents
   against the same documents one per row, padded.
4. The same model with compiled decoder layers against eager: no graph break, no recompilation per
   batch, same loss and gradients.

Prints one line per check and exits non-zero if any fails.
    python bench/gpu_checks.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def reference_attention(q, k, v, lengths, scale):
    """float64, one document at a time, causal, GQA by repetition. [1, H, T, D] in and out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs = []
    for qd, kd, vd in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
        n = qd.shape[2]
        scores = (qd.double() @ kd.double().transpose(-1, -2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(scores.softmax(-1) @ vd.double())
    return torch.cat(outs, 2)


def check_attention() -> bool:
    from chatsft.model.attention import attention_kernel, document_attention

    torch.manual_seed(0)
    lengths = [300, 5, 1200, 1, 543]
    total, heads, kv_heads, dim = sum(lengths), 14, 2, 64
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(
        1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    v = torch.randn(
        1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    module = torch.nn.Module().train()
    scale = dim**-0.5
    out, _ = document_attention(module, q, k, v, None, scaling=scale, position_ids=position_ids)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    got = [out.transpose(1, 2), q.grad, k.grad, v.grad]

    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qr, kr, vr, lengths, scale)
    (ref * grad_out.transpose(1, 2).double()).sum().backward()
    want = [ref, qr.grad, kr.grad, vr.grad]
    errors = [rel(a, b) for a, b in zip(got, want)]
    kernel = attention_kernel("cuda", torch.bfloat16)
    ok = max(errors) < 2e-2
    names = ["out", "dq", "dk", "dv"]
    print(
        f"{'PASS' if ok else 'FAIL'} attention ({kernel}) vs float64 per-document reference: "
        + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
    )
    return ok


def check_chunked_ce() -> bool:
    from chatsft.model.chunked_ce import _addmm_fp32_out_works, chunked_linear_cross_entropy

    torch.manual_seed(1)
    n, d, vocab = 3000, 896, 151936
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, d, device="cuda") * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, correct = chunked_linear_cross_entropy(hidden, weight, None, target, 1024)
    loss.backward()
    got = [loss.detach(), hidden.grad, weight.grad]
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = h2 @ w2.T
    ref = F.cross_entropy(logits.float(), target, reduction="sum")
    ref.backward()
    errors = [rel(a, b) for a, b in zip(got, [ref.detach(), h2.grad, w2.grad])]
    ok = max(errors) < 2e-2 and got[0].dtype == torch.float32
    print(
        f"{'PASS' if ok else 'FAIL'} chunked CE under bf16 autocast vs F.cross_entropy: "
        f"loss {errors[0]:.1e}, d hidden {errors[1]:.1e}, d weight {errors[2]:.1e} "
        f"(fused softmax kernels; head gradient accumulated in fp32 by the matmul: "
        f"{_addmm_fp32_out_works(hidden.device)})"
    )
    return ok


def two_layer_qwen2(seed: int) -> torch.nn.Module:
    """The GPU workload's Qwen2-0.5B shape (bench/vs_trl.py) cut to 2 layers, SDPA, on CUDA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from vs_trl import QWEN2_05B  # bench/ is on sys.path when this file runs as a script

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": 2}, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).cuda()


def check_packed_model() -> bool:
    from chatsft.data.collate import PaddedCollator, PaddingFreeCollator
    from chatsft.model.attention import use_document_attention
    from chatsft.model.loss import supervised_loss

    model = two_layer_qwen2(seed=2)
    line = use_document_attention(model, "cuda", torch.bfloat16)
    rows = []
    for n in (700, 33, 1500, 260):
        ids = torch.randint(0, 150000, (n,)).tolist()
        mask = [i >= n // 3 for i in range(n)]
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})

    def run(batch):
        model.zero_grad()
        labels = batch.pop("labels").cuda()
        inputs = {k: v.cuda() for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts, _ = supervised_loss(model, inputs, labels, chunked=True)
        parts.loss_sum.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return parts.loss_sum.detach(), grads, int(parts.num_tokens)

    loss_p, grad_p, n_p = run(PaddingFreeCollator()(rows))
    loss_u, grad_u, n_u = run(PaddedCollator(pad_token_id=0)(rows))
    err_loss, err_grad = rel(loss_p, loss_u), rel(grad_p, grad_u)
    ok = n_p == n_u and err_loss < 1e-2 and err_grad < 3e-2
    print(
        f"{'PASS' if ok else 'FAIL'} packed vs padded Qwen2 (2 layers, bf16 autocast; {line}): "
        f"trained tokens {n_p} vs {n_u}, loss rel {err_loss:.1e}, grads rel {err_grad:.1e}"
    )
    return ok


def check_compiled_layers() -> bool:
    """Compiled decoder layers keep the varlen attention in their graph (no graph break, no
    recompile per batch) and train like eager: loss and gradients of three packed batches."""
    import copy

    from chatsft.data.collate import PaddingFreeCollator
    from chatsft.model.attention import use_document_attention
    from chatsft.model.compile import compile_decoder_layers
    from chatsft.model.loss import supervised_loss

    eager = two_layer_qwen2(seed=3)
    use_document_attention(eager, "cuda", torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compile_decoder_layers(compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    worst_loss = worst_grad = 0.0
    for lengths in ((700, 33, 1500, 260), (2048,), (5, 900, 901, 1, 640)):
        rows = [
            {"input_ids": (ids := torch.randint(0, 150000, (n,)).tolist()), "labels": ids}
            for n in lengths
        ]
        batch = PaddingFreeCollator()(rows)
        labels = batch.pop("labels").cuda()
        inputs = {k: v.cuda() for k, v in batch.items()}
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                parts, _ = supervised_loss(model, inputs, labels, chunked=True)
            parts.loss_sum.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((parts.loss_sum.detach(), grads))
        worst_loss = max(worst_loss, rel(results[1][0], results[0][0]))
        worst_grad = max(worst_grad, rel(results[1][1], results[0][1]))
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    ok = breaks == 0 and graphs <= 2 and worst_loss < 1e-2 and worst_grad < 3e-2
    print(
        f"{'PASS' if ok else 'FAIL'} compiled layers vs eager (2-layer Qwen2, 3 packed batches): "
        f"graph breaks {breaks}, graphs {graphs}, loss rel {worst_loss:.1e}, "
        f"grads rel {worst_grad:.1e}"
    )
    if breaks:
        print("  graph breaks:", list(counters["graph_break"])[:3])
    return ok


def probe_matmul_host_time() -> None:
    """Not a check, a measurement: host microseconds per bf16 matmul launch with the workload's
    layer shapes, when the token count M repeats and when it changes every call (as it does from
    one padding-free batch to the next). The 2026-11-30 profile had aten::mm at ~113 us of host
    time per call; if new shapes cost far more than repeated ones, rounding rows up
    (pad_to_multiple_of) is the fix."""
    w = torch.randn(4864, 896, device="cuda", dtype=torch.bfloat16)
    xs = {m: torch.randn(m, 896, device="cuda", dtype=torch.bfloat16) for m in (16000, 16384)}
    big = torch.randn(16384 + 200 * 7, 896, device="cuda", dtype=torch.bfloat16)
    for x in xs.values():
        x @ w.T
    torch.cuda.synchronize()
    results = {}
    for name, inputs in (
        ("same M", [xs[16000]] * 200),
        ("new M each call", [big[: 16000 + 7 * i] for i in range(1, 201)]),
    ):
        start = time.perf_counter()
        for x in inputs:
            x @ w.T
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        results[name] = host / len(inputs) * 1e6
    print(
        "probe: host time per bf16 matmul launch "
        + ", ".join(f"{k}: {v:.1f} us" for k, v in results.items())
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("error: these checks need a CUDA GPU")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = [check_attention(), check_chunked_ce(), check_packed_model(), check_compiled_layers()]
    probe_matmul_host_time()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
