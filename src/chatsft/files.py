"""Files: written so that a crash never leaves a half-written one in place, and checked to be whole
before they are loaded."""

from __future__ import annotations

import json
import os
import tempfile


def write_atomic(path: str, data: str | bytes) -> None:
    """Write beside the target, then rename: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".chatsft-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(
            tmp, 0o666 & ~file_umask()
        )  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def file_umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def safetensors_problem(path: str) -> str | None:
    """Why a safetensors file is not whole (header cut short or unreadable, tensors past the end of
    the file), or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, less than a header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"the header says {length} bytes but the file has {size}"
        try:
            header = json.loads(f.read(length))
            end = max(
                (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "the header is not readable"
    if 8 + length + end > size:
        return f"its tensors need {8 + length + end} bytes but the file has {size}"
    return None
