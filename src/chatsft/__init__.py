"""chatsft: supervised fine-tuning of chat language models, a fast drop-in `SFTTrainer`."""

from .chat import ChatSession
from .config import SFTConfig
from .data.collate import PaddedCollator, PaddingFreeCollator
from .data.streaming import ConstantLengthDataset
from .errors import ChatSFTError
from .estimate import Estimate, FitResult, estimate, fit_batch
from .generate import GenerationEvalCallback, GenerationResult, generate, load_for_inference
from .trainer import SFTTrainer

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
