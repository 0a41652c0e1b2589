"""fp32 linear layers on x86 CPUs through oneDNN instead of PyTorch's BLAS (MKL).

PyTorch computes an fp32 `F.linear` on a CPU with MKL's sgemm. On AMD processors MKL does not pick
its best kernels: measured on a 2-core AMD EPYC (AVX-512), `x @ W.T` for SmolLM2's layer shapes
ran at 110–190 GFLOP/s through MKL and 180–210 through oneDNN (the library PyTorch already ships
for its bf16 and quantized CPU kernels), and a whole decoder layer's forward and backward took
4–6% less time (docs/benchmarks.md, "oneDNN linear layers"). The arithmetic is the same fp32 matrix
product (no reduced-precision mode); results differ from MKL's by summation order only.

`OneDNNLinears` is a `TorchFunctionMode`: while active (the trainer enters it around each training
and evaluation step) it sends every eligible `F.linear` call — the model's projections, LoRA's
adapters, the chunked loss's LM head — to `_OneDNNLinear`, whose backward computes the input
gradient through oneDNN too and the weight gradient through PyTorch's `mm` (as fast there). It
changes nothing outside those steps and holds no state, so a model handed back to the user is
untouched. Where the processor is Intel's, or the inputs are not plain fp32 CPU tensors (autocast,
bf16 weights, a GPU, DTensor shards), or inside gradient-checkpointed layers (see `_saving_hooks`),
`F.linear` runs as before.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from ..errors import ChatSFTError

ENV = "CHATSFT_CPU_MATMUL"
CHOICES = ("auto", "onednn", "aten")
_PLAIN = (torch.Tensor, torch.nn.Parameter)

try:
    _pointwise = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # a build without oneDNN
    _pointwise = None


def _onednn(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d [rows, in] @ weight.T [in, out] (+ bias) through oneDNN."""
    return _pointwise(x2d, weight, bias, "none", [], "")


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` through oneDNN for an input of any leading shape."""
    return _onednn(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # Only what the wanted gradients need, as aten's own linear does: a frozen weight (LoRA's
        # base layers) must not keep its input alive (+620 MiB on SmolLM2 at batch 4 × 512).
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(
            x.reshape(-1, x.shape[-1]) if need_w else None, weight if need_x else None
        )
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad @ weight = linear(grad, weight.T): oneDNN takes the transposed view as is.
            grad_x = _onednn(grad2d, weight.T, None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad2d.T @ x2d  # as fast through MKL as through oneDNN for these shapes
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def _eligible(x: object, weight: object, bias: object) -> bool:
    return (
        type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for fp32 CPU tensors, computed by oneDNN (autograd included)."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        return _OneDNNLinear.apply(x, weight, bias)
    return _forward(x, weight, bias)


class OneDNNLinears(TorchFunctionMode):
    """While active, eligible `F.linear` calls (plain fp32 CPU tensors, no autocast) go to oneDNN."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.compiler.is_compiling() and not _saving_hooks():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _eligible(x, weight, bias):
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def _saving_hooks() -> bool:
    """Whether saved-tensor hooks are active: inside a gradient-checkpointed region. Its
    recomputation runs in the backward, where no TorchFunctionMode is active, so it would save
    aten's tensors in place of ours: such regions keep PyTorch's path in both passes."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(True) is not None


def cpu_vendor() -> str | None:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD", ...) on Linux, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return None


def _works() -> bool:
    """oneDNN's linear is present and agrees with F.linear on a small case."""
    if _pointwise is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((5, 7), (3, 7), (3,)))
        return torch.allclose(_onednn(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    except RuntimeError:
        return False


def requested() -> str:
    """$CHATSFT_CPU_MATMUL, checked: auto (the default), onednn or aten."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ChatSFTError(
            f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(CHOICES)}",
            hint="auto (the default): oneDNN for fp32 linear layers on non-Intel x86 CPUs, "
            "PyTorch's own matmul elsewhere",
        )
    return value


def choose(
    device_type: str, dtype: torch.dtype | None, compiled: bool, checkpointing: bool = False
) -> tuple[bool, str | None]:
    """(use oneDNN linear layers, the line for the log) for a run training on `device_type` with
    activations of `dtype`. No line where nothing changes without being asked."""
    choice = requested()
    if choice == "aten" or device_type != "cpu":
        return False, None
    why_not = None
    if dtype != torch.float32:
        why_not = "activations are not fp32"
    elif compiled:
        why_not = "the layers are compiled (inductor chooses their kernels)"
    elif not _works():
        why_not = "this PyTorch build has no working oneDNN linear"
    if why_not:
        return False, (f"{ENV}=onednn ignored: {why_not}" if choice == "onednn" else None)
    vendor = cpu_vendor()
    if choice == "auto" and vendor in (None, "GenuineIntel"):
        return False, None
    where = " outside gradient-checkpointed layers" if checkpointing else ""
    return True, (
        f"fp32 linear layers run through oneDNN{where} (CPU {vendor or 'unknown'}; MKL is slower "
        f"there); {ENV}=aten uses PyTorch's matmul instead"
    )
