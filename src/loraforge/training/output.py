"""The run folder: which folders loraforge writes, one run at a time, clearing, resume checks.

Layout::

    output_dir/
      .loraforge-run                                   # marker: a loraforge run folder (JSON)
      .loraforge-lock                                  # locked while a run uses the folder
      adapter_model.safetensors, adapter_config.json   # loadable by plain peft
      tokenizer.json, tokenizer_config.json, ...       # the tokenizer used (pad token included)
      recipe.yaml                                      # the resolved recipe + loraforge_version
      loraforge.json                                   # template, base model, recipe, metrics
      data_report.json                                 # what the dataset builder did
      skipped.jsonl, eval_skipped.jsonl                # records dropped, with why (if any)
      loss_curve.png                                   # train (and eval) loss
      nonfinite_batch.json                             # the batch of a diverged step (if any)
      checkpoints/checkpoint-N/                        # for resume; `.complete` marks whole ones

Rules, enforced by `RunFolder`:

* **Nothing outside loraforge's own folders is written or deleted.** A run goes into a new or
  empty folder, which gets the ``.loraforge-run`` marker, or into a folder holding that marker.
  A folder written by an earlier loraforge (``loraforge.json``, or a ``recipe.yaml`` starting
  with ``loraforge_version``) is adopted: the marker is added. Any other folder that holds files
  is refused, and so is the current working directory (or one of its parents), the home folder,
  a folder holding the training data, the base model's folder or the model cache, marked or not.
* **``overwrite_output_dir`` clears only loraforge's own files** (`run_folder_files()` and the
  names each save records in the marker); anything else in the folder stays, named in a warning.
* **One run per folder.** A run holds an exclusive ``flock`` on ``.loraforge-lock`` (with its pid
  written in it) from before it touches the folder until it ends; the OS releases it if the
  process dies. A second run is refused naming the first one's pid.
* **A finished run is never replaced by a resume.** Resuming a folder whose ``loraforge.json``
  exists (written last by the final save) with the same settings does nothing; with other
  settings, or settings that cannot be read, it is refused.
* **A merge writes only into a new or empty folder**, or one a previous merge wrote
  (`prepare_merge_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from loraforge.data.builder import DataReport, DroppedRecord
from loraforge.errors import OutputDirError, RecipeError
from loraforge.recipe import LoraRecipe, absolute_data_paths
from loraforge.training.files import fsync_dir

__all__ = [
    "CHECKPOINTS",
    "LOCK_FILE",
    "MERGE_MARKER",
    "RUN_FILE",
    "RUN_MARKER",
    "RunFolder",
    "open_run_folder",
    "prepare_merge_folder",
    "record_saved",
    "run_folder_files",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_FILE = "loraforge.json"
RECIPE_FILE = "recipe.yaml"
DATA_REPORT_FILE = "data_report.json"
LOSS_CURVE_FILE = "loss_curve.png"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
RUN_MARKER = ".loraforge-run"
LOCK_FILE = ".loraforge-lock"
MERGE_MARKER = ".loraforge-merge"
STAGING_PREFIX = ".staging-"
_RUN_FORMAT = "loraforge-run/1"
_MERGE_FORMAT = "loraforge-merge/1"
_TMP = re.compile(r"\.tmp-\d+$")  # a temporary file of an atomic write (name.tmp-<pid>)


def run_folder_files() -> frozenset[str]:
    """The names loraforge itself writes at the top of a run folder, whatever the run.

    [`save_run`][loraforge.training.saving.save_run] also records, in the ``.loraforge-run``
    marker, every name it moves into the folder (the tokenizer's files vary with the tokenizer);
    those belong to loraforge too. Staging folders (``.staging-*``) and the temporary files of
    atomic writes (``name.tmp-<pid>``) of any of these names do as well.
    """
    from loraforge.training.evaluation import EVAL_SAMPLES
    from loraforge.training.guards import NONFINITE_FILE, SKIPPED_FILE
    from loraforge.variants import INITIAL_ADAPTER

    return frozenset(
        {
            *ADAPTER_FILES,
            RECIPE_FILE,
            RUN_FILE,
            DATA_REPORT_FILE,
            LOSS_CURVE_FILE,
            SKIPPED_FILE,
            f"eval_{SKIPPED_FILE}",
            NONFINITE_FILE,
            CHECKPOINTS,
            INITIAL_ADAPTER,
            EVAL_SAMPLES,
            RUN_MARKER,
            LOCK_FILE,
        }
    )


# --------------------------------------------------------------------------- small files


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to a temporary file beside ``path``, fsync it, rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=1, ensure_ascii=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_marker(path: Path, fmt: str) -> dict[str, Any] | None:
    """The marker's contents if ``path`` is a regular file holding a marker of ``fmt``."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == fmt else None


def _write_marker(folder: Path, fmt: str, **extra: Any) -> None:
    from loraforge import __version__

    name = RUN_MARKER if fmt == _RUN_FORMAT else MERGE_MARKER
    _write_json(
        folder / name,
        {"format": fmt, "loraforge_version": __version__, "created": _now(), **extra},
    )


def record_saved(folder: Path, names: Sequence[str]) -> None:
    """Add ``names`` to the files the run marker says loraforge wrote into ``folder``."""
    marker = _read_marker(folder / RUN_MARKER, _RUN_FORMAT)
    if marker is None:
        return
    saved = marker.get("saved")
    known = {str(n) for n in saved} if isinstance(saved, list) else set()
    if not known.issuperset(names):
        _write_json(folder / RUN_MARKER, {**marker, "saved": sorted(known | set(names))})


# --------------------------------------------------------------------------- where a run may go


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_protected(out: Path, recipe: LoraRecipe) -> None:
    """Refuse an output folder that is, or holds, something that is never a run folder.

    ``out`` is resolved (symbolic links followed). Checked for every run, new or resumed, marked
    or not: these folders are never cleared, whatever marker they hold.
    """

    def refuse(why: str) -> OutputDirError:
        return OutputDirError(
            f"output_dir: {str(out)!r} {why}; choose a new or empty folder for the run "
            "(loraforge writes and clears only folders it created)"
        )

    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        if _within(cwd, out):
            raise refuse("is the current working directory or one of its parents")
    with contextlib.suppress(RuntimeError, OSError):
        home = Path.home().resolve()
        if _within(home, out):
            raise refuse("is your home folder or one of its parents")
    for setting, what in (("data", "training data"), ("eval_data", "evaluation data")):
        value = getattr(recipe, setting)
        if value and _within(Path(value).resolve(), out):
            raise refuse(f"holds the {what} file ({setting}: {value})")
    model = Path(recipe.model)
    if model.exists():  # a local folder (a hub id names none)
        if out == model.resolve():
            raise refuse(f"is the base model's folder ({recipe.model})")
        if _within(model.resolve(), out):
            raise refuse(f"holds the base model's folder ({recipe.model})")
    if recipe.cache_dir and _within(Path(recipe.cache_dir).resolve(), out):
        raise refuse(f"holds the model cache (cache_dir: {recipe.cache_dir})")


def _is_legacy_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run written by a loraforge without the marker."""
    run = folder / RUN_FILE
    if run.is_file() and not run.is_symlink():
        try:
            value = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            value = None
        if isinstance(value, dict) and "loraforge_version" in value:
            return True
    recipe = folder / RECIPE_FILE
    if recipe.is_file() and not recipe.is_symlink():
        with contextlib.suppress(OSError), open(recipe, "rb") as f:
            return f.read(64).startswith(b"loraforge_version:")  # to_yaml writes it first
    return False


def _contents(folder: Path) -> list[str]:
    """The names in ``folder``, less the lock file and the marker's temporary files."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name != LOCK_FILE and not (p.name.startswith(RUN_MARKER) and _TMP.search(p.name))
    )


