"""GGUF in: `find_gguf` spots a .gguf reference, `load_gguf` dequantizes one through transformers
(model, tokenizer and chat template all come from the file), `import_gguf` saves that once as an
ordinary safetensors folder so later runs skip the dequantization. Writing GGUF is chatsft.export."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from ..errors import ChatSFTError
from ..files import file_umask


def gguf_module() -> Any:
    """The `gguf` package (an optional dependency), with a one-line error when it is missing."""
    try:
        import gguf
    except ImportError:
        raise ChatSFTError(
            "reading or writing GGUF files needs the gguf package",
            hint="pip install 'chatsft[gguf]'",
        ) from None
    return gguf


IMPORT_MARKER = "chatsft_gguf_import.json"
DTYPES = ("float32", "float16", "bfloat16", "auto")
# GGUF architecture names that transformers' loader renames to its own model_type.
ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


# --- in --------------------------------------------------------------------------------------------


def find_gguf(ref: str) -> str | None:
    """The GGUF file `ref` names: a .gguf path, or a folder holding exactly one .gguf.

    None for anything else (a hub id, a saved model folder: its config.json wins over an exported
    .gguf lying beside it)."""
    if ref.lower().endswith(".gguf"):
        if not os.path.isfile(ref):
            raise ChatSFTError("GGUF file not found", source=ref, hint="check the path")
        return os.path.abspath(ref)
    if not os.path.isdir(ref) or os.path.isfile(os.path.join(ref, "config.json")):
        return None
    found = sorted(
        name
        for name in os.listdir(ref)
        if name.lower().endswith(".gguf") and os.path.isfile(os.path.join(ref, name))
    )
    if len(found) > 1:
        raise ChatSFTError(
            f"folder holds {len(found)} GGUF files: {', '.join(found)}",
            source=ref,
            hint=f"name one of them, e.g. {os.path.join(ref, found[0])}",
        )
    return os.path.abspath(os.path.join(ref, found[0])) if found else None


def load_gguf(path: str, dtype: torch.dtype | str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, dequantized to `dtype` (default float32)."""
    file = _require_gguf(path)
    check_gguf(file)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=as_torch_dtype(dtype),
            # a plain dense model: trainable and save_pretrained-able, whatever kernels exist
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, NotImplementedError, KeyError) as err:
        raise ChatSFTError(f"transformers could not load it: {err}", source=file) from None
    return model.eval(), tokenizer


def import_gguf(path: str, out_dir: str, dtype: torch.dtype | str | None = None) -> str:
    """Save the GGUF file as a safetensors model folder (model, tokenizer, chat template) at
    `out_dir` and return it; a folder already imported from the same file is reused as it is."""
    file = _require_gguf(path)
    marker = _fingerprint(file)
    if _imported(out_dir, marker, file):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ChatSFTError(
            "folder exists and is not an import of a GGUF file",
            source=out_dir,
            hint="remove it or pick another output folder",
        )
    model, tokenizer = load_gguf(file, dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Written beside the target and renamed into place: a crash never leaves a half folder there.
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, IMPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f)
        os.chmod(tmp, 0o777 & ~file_umask())  # mkdtemp makes it private; give it the usual mode
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _imported(out_dir, marker, file):  # another run got there first
            return out_dir
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_gguf(file: str) -> None:
    """Raise unless transformers can load this file: its architecture and every tensor type."""
    gguf = gguf_module()

    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError) as err:
        raise ChatSFTError(f"not a readable GGUF file: {err}", source=file) from None
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = field.contents() if field is not None else None
    if ARCH_ALIASES.get(arch, arch) not in supported_archs():
        raise ChatSFTError(
            f"transformers cannot load GGUF architecture {arch!r}",
            source=file,
            hint=f"supported: {', '.join(sorted(supported_archs()))}",
        )
    types = {t.tensor_type for t in reader.tensors}
    if unsupported := types - dequantizable():
        raise ChatSFTError(
            f"cannot dequantize tensor type {', '.join(sorted(t.name for t in unsupported))}",
            source=file,
            hint=f"supported: {', '.join(t.name for t in sorted(dequantizable()))}",
        )


@functools.cache
def supported_archs() -> frozenset[str]:
    """What transformers' GGUF loaders accept: the legacy table's model types, and the newer
    loader's GGUF architectures."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} | set(GGUF_ARCHS)


@functools.cache
def dequantizable() -> frozenset[Any]:
    """The GGML types gguf.quants can dequantize (what transformers' loader calls), found by
    trying one zero block of each: the library keeps no public list."""
    gguf = gguf_module()

    found = set()
    for qtype in gguf.GGMLQuantizationType:
        sizes = gguf.GGML_QUANT_SIZES.get(qtype)
        if sizes is None:
            continue
        try:
            with np.errstate(all="ignore"):
                gguf.quants.dequantize(np.zeros(sizes[1], dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        found.add(qtype)
    return frozenset(found)


def _require_gguf(path: str) -> str:
    file = find_gguf(path)
    if file is None:
        raise ChatSFTError(
            "not a .gguf file, nor a folder holding one", source=path, hint="pass the .gguf file"
        )
    return file


def _fingerprint(file: str) -> dict[str, Any]:
    """Name, size and a hash of the first MiB (the header: metadata and tensor list), which tells
    two quantizations of one model apart without reading the whole file."""
    with open(file, "rb") as f:
        head = hashlib.sha256(f.read(2**20)).hexdigest()
    return {"gguf_file": os.path.basename(file), "size": os.path.getsize(file), "head_sha256": head}


def _imported(out_dir: str, marker: dict, file: str) -> bool:
    """Whether `out_dir` is a finished import of this GGUF file; an import of another is an error."""
    try:
        with open(os.path.join(out_dir, IMPORT_MARKER), encoding="utf-8") as f:
            found = json.load(f)
    except FileNotFoundError:
        return False
    if found != marker:
        raise ChatSFTError(
            f"folder holds an import of another GGUF file ({found.get('gguf_file')}), not of {file}",
            source=out_dir,
            hint="remove it or pick another output folder",
        )
    return True


def as_torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32  # what chatsft trains in
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ChatSFTError(
            f"unknown dtype {dtype!r}", field="dtype", hint=f"one of: {', '.join(DTYPES)}"
        )
    return getattr(torch, dtype)


# --- out -------------------------------------------------------------------------------------------
