"""Run guards: a fault stops a run loudly and never costs more than the work since the last
complete checkpoint.

* **Complete checkpoints.** [`mark_complete`][loraforge.guards.mark_complete] writes, after the
  Trainer has saved a checkpoint, a ``.complete`` manifest listing every file with its size and
  SHA-256 (files and manifest fsynced, the manifest renamed into place). A checkpoint counts as
  complete only if the manifest is there and every file still matches it
  ([`check_checkpoint`][loraforge.guards.check_checkpoint]), so a save cut short by ``kill -9``
  (or, where the filesystem honours fsync, a power cut) or an old checkpoint half-deleted by the
  Trainer's rotation is never resumed.
* **Non-finite training.** [`NonFiniteGuard`][loraforge.guards.NonFiniteGuard] checks each
  micro-batch's loss and the gradients before every optimizer step and raises
  [`TrainingDivergedError`][loraforge.TrainingDivergedError] naming the step, after writing the
  offending batch's record indices to ``nonfinite_batch.json``. The optimizer never applies a
  non-finite update, so every checkpoint holds finite weights.
* **Full disk.** [`DiskSpaceGuard`][loraforge.guards.DiskSpaceGuard] stops the run before a
  checkpoint save that cannot fit; [`disk_full_errors`][loraforge.guards.disk_full_errors] turns
  ``ENOSPC`` during a save into [`DiskFullError`][loraforge.DiskFullError] naming the folder.
* **Skipped records.** [`write_skipped_records`][loraforge.guards.write_skipped_records] writes
  every record the dataset builder dropped, with its reason and raw value, to ``skipped.jsonl``.

How a batch is traced back to records: the guard keeps a reference to the ``input_ids`` of each
micro-batch since the last optimizer step (a forward hook; nothing is copied). Only when a
check fails does it hash each unpadded row and look the hash up among the training dataset's
rows; a dataset row is mapped to its source record through the data report (the builder emits
records in order, minus the dropped ones) and, after an ``eval_fraction`` split, through the
split's index mapping. Identical examples cannot be told apart: all their indices are listed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import reprlib
import shutil
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .errors import DiskFullError, TrainingDivergedError

__all__ = [
    "COMPLETE_MARKER",
    "NONFINITE_FILE",
    "SKIPPED_FILE",
    "DiskSpaceGuard",
    "NonFiniteGuard",
    "check_checkpoint",
    "disk_full_errors",
    "fsync_dir",
    "is_disk_full",
    "json_text",
    "mark_complete",
    "parameters_finite",
    "scan_checkpoints",
    "write_skipped_records",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
NONFINITE_FILE = "nonfinite_batch.json"
SKIPPED_FILE = "skipped.jsonl"
_MANIFEST_FORMAT = "loraforge-checkpoint/1"
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
_MB = 1024 * 1024


# --------------------------------------------------------------------------- files


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


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- checkpoints


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
    _write_atomic(ckpt / COMPLETE_MARKER, json.dumps(manifest, indent=1))


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


def _step_of(p: Path) -> int | None:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def scan_checkpoints(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` (or ``None``), and every checkpoint that is
    not complete with the reason. Older complete checkpoints are in neither."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    found = sorted(
        ((s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None),
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
    checkpoint as the newest, and no half-written one behind.
    """

    def __init__(self, slack_bytes: int = 4 * _MB) -> None:
        self.slack_bytes = slack_bytes

    def _needed(self, root: Path, model: Any) -> int:
        newest, _ = _newest_marked(root)
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
        root = Path(args.output_dir)
        need = self._needed(root, kw.get("model")) + self.slack_bytes
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


def _newest_marked(root: Path) -> tuple[Path | None, int]:
    """The newest checkpoint holding a manifest (not verified: cheap)."""
    best: tuple[int, Path] | None = None
    if root.is_dir():
        for p in root.iterdir():
            s = _step_of(p)
            if s is not None and (p / COMPLETE_MARKER).is_file() and (best is None or s > best[0]):
                best = (s, p)
    return (best[1], best[0]) if best else (None, -1)


# --------------------------------------------------------------------------- non-finite guard


def _row_key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


