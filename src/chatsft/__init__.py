"""chatsft: supervised fine-tuning of chat language models, a fast drop-in `SFTTrainer`.

The public names are imported on first use: `import chatsft.errors` or
`chatsft.generation.knobs` (the CLI's flag checks) then does not pay for torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

_MODULE_OF = {
    "ChatSFTError": ".errors",
    "ChatSession": ".generation.chat",
    "ConstantLengthDataset": ".data.streaming",
    "Estimate": ".estimate",
    "FitResult": ".estimate",
    "GenerationEvalCallback": ".generation.callback",
    "GenerationResult": ".generation.generate",
    "PaddedCollator": ".data.collate",
    "PaddingFreeCollator": ".data.collate",
    "SFTConfig": ".config",
    "SFTTrainer": ".train.trainer",
    "estimate": ".estimate",
    "fit_batch": ".estimate",
    "generate": ".generation.generate",
    "load_for_inference": ".generation.generate",
}

__all__ = [
    "ChatSFTError",
    "ChatSession",
    "GenerationEvalCallback",
    "GenerationResult",
    "ConstantLengthDataset",
    "Estimate",
    "FitResult",
    "PaddedCollator",
    "PaddingFreeCollator",
    "SFTConfig",
    "SFTTrainer",
    "estimate",
    "fit_batch",
    "generate",
    "load_for_inference",
]

__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on demand
    from .config import SFTConfig
    from .data.collate import PaddedCollator, PaddingFreeCollator
    from .data.streaming import ConstantLengthDataset
    from .errors import ChatSFTError
    from .estimate import Estimate, FitResult, estimate, fit_batch
    from .generation.callback import GenerationEvalCallback
    from .generation.chat import ChatSession
    from .generation.generate import GenerationResult, generate, load_for_inference
    from .train.trainer import SFTTrainer
