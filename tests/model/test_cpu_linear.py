"""fp32 linear layers through oneDNN on CPUs (model/cpu_linear.py): same values and gradients as
F.linear, only where eligible, chosen by vendor and $CHATSFT_CPU_MATMUL, and training unchanged."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from chatsft import SFTTrainer
from chatsft.errors import ChatSFTError
from chatsft.model import cpu_linear
from chatsft.model.cpu_linear import OneDNNLinears, choose, onednn_linear
from tests.conftest import chats, make_model, sft_config

pytestmark = pytest.mark.skipif(
    not cpu_linear._works(), reason="this PyTorch build has no oneDNN linear"
)


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).float() for s in shapes]


@pytest.mark.parametrize("x_shape", [(7, 12), (2, 5, 12)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_f_linear(x_shape, with_bias):
    x, w, b, grad = _leaves(x_shape, (9, 12), (9,), (*x_shape[:-1], 9))
    results = []
    for fn in (F.linear, onednn_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        out = fn(leaves[0], leaves[1], leaves[2] if with_bias else None)
        out.backward(grad)
        results.append((out, *(t.grad for t in leaves)))
        if fn is onednn_linear:
            assert "OneDNNLinear" in out.grad_fn.name()
    (ref, *ref_grads), (got, *got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for r, g in zip(ref_grads[:2], got_grads[:2]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(got_grads[2], ref_grads[2], rtol=1e-5, atol=1e-5)
    else:
        assert got_grads[2] is None


def test_a_frozen_weight_gets_no_gradient():
    """LoRA's base layers: only the input's gradient is computed."""
    x, w = _leaves((6, 8), (4, 8))
    x.requires_grad_(True)
    out = onednn_linear(x, w)
    x_saved, w_saved = out.grad_fn.saved_tensors
    assert x_saved is None and w_saved is w  # the input is not kept alive for a frozen weight
    out.sum().backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, torch.ones(6, 4) @ w, rtol=1e-5, atol=1e-5)


def test_the_mode_routes_only_plain_fp32_cpu_linears():
    x, w = _leaves((6, 8), (4, 8))
    w.requires_grad_(True)
    layer = torch.nn.Linear(8, 4)
    with OneDNNLinears():
        assert "OneDNNLinear" in F.linear(x, w).grad_fn.name()
        assert "OneDNNLinear" in layer(x).grad_fn.name()  # modules call F.linear
        kept = F.linear(x.bfloat16(), w.bfloat16())  # not fp32
        assert "OneDNNLinear" not in kept.grad_fn.name()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = F.linear(x, w)  # autocast decides: bf16, as without the mode
        assert cast.dtype == torch.bfloat16
        vector = F.linear(x[0], w)  # a 1-D input
        assert "OneDNNLinear" not in vector.grad_fn.name()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing
            assert "OneDNNLinear" not in F.linear(x, w).grad_fn.name()
    assert "OneDNNLinear" not in F.linear(x, w).grad_fn.name()  # only while active


@pytest.mark.parametrize(
    ("env", "vendor", "device", "dtype", "compiled", "used"),
    [
        ("auto", "AuthenticAMD", "cpu", torch.float32, False, True),
        ("auto", "GenuineIntel", "cpu", torch.float32, False, False),
        ("auto", None, "cpu", torch.float32, False, False),  # not x86, or not Linux
        ("onednn", "GenuineIntel", "cpu", torch.float32, False, True),
        ("aten", "AuthenticAMD", "cpu", torch.float32, False, False),
        ("auto", "AuthenticAMD", "cuda", torch.float32, False, False),
        ("auto", "AuthenticAMD", "cpu", torch.bfloat16, False, False),
        ("auto", "AuthenticAMD", "cpu", torch.float32, True, False),
    ],
)
def test_choice(monkeypatch, env, vendor, device, dtype, compiled, used):
    monkeypatch.setenv(cpu_linear.ENV, env)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    use, line = choose(device, dtype, compiled)
    assert use is used
    if used:
        assert "oneDNN" in line and f"{cpu_linear.ENV}=aten" in line
    else:
        assert line is None


def test_an_explicit_request_that_cannot_apply_says_why(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "onednn")
    assert choose("cpu", torch.bfloat16, False) == (
        False,
        f"{cpu_linear.ENV}=onednn ignored: activations are not fp32",
    )


def test_a_bad_setting_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    with pytest.raises(ChatSFTError, match=r"CHATSFT_CPU_MATMUL='mkl' is not one of auto"):
        choose("cpu", torch.float32, False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_through_onednn_matches_pytorch_matmul(
    tmp_path, tokenizer, monkeypatch, capsys, checkpointing
):
    """Same losses and weights with either matmul, every parameter trained; checkpointed layers
    keep PyTorch's path in the forward too (their recomputation runs outside the mode)."""
    runs = []
    for setting in ("aten", "onednn"):
        monkeypatch.setenv(cpu_linear.ENV, setting)
        trainer = SFTTrainer(
            model=make_model(tokenizer, seed=1),
            args=sft_config(
                tmp_path, max_steps=3, gradient_checkpointing=checkpointing, learning_rate=1e-3
            ),
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(chats(12)),
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        after = dict(trainer.model.named_parameters())
        assert all(not torch.equal(before[n], after[n]) for n in before), setting
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs.append((losses, after))
        where = " outside gradient-checkpointed layers" if checkpointing else ""
        said = f"fp32 linear layers run through oneDNN{where} (" in capsys.readouterr().out
        assert said == (setting == "onednn")
    (ref_losses, ref), (losses, got) = runs
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, param in ref.items():
        torch.testing.assert_close(got[name], param, rtol=1e-4, atol=1e-5)