def _folder_kind(out: Path) -> str:
    """``"new"``, ``"empty"``, ``"run"`` (marked) or ``"legacy"``; raises for any other folder."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise OutputDirError(f"output_dir: {str(out)!r} exists and is not a folder")
    names = _contents(out)
    if not names:
        return "empty"
    if _read_marker(out / RUN_MARKER, _RUN_FORMAT) is not None:
        return "run"
    if _is_legacy_run(out):
        return "legacy"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    why = (
        f"its {RUN_MARKER} marker is not loraforge's"
        if RUN_MARKER in names
        else f"no {RUN_MARKER} marker"
    )
    raise OutputDirError(
        f"output_dir: {str(out)!r} holds files but no loraforge run ({shown}): it was not created "
        f"by loraforge ({why}); choose an empty or new folder"
    )


def _occupied_error(out: Path) -> OutputDirError:
    return OutputDirError(
        f"output_dir: {str(out)!r} already holds files (another run?). Choose a new folder, "
        "resume it (train(recipe, resume=True) / --resume), or set overwrite_output_dir: true"
    )


# --------------------------------------------------------------------------- lock


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid not yet written"


def _lock(folder: Path) -> int | None:
    """Take the folder's exclusive, non-blocking lock; returns its file descriptor.

    Raises:
        OutputDirError: another process holds it (its pid is named).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        logger.warning("no file locks on this system: nothing stops two runs sharing %s", folder)
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise OutputDirError(
            f"output_dir: {str(folder)!r} is in use by another loraforge run ({holder}); "
            "wait for it to end or choose another output_dir"
        ) from None
    except OSError as exc:  # a filesystem without flock
        os.close(fd)
        logger.warning("cannot lock %s (%s): nothing stops two runs sharing it", folder, exc)
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # the pid goes with the lock
    os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- the run folder


