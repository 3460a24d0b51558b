"""Files that are whole or absent: atomic writes, durable renames, JSON that always encodes."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "json_text", "write_atomic"]


def json_text(value: Any, *, indent: int | None = None) -> str:
    """JSON that can always be written as UTF-8: readable non-ASCII where possible, ``\\uXXXX``
    escapes when the value holds unpaired surrogates; non-JSON values as their ``str``."""
    text = json.dumps(value, ensure_ascii=False, indent=indent, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, indent=indent, default=str)
    return text


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation in ``folder`` durable (best effort)."""
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
