"""chatsft: supervised fine-tuning of chat language models, a fast drop-in `SFTTrainer`."""

from .chat import ChatSession
from .config import SFTConfig
from .data.collate import PaddedCollator, PaddingFreeCollator
from .data.streaming import ConstantLengthDataset
from .errors import ChatSFTError
from .generate import GenerationEvalCallback, GenerationResult, generate, load_for_inference
from .trainer import SFTTrainer

__all__ = [
    "ChatSFTError",
    "ChatSession",
    "GenerationEvalCallback",
    "GenerationResult",
    "ConstantLengthDataset",
    "PaddedCollator",
    "PaddingFreeCollator",
    "SFTConfig",
    "SFTTrainer",
    "generate",
    "load_for_inference",
]

__version__ = "0.1.0"
