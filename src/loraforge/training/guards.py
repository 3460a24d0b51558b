"""Run guards: a fault stops a run loudly and never costs more than the work since the last
complete checkpoint.

* **Complete checkpoints**: [`loraforge.training.checkpoints`][loraforge.training.checkpoints].
* **Non-finite training**: [`NonFiniteGuard`][loraforge.training.nonfinite.NonFiniteGuard]
  stops the run at the first non-finite loss or gradient, naming the step and its records,
  before any checkpoint holds the update.
* **Full disk**: [`DiskSpaceGuard`][loraforge.training.guards.DiskSpaceGuard] stops the run
  before a checkpoint save that cannot fit;
  [`disk_full_errors`][loraforge.training.guards.disk_full_errors] turns ``ENOSPC`` during a save
  into [`DiskFullError`][loraforge.DiskFullError] naming the folder.
* **Skipped records**:
  [`write_skipped_records`][loraforge.training.guards.write_skipped_records] writes every record
  the dataset builder dropped, with its reason and raw value, to ``skipped.jsonl``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loraforge.data.builder import MAX_RECORD_DEPTH, nested_deeper_than, summarize
from loraforge.errors import DiskFullError
from loraforge.training.checkpoints import COMPLETE_MARKER, newest_marked, scan_checkpoints
from loraforge.training.distributed import Ranks, agreed
from loraforge.training.files import fsync_dir, json_text

__all__ = [
    "NONFINITE_FILE",
    "SKIPPED_FILE",
    "DiskSpaceGuard",
    "disk_full_errors",
    "is_disk_full",
    "parameters_finite",
    "write_skipped_records",
]

logger = logging.getLogger(__name__)

NONFINITE_FILE = "nonfinite_batch.json"
SKIPPED_FILE = "skipped.jsonl"
_MB = 1024 * 1024


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- checkpoints


def parameters_finite(model: Any) -> bool:
    """Whether every trainable parameter of ``model`` is finite."""
    import torch

    by_device: dict[Any, list[Any]] = {}
    for p in model.parameters():
        if p.requires_grad:
            by_device.setdefault(p.device, []).append(torch.isfinite(p.detach()).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


# --------------------------------------------------------------------------- disk full


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) says the disk or quota is full. torch and
    safetensors report it as a RuntimeError/SafetensorError with the OS message in the text."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "StorageFull", "Disk quota")):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def disk_full_errors(folder: str | Path, what: str = "saving to") -> Iterator[None]:
    """Turn a full-disk error raised inside the block into a
    [`DiskFullError`][loraforge.DiskFullError] naming ``folder``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(
            f"disk full while {what} {folder} ({type(exc).__name__}: {exc}). What was saved "
            "before is intact; free some space and run again (resume=True keeps the progress "
            "of the last complete checkpoint)",
            folder=str(folder),
        ) from exc


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class DiskSpaceGuard(TrainerCallback):
    """Before each checkpoint save, check that the output folder's disk can hold it.

    A checkpoint needs as much room as the previous one (its manifest says how much); before the
    first one, at least the trainable weights. Stopping *before* the save leaves the previous
    checkpoint as the newest, and no half-written one behind. With several processes, the main
    process (which writes the checkpoint) checks, and all of them stop together.
    """

    def __init__(self, ranks: Ranks | None = None, slack_bytes: int = 4 * _MB) -> None:
        self.ranks = ranks or Ranks()
        self.slack_bytes = slack_bytes

    def _needed(self, root: Path, model: Any) -> int:
        newest, _ = newest_marked(root)
        if newest is not None:
            try:
                manifest = json.loads((newest / COMPLETE_MARKER).read_text(encoding="utf-8"))
                return int(sum(f["size"] for f in manifest["files"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        if model is None:
            return 0
        return int(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not control.should_save:
            return
        with agreed(self.ranks):
            if self.ranks.main:
                self._check(args, state, kw.get("model"))

    def _check(self, args: Any, state: Any, model: Any) -> None:
        root = Path(args.output_dir)
        need = self._needed(root, model) + self.slack_bytes
        free = shutil.disk_usage(_existing(root)).free
        if free < need:
            newest, _ = scan_checkpoints(root)
            kept = "no checkpoint had been saved yet"
            if newest:
                kept = f"the last complete checkpoint {newest} is intact"
            raise DiskFullError(
                f"disk full: {root} has {free / _MB:.1f} MB free, the checkpoint of step "
                f"{state.global_step} needs about {need / _MB:.1f} MB; stopped before saving it "
                f"({kept}). Free some space and resume.",
                folder=str(root),
            )


# --------------------------------------------------------------------------- skipped records


_WRITE_CHUNK = 1 << 20


def _one_line(text: str) -> str:
    """``text`` (JSON) safe for readers that split lines on more than ``"\\n"``
    (``str.splitlines()``): ``\\r`` can only be whitespace between tokens in JSON, and
    U+0085/U+2028/U+2029 only characters inside strings, so the JSON value is unchanged."""
    if not any(ch in text for ch in _LINE_BREAKS):
        return text
    return text.replace("\r", " ").translate(_ESCAPE_BREAKS)


_LINE_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_ESCAPE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_JSON_SPACE = " \t\r\n"


def _skipped_line(d: Any) -> str:
    """One line of ``skipped.jsonl`` for a dropped record: its line's text verbatim when it came
    from a JSONL file, else the value as JSON, else (too deep, not JSON) its bounded repr."""
    entry: dict[str, Any] = {"index": d.index, "line": d.line, "reason": d.reason}
    head = json_text(entry)[:-1]  # '{"index": .., "reason": ".."' to append the record to
    raw = getattr(d, "raw", None)
    if isinstance(raw, str):
        return _one_line(f'{head}, "record": {raw.strip(_JSON_SPACE)}}}')
    record = getattr(d, "record", None)
    if record is not None and not nested_deeper_than(record, MAX_RECORD_DEPTH):
        try:
            return _one_line(f'{head}, "record": {json_text(record)}}}')
        except (ValueError, TypeError, RecursionError):
            pass  # a circular reference, an unserialisable key, ...
    summary = getattr(d, "summary", "") or summarize(record)
    return _one_line(json_text({**entry, "record_repr": summary}))


def write_skipped_records(path: str | Path, dropped: Sequence[Any]) -> None:
    """Write one JSON line per dropped record: index, line, reason and the raw record.

    A record read from a JSONL file is written as the text of its line, exactly as read (only
    ``\\r``, U+0085, U+2028 and U+2029 are escaped so that no reader splits the line: the JSON
    value is the same); any other record as JSON, or, when it cannot be written as JSON (nested
    more than 100 levels deep, non-JSON Python values), a ``repr`` bounded to 500 characters
    under ``record_repr``. Lines are streamed to a temporary file, fsynced and renamed into
    place; with nothing dropped, a stale file is removed.

    Raises:
        DiskFullError: the disk filled up while writing (naming the folder; no partial file is
            left behind).
    """
    path = Path(path)
    with disk_full_errors(path.parent, "writing the skipped records to"):
        if not dropped:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                buf = bytearray()
                for d in dropped:
                    buf += (_skipped_line(d) + "\n").encode("utf-8")
                    if len(buf) >= _WRITE_CHUNK:
                        _write_all(fd, buf)
                        buf.clear()
                _write_all(fd, buf)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
