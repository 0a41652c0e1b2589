"""Writing models in other formats: GGUF (for llama.cpp, Ollama, LM Studio). Reading GGUF is
chatsft.model.gguf. The `gguf` package is needed only when these functions run."""

from .gguf import export_gguf
from .gguf_convert import OUTTYPES

__all__ = ["OUTTYPES", "export_gguf"]
