"""chatsft: supervised fine-tuning of chat language models, a fast drop-in `SFTTrainer`."""

from .config import SFTConfig
from .data.collate import PaddedCollator, PaddingFreeCollator
from .data.streaming import ConstantLengthDataset
from .errors import ChatSFTError
from .trainer import SFTTrainer

__all__ = [
    "ChatSFTError",
    "ConstantLengthDataset",
    "PaddedCollator",
    "PaddingFreeCollator",
    "SFTConfig",
    "SFTTrainer",
]

__version__ = "0.1.0"