class RunFolder:
    """A run's output folder, validated and locked for the life of the run.

    Use it as a context manager (``with open_run_folder(recipe, resume=...) as run:``).
    Entering validates the folder without touching it (see the module's rules), takes the
    folder's lock, marks it as a run folder, then prepares it: a new run clears loraforge's
    files when ``overwrite_output_dir`` is set; a resume checks the settings, removes incomplete
    checkpoints and finds the one to resume from. Leaving releases the lock, on every path.

    Attributes:
        path: the output folder (``recipe.output_dir``).
        checkpoint: the complete checkpoint to resume from, if any.
        finished: the ``loraforge.json`` contents when a resume was asked of a run that had
            already finished with the same settings: there is nothing to train.
    """

    def __init__(self, recipe: LoraRecipe, *, resume: bool = False) -> None:
        self.recipe = recipe
        self.resume = resume
        self.path = Path(recipe.output_dir)
        self.checkpoint: Path | None = None
        self.finished: dict[str, Any] | None = None
        self._fd: int | None = None
        self._locked = False

    def __enter__(self) -> RunFolder:
        if self._locked:
            raise RuntimeError("RunFolder is not reentrant")
        if self.path.is_symlink() and not self.path.exists():
            raise OutputDirError(f"output_dir: {str(self.path)!r} is a broken symbolic link")
        out = self.path.resolve()
        _refuse_protected(out, self.recipe)
        kind = _folder_kind(out)
        overwrite = self.recipe.overwrite_output_dir
        if kind == "legacy" and not self.resume and not overwrite:
            raise _occupied_error(self.path)  # before it gets a marker
        if kind == "new":
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputDirError(f"output_dir: cannot create {str(out)!r}: {exc}") from None
        self._fd = _lock(out)
        self._locked = True
        try:
            kind = _folder_kind(out)  # again, now that no other run can change it
            if kind != "run":
                if kind == "legacy":
                    logger.info("adopting %s, a run folder of an earlier loraforge", out)
                _write_marker(out, _RUN_FORMAT, adopted=kind == "legacy")
            if self.resume:
                self._prepare_resume(out)
            else:
                self._prepare_new(out)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Release the folder's lock (idempotent)."""
        fd, self._fd, self._locked = self._fd, None, False
        _unlock(fd)

    # ------------------------------------------------------------------ new run

    def _prepare_new(self, out: Path) -> None:
        if not [n for n in _contents(out) if n != RUN_MARKER]:
            return
        if not self.recipe.overwrite_output_dir:
            raise _occupied_error(self.path)
        logger.warning("overwrite_output_dir: clearing loraforge's files in %s", out)
        kept = _clear_run_folder(out)
        if kept:
            logger.warning(
                "overwrite_output_dir: left in place in %s what loraforge did not write: %s",
                out,
                ", ".join(kept),
            )

    # ------------------------------------------------------------------ resume

    def _prepare_resume(self, out: Path) -> None:
        from loraforge.training.checkpoints import scan_checkpoints

        recipe = self.recipe
        if (out / RUN_FILE).exists():
            self.finished = _check_finished(out, recipe)
            logger.warning(
                "resume: %s holds a finished run with the same settings; nothing to train", out
            )
            return
        # complete = manifest present and every file matching it (see loraforge.guards)
        ckpt, incomplete = scan_checkpoints(out / CHECKPOINTS)
        # refuse a different run before touching anything in its folder
        if ckpt is not None and (ckpt / RECIPE_FILE).is_file():
            _check_same_run(ckpt, recipe)  # the settings this checkpoint was trained with
        elif (out / RECIPE_FILE).is_file():
            try:
                _check_same_run(out, recipe)
            except RecipeError:
                if ckpt is not None:
                    raise
                logger.warning("resume: %s/%s is unreadable (write cut short?)", out, RECIPE_FILE)
        for p, why in incomplete:
            logger.warning("removing checkpoint %s: %s", p, why)
            _remove(p)
        for p in out.glob(f"{STAGING_PREFIX}*"):  # a final save cut short
            _remove(p)
        if ckpt is None:
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", out)
        else:
            logger.info("resuming from %s", ckpt)
        self.checkpoint = ckpt

    def data_report(self) -> DataReport:
        """The finished run's data report, read back from ``data_report.json`` (an empty report
        naming ``recipe.data`` when it cannot be read)."""
        try:
            data = json.loads((self.path / DATA_REPORT_FILE).read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(DataReport)}
            values = {k: v for k, v in data.items() if k in known}
            values["dropped"] = [
                DroppedRecord(index=d["index"], reason=d["reason"], line=d.get("line"))
                for d in values.get("dropped", [])
            ]
            return DataReport(**values)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.warning("%s/%s: unreadable (%s)", self.path, DATA_REPORT_FILE, exc)
            return DataReport(source=self.recipe.data)


