"""Checkpoint files, sized without writing them: safetensors headers and torch.save's zip
container laid out as their writers lay them out, plus typical sizes for the small files."""

from __future__ import annotations

import functools
import inspect
import io
import json
import math
import os
import pickle
from typing import TYPE_CHECKING, Any

import torch

from .results import CheckpointFile

if TYPE_CHECKING:
    from .meta_model import MetaModel, Tensors

# Measured on transformers 5.24 checkpoints (tiny model, CPU); they barely depend on the model.
# README.md and training_config.yaml are chatsft's (trainer.py writes them into every save) and
# grow with the settings that differ from the defaults.
SMALL_FILES = {
    "scheduler.pt": 1_465,
    "rng_state.pth": 14_455,
    "trainer_state.json": 1_000,  # grows by ~0.3 KB per logged step (log_history)
    "training_args.bin": 5_700,
    "training_config.yaml": 1_000,  # the settings given, as `chatsft train` reads them back
    "generation_config.json": 200,
    "scaler.pt": 1_400,
    "adapter_config.json": 1_000,
    "README.md": 1_500,  # chatsft's model card (model_card.py), beside a model or an adapter
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@functools.cache
def max_shard_bytes() -> int:
    """save_pretrained's default max_shard_size ("50GB", decimal), read from transformers itself:
    the Trainer saves with the default."""
    from transformers import PreTrainedModel
    from transformers.utils.hub import convert_file_size_to_int

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"]
    return convert_file_size_to_int(default.default)


def safetensors_size(tensors: Tensors) -> int:
    """Exact size of a .safetensors file holding these tensors: 8-byte length, JSON header padded
    to 8 bytes (entries sorted by dtype size, then name, as safetensors writes them), data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in sorted(tensors, key=lambda t: (-t[2].itemsize, t[0])):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES.get(dtype, "F32"),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text % 8) + offset


def safetensors_first_dtype(folder: str) -> torch.dtype | None:
    """The first floating dtype in a folder's model.safetensors header (None without one)."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] in ("F32", "BF16", "F16"):
            return codes[entry["dtype"]]
    return None


def torch_save_size(obj: Any, file_name: str) -> int:
    """Exact size of `torch.save(obj, file_name)` for an object whose tensors may be fake
    (FakeTensorMode): the pickle is built as torch.save builds it, the zip layout (64-byte aligned
    records, data descriptors, zip64 fields past 4 GiB) is laid out as PyTorch's writer does, and
    no tensor bytes are ever produced."""
    storages: dict[int, tuple[str, int]] = {}

    class Pickler(pickle.Pickler):
        # torch.serialization._save's persistent_id: each storage becomes a reference to a zip
        # record. location_tag returns one shared "cpu" string (pickled once, then memoised)
        # but builds "cuda:N" afresh for every storage; the fake device is mapped the same way.
        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, torch.storage.TypedStorage):
                return None
            untyped = obj._untyped_storage
            key, _ = storages.setdefault(untyped._cdata, (str(len(storages)), untyped.nbytes()))
            device = getattr(obj, "_fake_device", None) or untyped.device
            location = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
            storage_type = getattr(torch, obj._pickle_storage_type())
            return ("storage", storage_type, key, location, obj._size())

    buffer = io.BytesIO()
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        Pickler(buffer, protocol=2).dump(obj)  # torch.save's default protocol
    records = [
        ("data.pkl", len(buffer.getvalue())),
        (".format_version", 1),
        (".storage_alignment", 2),
        ("byteorder", 6),
        *((f"data/{key}", nbytes) for key, nbytes in storages.values()),
        ("version", 2),
        (".data/serialization_id", 40),
    ]
    return _zip_size(os.path.splitext(os.path.basename(file_name))[0], records)


def _zip_size(archive: str, records: list[tuple[str, int]], alignment: int = 64) -> int:
    """Length of PyTorch's zip container (caffe2/serialize/inline_container.cc over miniz)."""
    big = 0xFFFFFFFF
    offset = central = 0
    for name, size in records:
        full = len(archive) + 1 + len(name)
        # zip64 extra field: 4-byte header, 16 bytes of sizes and/or 8 of offset past 4 GiB.
        zip64 = 0
        if size >= big or offset >= big:
            zip64 = 4 + (16 if size >= big else 0) + (8 if offset >= big else 0)
        # Local header (30 bytes + name), then an "FB" extra field padding the data to alignment.
        start = offset + 30 + full + zip64 + 4
        data = start + (-start % alignment)
        descriptor = 24 if zip64 else 16  # data descriptor after the data: crc and sizes
        offset = data + size + descriptor
        central += 46 + full + zip64
    # Central directory, then the zip64 end record (56) and locator (20), always written, and
    # the classic end-of-central-directory record (22).
    return offset + central + 56 + 20 + 22


def _folder_file_sizes(folder: str | None, names: tuple[str, ...]) -> dict[str, int]:
    if folder is None:
        return {}
    return {
        n: os.path.getsize(os.path.join(folder, n))
        for n in names
        if os.path.exists(os.path.join(folder, n))
    }


def model_files(model: MetaModel) -> list[CheckpointFile]:
    """What save_pretrained (and the tokenizer's save_pretrained) writes."""
    files = []
    if model.is_peft:
        files.append(
            CheckpointFile("adapter_model.safetensors", safetensors_size(model.saved_tensors), True)
        )
        files.append(
            CheckpointFile("adapter_config.json", SMALL_FILES["adapter_config.json"], False)
        )
        files.append(CheckpointFile("README.md", SMALL_FILES["README.md"], False))
    else:
        size = safetensors_size(model.saved_tensors)
        shards = math.ceil(size / max_shard_bytes())
        if shards <= 1:
            files.append(CheckpointFile("model.safetensors", size, True))
        else:
            # Each shard has its own header; the index maps every tensor to its shard.
            files.append(
                CheckpointFile(
                    f"model-0000N-of-{shards:05d}.safetensors ({shards} files)", size, False
                )
            )
            files.append(
                CheckpointFile(
                    "model.safetensors.index.json", 120 * len(model.saved_tensors), False
                )
            )
        config_json = len(model.config.to_json_string(use_diff=True).encode())
        files.append(CheckpointFile("config.json", config_json, False))
        files.append(
            CheckpointFile("generation_config.json", SMALL_FILES["generation_config.json"], False)
        )
        files.append(CheckpointFile("README.md", SMALL_FILES["README.md"], False))
    for name, size in _folder_file_sizes(model.folder, TOKENIZER_FILES).items():
        files.append(CheckpointFile(name, size, False))
    return files