class NonFiniteGuard(TrainerCallback):
    """Stop training at the first non-finite loss or gradient, naming the step and its records.

    On the CPU the check runs before the optimizer step, which never applies the bad update. On a
    GPU, reading the flags at every step would make the GPU wait for the CPU between steps, so by
    default (``defer=None``) the flags are copied to the host without waiting and read at the
    next optimizer step, and at once before any checkpoint is saved, a line logged, an evaluation
    run or the run ended: the bad step's update may reach the weights in memory, but no
    checkpoint or final adapter holds it, and the error names the step that went wrong.

    Args:
        output_dir: where ``nonfinite_batch.json`` is written.
        train_dataset: the dataset given to the Trainer (to trace rows back to records).
        report: the [`DataReport`][loraforge.DataReport] of the training data.
        check_gradients: also check gradients (leave on except with fp16 loss scaling, where
            overflowing gradients are expected and skipped by the grad scaler).
        defer: read each step's verdict one step late (None: on a GPU).
    """

    def __init__(
        self,
        output_dir: str | Path,
        train_dataset: Any = None,
        report: Any = None,
        *,
        check_gradients: bool = True,
        defer: bool | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.train_dataset = train_dataset
        self.report = report
        self.check_gradients = check_gradients
        self.defer = defer
        self._pending: list[tuple[Any, Any, Any, Any]] = []
        self._deferred: tuple[Any, ...] | None = None
        self._params: list[Any] = []
        self._handle: Any = None

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model = kw.get("model")
        if getattr(args, "fp16", False) and self.check_gradients:
            logger.info("fp16 loss scaling: non-finite gradients are left to the grad scaler")
            self.check_gradients = False
        if model is not None and self._handle is None:
            self._params = [p for p in model.parameters() if p.requires_grad]
            self._handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        try:
            self._check_deferred(args)
        finally:
            self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending.clear()
        self._deferred = None

    def record_loss(self, loss: Any) -> None:
        """Attach a loss computed outside the model (``compute_loss_func``) to the latest
        micro-batch, so a non-finite loss is caught as a loss on every path."""
        import torch

        if self._pending and torch.is_tensor(loss):
            self._pending[-1] = (loss.detach(), *self._pending[-1][1:])

    def _after_forward(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        import torch

        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, generation
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        self._pending.append(
            (
                loss.detach() if torch.is_tensor(loss) else None,
                kwargs.get("input_ids", args[0] if args else None),
                kwargs.get("attention_mask"),
                kwargs.get("position_ids"),
            )
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        self._check_deferred(args)  # the previous step's flags: long computed by now
        pending, self._pending = self._pending, []
        losses = [p[0] for p in pending if p[0] is not None]
        if not losses and not self.check_gradients:
            return
        flags = []  # one flag per micro-batch loss, then one for all gradients
        device = losses[0].device if losses else None
        if losses:  # a loss may hold one value per GPU (DataParallel)
            flags.append(torch.stack([torch.isfinite(x).all().to(device) for x in losses]))
        if self.check_gradients:
            grad_ok = self._gradients_finite()
            if grad_ok is not None:
                device = device or grad_ok.device
                flags.append(grad_ok.reshape(1).to(device))
        if not flags:
            return
        flag = torch.cat(flags)
        step = state.global_step + 1
        defer = flag.is_cuda if self.defer is None else self.defer
        if not defer:
            self._judge(step, flag.tolist(), losses, pending, args)
            return
        event = None
        if flag.is_cuda:  # copy to the host without waiting; read at the next check
            host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flag
        self._deferred = (step, host, event, losses, pending)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # before anything is saved, logged or evaluated, and at the end: the last step's verdict
        if (
            control.should_save
            or control.should_log
            or control.should_evaluate
            or control.should_training_stop
        ):
            self._check_deferred(args)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._check_deferred(args)  # an epoch-end evaluation or save comes next

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # a save asked for after this guard's on_step_end: stop before the checkpoint is marked
        # complete (the guard runs before the callback that marks it)
        self._check_deferred(args)

    def _check_deferred(self, args: Any) -> None:
        if self._deferred is None:
            return
        step, host, event, losses, pending = self._deferred
        self._deferred = None
        if event is not None:
            event.synchronize()
        self._judge(step, host.tolist(), losses, pending, args)

    def _judge(
        self, step: int, values: list[bool], losses: list[Any], pending: list[Any], args: Any
    ) -> None:
        if all(values):
            return
        loss_flags = values[: len(losses)]
        if not all(loss_flags):
            k = loss_flags.index(False)
            value = float(losses[k].float().sum())
            self._fail(step, "loss", value, pending, args)
        self._fail(step, "gradient", math.nan, pending, args)

    def _gradients_finite(self) -> Any:
        import torch

        groups: dict[tuple[Any, Any], list[Any]] = {}
        for p in self._params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad.detach())
        if not groups:
            return None
        oks = []
        for grads in groups.values():
            foreach_norm = getattr(torch, "_foreach_norm", None)
            if foreach_norm is not None:
                oks.append(torch.isfinite(torch.stack(foreach_norm(grads))).all())
            else:
                oks.append(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        first = oks[0].device
        return torch.stack([o.to(first) for o in oks]).all()

    # ------------------------------------------------------------------ failure
    def _fail(self, step: int, kind: str, value: float, pending: list[Any], args: Any) -> None:
        try:
            rows, micro = _batch_rows(pending)
            matches, note = self._trace(rows)
        except Exception as exc:  # tracing is best effort; the error below must still be raised
            rows, micro, matches = [], [], []
            note = f"the batch could not be traced ({type(exc).__name__}: {exc})"
        indices = sorted({i for m in matches for i in m})
        checkpoint, _ = scan_checkpoints(Path(args.output_dir))
        batch_file = self.output_dir / NONFINITE_FILE
        info = {
            "step": step,
            "kind": kind,
            "value": repr(value),
            "source": getattr(self.report, "source", None),
            "record_indices": indices,
            "note": note,
            "rows": [
                {"micro_batch": k, "tokens": len(r), "record_indices": m}
                for k, r, m in zip(micro, rows, matches, strict=True)
            ],
            "last_complete_checkpoint": str(checkpoint) if checkpoint else None,
        }
        written = True
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(batch_file, json_text(info, indent=2))
        except OSError:
            written = False
        self._detach()
        kept = (
            f"the last complete checkpoint is {checkpoint}"
            if checkpoint
            else "no checkpoint had been saved yet"
        )
        where = f"see {batch_file}" if written else f"{batch_file} could not be written"
        raise TrainingDivergedError(
            f"training diverged at step {step}: non-finite {kind} ({value!r}); stopped before "
            f"the optimizer applied it. The batch held records {indices or '(unknown)'} of "
            f"{info['source']} ({where}); {kept}. Check those records, lower the learning "
            "rate or max_grad_norm, then resume.",
            step=step,
            kind=kind,
            record_indices=indices,
            batch_file=str(batch_file) if written else None,
            checkpoint=str(checkpoint) if checkpoint else None,
        )

    def _trace(self, rows: list[list[int]]) -> tuple[list[list[int]], str]:
        """Map unpadded batch rows to source record indices (all candidates for duplicates)."""
        if self.train_dataset is None or not rows:
            return [[] for _ in rows], "no training dataset given to the guard"
        want: dict[bytes, list[int]] = {}
        for n, r in enumerate(rows):
            want.setdefault(_row_key(r), []).append(n)
        # a packed dataset keeps its examples (and the dataset they came from) unpacked
        packed = isinstance(getattr(self.train_dataset, "input_ids", None), list)
        examples = self.train_dataset.input_ids if packed else self.train_dataset["input_ids"]
        base = self.train_dataset.dataset if packed else self.train_dataset
        positions: list[list[int]] = [[] for _ in rows]
        for pos, ids in enumerate(examples):
            for n in want.get(_row_key(ids), ()):
                positions[n].append(pos)
        # dataset position -> row of the dataset the builder emitted (a split keeps a mapping)
        mapping = getattr(base, "_indices", None)
        try:
            original = mapping.column(0).to_pylist() if mapping is not None else None
        except Exception:  # a datasets version without an arrow indices table
            return [[] for _ in rows], "the dataset's row order could not be traced"
        # emitted row -> record index: the builder emits records in order, minus dropped ones
        records: list[int] | None = None
        if self.report is not None:
            dropped = {d.index for d in self.report.dropped}
            records = [i for i in range(self.report.records_read) if i not in dropped]
            if len(records) != self.report.built:
                records = None
        if records is None:
            return [[] for _ in rows], "no data report to map rows to records"
        out = []
        for pos_list in positions:
            rows_emitted = [original[p] if original is not None else p for p in pos_list]
            out.append(sorted(records[r] for r in rows_emitted if 0 <= r < len(records)))
        return out, "record_indices count records of the data file from 0"


# --------------------------------------------------------------------------- skipped records


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 10_000
_REPR.maxlevel = 20


def write_skipped_records(path: str | Path, dropped: Sequence[Any]) -> None:
    """Write one JSON line per dropped record: index, line, reason and the raw record.

    The file is replaced atomically; with nothing dropped, a stale file is removed. A record that
    cannot be written as JSON (nested deeper than the encoder allows, non-JSON Python values)
    keeps a truncated ``repr`` under ``record_repr``.
    """
    path = Path(path)
    if not dropped:
        path.unlink(missing_ok=True)
        return
    lines = []
    for d in dropped:
        entry: dict[str, Any] = {"index": d.index, "line": d.line, "reason": d.reason}
        try:
            lines.append(json_text({**entry, "record": getattr(d, "record", None)}))
        except (ValueError, TypeError, RecursionError):
            lines.append(json_text({**entry, "record_repr": _REPR.repr(d.record)}))
    _write_atomic(path, "\n".join(lines) + "\n")


def _batch_rows(pending: list[Any]) -> tuple[list[list[int]], list[int]]:
    """The examples of the pending micro-batches, unpadded (padded rows are cut at the attention
    mask's length; packed rows are split where ``position_ids`` restart at 0)."""
    rows: list[list[int]] = []
    micro: list[int] = []
    for k, (_, ids, mask, position_ids) in enumerate(pending):
        if ids is None:
            continue
        ids_l = ids.detach().cpu().tolist()
        if mask is not None:
            lengths = mask.detach().cpu().sum(dim=-1).tolist()
            parts = [r[: int(n)] for r, n in zip(ids_l, lengths, strict=True)]
        elif position_ids is not None:
            parts = []
            for r, pos in zip(ids_l, position_ids.detach().cpu().tolist(), strict=True):
                starts = [i for i, p in enumerate(pos) if p == 0] + [len(r)]
                parts += [r[a:b] for a, b in itertools.pairwise(starts) if b > a]
        else:
            parts = ids_l
        rows += parts
        micro += [k] * len(parts)
    return rows, micro
