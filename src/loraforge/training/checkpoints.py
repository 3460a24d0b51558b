"""Complete checkpoints: a checkpoint counts only if its manifest says every file is whole.

[`mark_complete`][loraforge.training.checkpoints.mark_complete] writes, after the Trainer has
saved a checkpoint, a ``.complete`` manifest listing every file with its size and SHA-256 (files
and manifest fsynced, the manifest renamed into place). A checkpoint counts as complete only if
the manifest is there and every file still matches it
([`check_checkpoint`][loraforge.training.checkpoints.check_checkpoint]), so a save cut short by
``kill -9`` (or, where the filesystem honours fsync, a power cut) or an old checkpoint
half-deleted by the Trainer's rotation is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loraforge.training.files import fsync_dir, write_atomic

__all__ = [
    "COMPLETE_MARKER",
    "check_checkpoint",
    "checkpoint_step",
    "mark_complete",
    "newest_marked",
    "scan_checkpoints",
]

_MB = 1024 * 1024

COMPLETE_MARKER = ".complete"
"""The manifest file of a complete checkpoint."""
_MANIFEST_FORMAT = "loraforge-checkpoint/1"


_WEIGHTS = ("adapter_model.safetensors", "model.safetensors")


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * _MB):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(
        p for p in ckpt.rglob("*") if p.is_file() and not p.name.startswith(COMPLETE_MARKER)
    )


def mark_complete(ckpt: str | Path, step: int) -> None:
    """Fsync every file of ``ckpt`` and write its ``.complete`` manifest (atomically)."""
    ckpt = Path(ckpt)
    files: dict[str, dict[str, Any]] = {}
    for p in _checkpoint_files(ckpt):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        size, sha = _digest(p)
        files[p.relative_to(ckpt).as_posix()] = {"size": size, "sha256": sha}
    fsync_dir(ckpt)
    manifest = {"format": _MANIFEST_FORMAT, "step": step, "files": files}
    write_atomic(ckpt / COMPLETE_MARKER, json.dumps(manifest, indent=1))


def check_checkpoint(ckpt: str | Path) -> str | None:
    """``None`` if ``ckpt`` is a complete checkpoint, else why not (for a log line)."""
    ckpt = Path(ckpt)
    marker = ckpt / COMPLETE_MARKER
    if not marker.is_file():
        return "no .complete marker: its save was interrupted"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its .complete marker is unreadable"
    if isinstance(manifest, int):  # loraforge 0.1.0 wrote the bare step number
        if not (ckpt / "trainer_state.json").is_file() or not any(
            (ckpt / w).is_file() for w in _WEIGHTS
        ):
            return "old-style .complete marker but weights or trainer_state.json missing"
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        return "its .complete marker is not a loraforge manifest"
    if "trainer_state.json" not in files or not any(w in files for w in _WEIGHTS):
        return "its manifest lists no weights or no trainer_state.json"
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing (deleted part-way?)"
        if p.stat().st_size != meta.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta.get('size')}"
    for rel, meta in files.items():
        if _digest(ckpt / rel)[1] != meta.get("sha256"):
            return f"{rel} does not match its SHA-256 in the manifest (corrupted?)"
    return None


def checkpoint_step(p: Path) -> int | None:
    """The step of a ``checkpoint-N`` folder, or ``None`` for any other name."""
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def scan_checkpoints(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` (or ``None``), and every checkpoint that is
    not complete with the reason. Older complete checkpoints are in neither."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    found = sorted(
        ((s, p) for p in root.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None),
        reverse=True,
    )
    newest: Path | None = None
    bad: list[tuple[Path, str]] = []
    for _, p in found:
        problem = check_checkpoint(p)
        if problem is not None:
            bad.append((p, problem))
        elif newest is None:
            newest = p
    return newest, bad


def newest_marked(root: Path) -> tuple[Path | None, int]:
    """The newest checkpoint holding a manifest (not verified: cheap)."""
    best: tuple[int, Path] | None = None
    if root.is_dir():
        for p in root.iterdir():
            s = checkpoint_step(p)
            if s is not None and (p / COMPLETE_MARKER).is_file() and (best is None or s > best[0]):
                best = (s, p)
    return (best[1], best[0]) if best else (None, -1)
