"""Predict peak training memory and checkpoint sizes from a model config, without loading weights.

Parameter counts come from the real model class built on `torch.device("meta")` (exact, tied
embeddings and LoRA adapters included: meta_model.py). Optimizer state comes from running one real
optimizer step on fake tensors, then laying out its pickle and zip container the way `torch.save`
does, so the predicted `optimizer.pt` is the size the Trainer writes, to the byte (optimizer.py,
files.py; checked by the tests). Activations use a per-token, per-layer count of the tensors
autograd saves in a Llama/Qwen-style decoder layer, plus the chunked loss's buffers
(activations.py), checked against measured memory by `bench/estimate_vs_measured.py`. predict.py
puts them together into the peak, fit.py searches the batch that fits a budget, format.py prints.

    est = estimate("Qwen/Qwen2.5-0.5B-Instruct", max_length=2048, batch_size=8, bf16=True)
    print(est.table())
"""

from .files import safetensors_size, torch_save_size
from .fit import fit_batch, free_device_memory, parse_memory
from .format import format_estimate, human
from .meta_model import load_model_config
from .optimizer import OPTIMIZERS
from .predict import estimate
from .results import CheckpointFile, Estimate, FitResult

__all__ = [
    "OPTIMIZERS",
    "CheckpointFile",
    "Estimate",
    "FitResult",
    "estimate",
    "fit_batch",
    "format_estimate",
    "free_device_memory",
    "human",
    "load_model_config",
    "parse_memory",
    "safetensors_size",
    "torch_save_size",
]
