"""CPU thread count for training: torch's default (one thread per core) loses on small models,
where each op is too short to split and threads wait on each other, most of all on a busy machine."""

from __future__ import annotations

import json
import os

# Below this many parameters one thread is fastest and robust (docs/benchmarks.md, "CPU threads").
ONE_THREAD_BELOW = 20_000_000


def approximate_parameters(model_ref: str) -> int | None:
    """Parameter count from a local folder's config.json (decoder-only transformer shapes)."""
    path = os.path.join(model_ref, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config = config.get("text_config", config)
    try:
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        vocab = int(config.get("vocab_size", 0))
        inner = int(config.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        return None
    return layers * (4 * hidden * hidden + 3 * hidden * inner) + vocab * hidden


def set_cpu_threads(sft, requested: int | None, model_ref: str | None = None) -> str | None:
    """Set torch's thread count for a CPU run and say what was chosen (None on GPU runs)."""
    import torch

    if sft.use_cpu is False and torch.cuda.is_available():
        return None
    if requested is not None:
        if requested < 1:
            from ..errors import ChatSFTError

            raise ChatSFTError(f"must be >= 1, got {requested}", field="torch_num_threads")
        torch.set_num_threads(requested)
        line = f"CPU threads: {requested} (torch_num_threads)"
    elif os.environ.get("OMP_NUM_THREADS"):
        line = f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    else:
        params = approximate_parameters(model_ref) if model_ref else None
        if params is not None and params < ONE_THREAD_BELOW:
            torch.set_num_threads(1)
            line = f"CPU threads: 1 (a {params / 1e6:.1f}M-parameter model runs fastest on one)"
        else:
            line = f"CPU threads: {torch.get_num_threads()} (torch's default, one per core)"
    line += "; --torch_num_threads N sets another"
    print(f"[chatsft] {line}", flush=True)
    return line
