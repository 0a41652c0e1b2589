"""GGUF out: `export_gguf` writes a saved model folder, or a LoRA adapter merged into its base, as a
GGUF file (f32, f16, bf16 or q8_0) with the `gguf` library, via `gguf_convert`."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..errors import ChatSFTError
from ..files import file_umask
from ..model.load import has_tokenizer
from ..model.peft_setup import adapter_base
from .gguf_convert import OUTTYPES, write_gguf


def export_gguf(model_dir: str, out_path: str, outtype: str = "f16") -> str:
    """Write the model in `model_dir` (a saved model, or a LoRA adapter: merged into its base first)
    as the GGUF file `out_path`, weights in `outtype` (f32, f16, bf16, q8_0); return `out_path`."""
    if outtype not in OUTTYPES:
        raise ChatSFTError(
            f"unknown GGUF outtype {outtype!r}",
            field="outtype",
            hint=f"one of: {', '.join(OUTTYPES)}",
        )
    if not out_path.lower().endswith(".gguf"):
        raise ChatSFTError("the output file name must end in .gguf", source=out_path)
    model, tokenizer = load_merged(model_dir)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    # A temporary file beside the target, renamed over it: a reader never sees half a GGUF.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out_path)}.", suffix=".tmp")
    os.close(fd)
    try:
        name = os.path.basename(os.path.normpath(model_dir))
        write_gguf(model, tokenizer, tmp, outtype, name=name, source=model_dir)
        os.chmod(
            tmp, 0o666 & ~file_umask()
        )  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path


def load_merged(model_dir: str) -> tuple[Any, Any]:
    """(float32 model, tokenizer) of a saved model folder, or of a LoRA adapter folder with the
    adapter merged into its base (adapter_config.json's base_model_name_or_path)."""
    from transformers import AutoTokenizer

    from ..model.load import load_model

    if not os.path.isdir(model_dir):
        raise ChatSFTError("not a folder", source=model_dir, hint="pass a saved model folder")
    adapter_file = os.path.join(model_dir, "adapter_config.json")
    tok_source = model_dir
    if os.path.isfile(adapter_file):
        from peft import PeftModel

        base = adapter_base(os.path.dirname(adapter_file))
        model = PeftModel.from_pretrained(load_model(base, {"dtype": "float32"}), model_dir)
        model = model.merge_and_unload()
        if not has_tokenizer(model_dir):
            tok_source = base
    else:
        model = load_model(model_dir, {"dtype": "float32"})
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source)
    except OSError as err:
        raise ChatSFTError(
            f"could not load the tokenizer: {err}", source=tok_source, field="tokenizer"
        ) from None
    return model.eval(), tokenizer
