"""Resume that trains exactly what was asked: the checkpoint to start from, and the same data.

* [`data_fingerprint`][loraforge.training.resume.data_fingerprint]: the content hash of the
  training (and evaluation) data, stored with every checkpoint and in the run file.
* [`resume_point`][loraforge.training.resume.resume_point]: the newest complete checkpoint at or
  before the step the recipe trains to; a checkpoint *at* that step means training is already
  done and only the final save is left (transformers' Trainer would otherwise train one step
  more); a resume whose data changed is refused unless allowed.
* [`load_checkpoint_adapter`][loraforge.training.resume.load_checkpoint_adapter]: the adapter
  weights and log history of such a finished checkpoint, for the final save.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import OutputDirError
from loraforge.training.checkpoints import check_checkpoint, checkpoint_step

__all__ = [
    "DATA_FINGERPRINT_FILE",
    "ResumePoint",
    "data_fingerprint",
    "load_checkpoint_adapter",
    "processes_fingerprint",
    "resume_point",
    "rows_fingerprint",
]

logger = logging.getLogger(__name__)

DATA_FINGERPRINT_FILE = "loraforge_data.json"
"""Written into each checkpoint (by ``training.loop.MarkComplete``): the data it was trained on."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(recipe: Any) -> dict[str, dict[str, Any]]:
    """``{"data": {"path", "bytes", "sha256"}, "eval_data": ...}`` for the recipe's data files;
    for a ``datasets`` folder or a hub id, what
    [`source_fingerprint`][loraforge.data.sources.source_fingerprint] records (kind, id, split,
    revision, records and the ``sha256`` of their content)."""
    from loraforge.data.sources import data_kind, source_fingerprint

    out: dict[str, dict[str, Any]] = {}
    for key in ("data", "eval_data"):
        value = getattr(recipe, key, None)
        if value and data_kind(value, getattr(recipe, "data_source", "local")) != "file":
            out[key] = source_fingerprint(recipe, key)
        elif value:
            path = Path(value)
            out[key] = {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def processes_fingerprint(ranks: Any) -> dict[str, dict[str, Any]]:
    """``{"processes": {"count": N}}``: saved with each checkpoint beside the data's fingerprint,
    so that a resume on another number of processes is refused (the step would hold another
    number of micro-batches)."""
    return {_PROCESSES: {"count": int(ranks.world_size)}}


def rows_fingerprint(pack_tokens: int | None) -> dict[str, dict[str, Any]]:
    """``{"rows": {"pack_tokens": N}}`` (``None`` without packing): saved with each checkpoint,
    so that a resume whose plan packs rows of another size is refused (the planner chooses the
    size from the card, ``max_memory_gib`` and loraforge's cost model; the optimizer steps would
    hold other examples and the schedule would have another length)."""
    return {_ROWS: {"pack_tokens": pack_tokens}}


_PROCESSES = "processes"
_ROWS = "rows"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a resumed run starts.

    Attributes:
        checkpoint: the checkpoint to load, or ``None`` to start from the beginning.
        step: its step (0 without one).
        finished: the checkpoint is at the run's last step: nothing is left to train.
    """

    checkpoint: Path | None
    step: int = 0
    finished: bool = False


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None and check_checkpoint(p) is None)


def resume_point(
    checkpoints: Path,
    total_steps: int,
    fingerprint: Mapping[str, Any],
    *,
    allow_changed_data: bool = False,
) -> ResumePoint:
    """The complete checkpoint under ``checkpoints`` to resume a run of ``total_steps`` from.

    Raises:
        OutputDirError: every complete checkpoint is past ``total_steps`` (a lowered
            ``max_steps``), or the data changed since the checkpoint was saved and
            ``allow_changed_data`` is false.
    """
    complete = _complete_checkpoints(checkpoints)
    if not complete:
        return ResumePoint(None)
    usable = [(s, p) for s, p in complete if s <= total_steps]
    if not usable:
        step = complete[-1][0]
        raise OutputDirError(
            f"resume: the newest complete checkpoint ({complete[-1][1]}) is at step {step}, past "
            f"the {total_steps} steps this recipe trains (max_steps / num_epochs lowered?). "
            f"Resume with max_steps >= {step}, or start a new output_dir"
        )
    if len(usable) < len(complete):
        logger.warning(
            "resume: checkpoints past step %d (%s) are kept but not used: the recipe trains %d "
            "steps",
            total_steps,
            ", ".join(p.name for s, p in complete if s > total_steps),
            total_steps,
        )
    step, ckpt = usable[-1]
    _check_data(ckpt, fingerprint, allow_changed_data)
    return ResumePoint(ckpt, step, finished=step == total_steps)


def _check_data(ckpt: Path, fingerprint: Mapping[str, Any], allow: bool) -> None:
    saved_file = ckpt / DATA_FINGERPRINT_FILE
    if not saved_file.is_file():
        logger.warning("resume: %s records no data fingerprint (older loraforge)", ckpt)
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    _check_processes(ckpt, saved, fingerprint)
    _check_rows(ckpt, saved, fingerprint)
    changed = [
        key
        for key in sorted((set(saved) | set(fingerprint)) - {_PROCESSES, _ROWS})
        if (saved.get(key) or {}).get("sha256") != (fingerprint.get(key) or {}).get("sha256")
    ]
    if not changed:
        return
    names = ", ".join(
        f"{key} ({(fingerprint.get(key) or saved.get(key) or {}).get('path')})" for key in changed
    )
    if allow:
        logger.warning("resume: %s changed since %s was saved; resuming as allowed", names, ckpt)
        return
    raise OutputDirError(
        f"resume: {names} changed since {ckpt} was saved (its content hash differs); resuming "
        "would train the rest of the run on other data. Restore the file, start a new "
        "output_dir, or allow it (train(..., allow_changed_data=True) / "
        "loraforge train --resume --allow-changed-data)"
    )


def _check_processes(ckpt: Path, saved: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    before = (saved.get(_PROCESSES) or {}).get("count", 1)  # older checkpoints: one process
    now = (fingerprint.get(_PROCESSES) or {}).get("count", 1)
    if before == now:
        return
    raise OutputDirError(
        f"resume: {ckpt} was saved by a run of {before} process(es), and this run has {now}: an "
        f"optimizer step would hold {now}/{before} times the micro-batches it held, so the rest "
        "of the run would follow another schedule over other batches. Resume with the same "
        f"number of processes (torchrun --nproc_per_node {before} ... / accelerate launch "
        f"--num_processes {before} ...), or start a new output_dir"
    )


def _check_rows(ckpt: Path, saved: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    if _ROWS not in fingerprint:
        return
    if _ROWS not in saved:  # saved by an older loraforge
        logger.warning(
            "resume: %s records no row size (older loraforge); if this run packs rows of "
            "another size than it did (pack_tokens), the rest follows another schedule",
            ckpt,
        )
        return
    before, now = saved[_ROWS].get("pack_tokens"), fingerprint[_ROWS].get("pack_tokens")
    if before == now:
        return

    def rows(n: Any) -> str:
        return f"packed rows of {n} tokens" if n else "no packing"

    fix = (
        f"set pack_tokens: {before} in the recipe (loraforge train ... --resume --set "
        f"pack_tokens={before})"
        if before
        else "set packing: off in the recipe"
    )
    raise OutputDirError(
        f"resume: {ckpt} was saved by a run of {rows(before)}, and this run plans {rows(now)} "
        "(the planner sizes rows from the card, max_memory_gib and loraforge's version): the "
        "rest of the run would follow another schedule over other batches. To resume, "
        f"{fix}; or start a new output_dir"
    )


def load_checkpoint_adapter(model: Any, ckpt: Path) -> list[dict[str, Any]]:
    """Load a checkpoint's adapter weights into the PEFT ``model``; returns its log history."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise OutputDirError(f"resume: {weights} holds weights the model lacks: {unexpected[:5]}")
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return list(state.get("log_history", []))