def open_run_folder(recipe: LoraRecipe, *, resume: bool = False) -> RunFolder:
    """The run folder of ``recipe``, to be entered: ``with open_run_folder(recipe) as run:``.

    Args:
        recipe: the run's settings (``output_dir``, ``overwrite_output_dir`` and, to know what
            must never be a run folder, ``data``, ``eval_data``, ``model``, ``cache_dir``).
        resume: continue the run in the folder instead of starting one.

    Returns:
        A [`RunFolder`][loraforge.training.output.RunFolder]; entering it raises
        [`OutputDirError`][loraforge.OutputDirError] for a folder the run may not use.
    """
    return RunFolder(recipe, resume=resume)


def _remove(p: Path) -> None:
    """Remove a file or folder of loraforge's; a symbolic link is removed, never followed."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


def _clear_run_folder(folder: Path) -> list[str]:
    """Remove loraforge's own files from a run folder (the marker and lock stay).

    Returns:
        The names left in place because loraforge did not write them.
    """
    marker = _read_marker(folder / RUN_MARKER, _RUN_FORMAT)
    if marker is None:  # never clear a folder that is not a run folder
        raise OutputDirError(f"{str(folder)!r} is not a loraforge run folder; nothing cleared")
    saved = marker.get("saved")
    owned = set(run_folder_files()) | (
        {str(n) for n in saved} if isinstance(saved, list) else set()
    )
    kept = []
    for p in sorted(folder.iterdir()):
        if p.name in (RUN_MARKER, LOCK_FILE):
            continue
        if _TMP.sub("", p.name) in owned or p.name.startswith(STAGING_PREFIX):
            _remove(p)
        else:
            kept.append(p.name)
    _write_json(folder / RUN_MARKER, {**marker, "saved": []})
    fsync_dir(folder)
    return kept


# settings that may change between a run and its resume (they change no computed value; DDP
# and FSDP2 train the same adapter: tests/test_distributed.py)
_RESUMABLE_CHANGES = frozenset(
    {
        "distributed",
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "cache_dir",
        "eval_steps",
    }
)


# torch's AdamW in its two forms: the same update to float32 rounding, with the same optimizer
# state. A run started under the recipe's earlier default (adamw_torch) resumes under the current
# one (adamw_torch_fused), and back; it goes on in its checkpoint's form, since the saved optimizer
# state carries the flag (so a fused checkpoint goes on fused even where steps.optimizer_name
# would pick adamw_torch)
_SAME_ADAMW = frozenset({"adamw_torch", "adamw_torch_fused"})


def _changed_settings(old: LoraRecipe, recipe: LoraRecipe) -> list[str]:
    """Settings that differ, data paths compared as absolute paths (a recipe built in Python may
    name its data relative to the working folder; a saved recipe names it absolutely). The two
    forms of torch's AdamW (``adamw_torch``, ``adamw_torch_fused``) count as the same setting.
    ``pack_tokens`` left to the planner may be set on resume: each checkpoint records the rows it
    was trained on, and a resume planning other rows is refused (``training.resume``)."""
    cwd = os.getcwd()
    before = absolute_data_paths(old.to_dict(), cwd)
    now = absolute_data_paths(recipe.to_dict(), cwd)
    if before.get("pack_tokens") is None:
        before["pack_tokens"] = now.get("pack_tokens")
    if {before.get("optimizer"), now.get("optimizer")} <= _SAME_ADAMW:
        before["optimizer"] = now.get("optimizer")  # one update; the checkpoint's state fits both
    return [k for k in before if k not in _RESUMABLE_CHANGES and before[k] != now[k]]


def _check_same_run(out: Path, recipe: LoraRecipe) -> None:
    saved = out / RECIPE_FILE
    if not saved.is_file():
        return
    old = LoraRecipe.from_yaml(saved)
    diff = _changed_settings(old, recipe)
    longer = [k for k in diff if k in ("max_steps", "num_epochs")]
    if longer:  # training on for longer is allowed; the learning-rate schedule is recomputed
        logger.warning(
            "resume: %s changed (%s); the learning-rate schedule follows the new length",
            ", ".join(longer),
            ", ".join(f"{getattr(old, k)} -> {getattr(recipe, k)}" for k in longer),
        )
        diff = [k for k in diff if k not in longer]
    if diff:
        raise OutputDirError(
            f"resume: {out} holds a run with different settings ({', '.join(diff)}); "
            "resume with the same recipe or use a new output_dir"
        )


def _check_finished(out: Path, recipe: LoraRecipe) -> dict[str, Any]:
    """The finished run's ``loraforge.json`` if ``recipe`` has its settings; else refuse."""
    never = (
        "a finished run is never replaced by a resume: use a new output_dir (or, to replace it, "
        "train without resume and with overwrite_output_dir: true)"
    )
    try:
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        run, problem = None, f"{RUN_FILE} is unreadable ({exc})"
    else:
        problem = f"{RUN_FILE} is not a JSON object"
    if not isinstance(run, dict):
        raise OutputDirError(
            f"resume: {out} holds a finished run whose settings cannot be compared ({problem}); "
            + never
        )
    old: LoraRecipe | None = None
    problem = f"no recipe in {RUN_FILE} and no readable {RECIPE_FILE}"
    try:
        if isinstance(run.get("recipe"), dict):
            old = LoraRecipe.from_dict(run["recipe"], source=f"{out / RUN_FILE}")
        elif (out / RECIPE_FILE).is_file():
            old = LoraRecipe.from_yaml(out / RECIPE_FILE)
    except RecipeError as exc:
        problem = str(exc).splitlines()[0]
    if old is None:
        raise OutputDirError(
            f"resume: {out} holds a finished run whose settings cannot be compared ({problem}); "
            + never
        )
    diff = _changed_settings(old, recipe)
    if diff:
        raise OutputDirError(
            f"resume: {out} holds a finished run with different settings ({', '.join(diff)}); "
            + never
        )
    return run


