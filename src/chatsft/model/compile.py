"""`torch_compile: true` as regional compilation: each decoder layer is compiled in place.

Compiling the whole model unrolls every layer into one graph (minutes of compiling for a 24-layer
model) and recompiles when a packed batch changes length. Compiling the repeated decoder layer
instead compiles one graph that all layers share, with a dynamic sequence length, so batches of any
length reuse it. The document boundaries arrive as arguments (read once per batch by the loss,
before the forward), so the attention is part of the layer's graph, with no graph break: on a GPU
PyTorch's varlen kernel, on a CPU chatsft's per-document operator (`cpu_attention`); the layout
changes around it fuse with the rotary embedding.
What gets fused is the memory-bound work around the matmuls (RMSNorm, rotary
embedding, SwiGLU, residuals).
`Module.compile` works in place, so parameter names, checkpoints and the optimizer see the same
model as eager.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder layers (empty if it has none that transformers marks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return []
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if not found:
        found = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    return found


def compile_decoder_layers(
    model: torch.nn.Module, backend: str | None = None, mode: str | None = None
) -> str | None:
    """Compile every decoder layer in place; returns a line for the log, or None when the model has
    no decoder layers to compile (the caller then compiles the whole model instead)."""
    layers = decoder_layers(model)
    if not layers:
        return None
    for layer in layers:
        layer.compile(backend=backend or "inductor", mode=mode, dynamic=True)
    kind = type(layers[0]).__name__
    return f"torch.compile: {len(layers)} x {kind} compiled in place, dynamic sequence length"