# --------------------------------------------------------------------------- merge folder


def _merge_sources(model: Any, tokenizer: Any) -> list[tuple[Path, str]]:
    """The local folders a model and its tokenizer were loaded from, with what each is."""
    found: list[tuple[str, str]] = []
    if model is not None:
        config = getattr(model, "config", None)
        found.append((str(getattr(config, "_name_or_path", "") or ""), "the base model's folder"))
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict):
            for cfg in peft_config.values():
                name = getattr(cfg, "base_model_name_or_path", None) or ""
                found.append((str(name), "the base model's folder"))
    if tokenizer is not None:
        found.append((str(getattr(tokenizer, "name_or_path", "") or ""), "the tokenizer's folder"))
    out = []
    for name, label in found:
        if name and Path(name).is_dir():
            out.append((Path(name).resolve(), label))
    return out


def prepare_merge_folder(
    out: str | Path,
    *,
    protected: Sequence[str | Path | None] = (),
    model: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Check and create the folder a merged model is written to.

    A merge writes only into a new or empty folder, or one a previous merge wrote (it holds the
    ``.loraforge-merge`` marker, written here). Never into a loraforge run folder, a folder
    holding other files, or one of ``protected`` or the folders ``model`` and ``tokenizer`` were
    loaded from (the base model's, the adapter's run folder), nor a folder holding one of those.

    Args:
        out: the folder to write the merged model to.
        protected: more folders the merge must not write into or over.
        model: the model to be merged (its base model's folder is protected).
        tokenizer: its tokenizer (the folder it was loaded from is protected).

    Returns:
        ``out``, created and marked.

    Raises:
        OutputDirError: the folder may not receive the merge (the message says why).
    """
    folder = Path(out)
    target = folder.resolve()
    guarded = _merge_sources(model, tokenizer)
    guarded += [(Path(p).resolve(), "a protected folder") for p in protected if p]
    for p, label in guarded:
        if (p / RUN_FILE).is_file() or (p / RUN_MARKER).is_file():
            label = "the adapter's run folder"
        if target == p:
            raise OutputDirError(f"merge: {str(folder)!r} is {label}; choose a new or empty folder")
        if target in p.parents:
            raise OutputDirError(
                f"merge: {str(folder)!r} holds {label} ({p}); choose a new or empty folder"
            )
    if folder.is_symlink() and not folder.exists():
        raise OutputDirError(f"merge: {str(folder)!r} is a broken symbolic link")
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"merge: {str(folder)!r} exists and is not a folder")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if RUN_FILE in names or RUN_MARKER in names:
        raise OutputDirError(
            f"merge: {str(folder)!r} is a loraforge run folder; choose a new or empty folder"
        )
    if names and _read_marker(folder / MERGE_MARKER, _MERGE_FORMAT) is None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise OutputDirError(
            f"merge: {str(folder)!r} holds other files ({shown}); a merge writes only into a new "
            "or empty folder, or one a previous loraforge merge wrote"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"merge: cannot create {str(folder)!r}: {exc}") from None
    if not names:
        _write_marker(folder, _MERGE_FORMAT)
    return folder
