"""Stop training at the first non-finite loss or gradient, naming the step and its records.

[`NonFiniteGuard`][loraforge.training.nonfinite.NonFiniteGuard] checks each micro-batch's loss
and the gradients at every optimizer step and raises
[`TrainingDivergedError`][loraforge.TrainingDivergedError] naming the step, after writing the
offending batch's record indices to ``nonfinite_batch.json``. On the CPU the check runs before
the optimizer step; on a GPU it is read one step late (so the GPU never waits for it) and at once
before any checkpoint, log line or evaluation, so no checkpoint or final adapter holds a
non-finite update.

How a batch is traced back to records: the trainer hands the guard each training micro-batch
and its loss (a reference to the ``input_ids``; nothing is copied). Only when a check fails does
the guard hash each unpadded row and look the hash up among the training examples, each of which
carries the index of the record it was built from. Identical examples cannot be told apart: all
their indices are listed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loraforge.errors import TrainingDivergedError
from loraforge.training.checkpoints import scan_checkpoints
from loraforge.training.distributed import Ranks, all_true, on_all, on_main
from loraforge.training.files import json_text, write_atomic
from loraforge.training.guards import NONFINITE_FILE

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger(__name__)


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

    The trainer hands it each training micro-batch and its loss
    ([`record`][loraforge.training.nonfinite.NonFiniteGuard.record]); the guard holds no hook on
    the model.

    Args:
        output_dir: where ``nonfinite_batch.json`` is written.
        examples: the training examples' ``input_ids``, in dataset order (to trace a batch's rows
            back to examples).
        record_indices: for each example, the index of the record it was built from (counted
            from 0 in the data file).
        source: the data file's name, for the error message.
        check_gradients: also check gradients (leave on except with fp16 loss scaling, where
            overflowing gradients are expected and skipped by the grad scaler).
        defer: read each step's verdict one step late (None: on a GPU).
        ranks: this process's place among several: the verdict is and-ed over all of them (on
            the device, without waiting), so every process stops at the same step with the same
            error, and the main process writes ``nonfinite_batch.json`` with every process's
            rows.
    """

    def __init__(
        self,
        output_dir: str | Path,
        examples: Sequence[Sequence[int]] = (),
        record_indices: Sequence[int] = (),
        source: str | None = None,
        *,
        check_gradients: bool = True,
        defer: bool | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.ranks = ranks or Ranks()
        self.output_dir = Path(output_dir)
        self.examples = examples
        self.record_indices = record_indices
        self.source = source
        self.check_gradients = check_gradients
        self.defer = defer
        self._pending: list[tuple[Any, Any, Any, Any]] = []
        self._deferred: tuple[Any, ...] | None = None
        self._params: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model = kw.get("model")
        if getattr(args, "fp16", False) and self.check_gradients:
            logger.info("fp16 loss scaling: non-finite gradients are left to the grad scaler")
            self.check_gradients = False
        if model is not None:
            self._params = [p for p in model.parameters() if p.requires_grad]

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        try:
            self._check_deferred(args)
        finally:
            self._reset()

    def _reset(self) -> None:
        self._pending.clear()
        self._deferred = None

    def record(self, loss: Any, inputs: Mapping[str, Any]) -> None:
        """Note a training micro-batch (its ``input_ids``, ``attention_mask``, ``position_ids``)
        and its loss; they are checked at the next optimizer step."""
        import torch

        self._pending.append(
            (
                loss.detach() if torch.is_tensor(loss) else None,
                inputs.get("input_ids"),
                inputs.get("attention_mask"),
                inputs.get("position_ids"),
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
        if self.ranks.several:  # the last flag: every process's flags were all true
            flag = torch.cat([flag, all_true(self.ranks, flag.all()).reshape(1)])
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
        own = values[:-1] if self.ranks.several else values
        if all(own):  # another process's loss or gradient
            self._fail(step, "", math.nan, pending, args)
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
        """Write the failing step's rows (the main process, with every process's rows) and
        raise; ``kind`` is empty on a process whose own flags were all true."""
        try:
            rows, micro = _batch_rows(pending)
            matches, note = self._trace(rows)
        except Exception as exc:  # tracing is best effort; the error below must still be raised
            rows, micro, matches = [], [], []
            note = f"the batch could not be traced ({type(exc).__name__}: {exc})"
        local: dict[str, Any] = {
            "kind": kind,
            "value": repr(value),
            "note": note,
            "rows": [
                {"micro_batch": k, "tokens": len(r), "record_indices": m}
                for k, r, m in zip(micro, rows, matches, strict=True)
            ],
        }
        every = on_all(self.ranks, local)  # all processes fail at this step together
        # the first process whose loss went non-finite (the cause), else whose gradients did
        first = next((x for x in every if x["kind"] == "loss"), None)
        first = first or next((x for x in every if x["kind"]), local)
        kind, value_text = first["kind"] or "loss or gradient", first["value"]
        if self.ranks.several:
            for n, x in enumerate(every):
                for r in x["rows"]:
                    r["process"] = n
        all_rows = [r for x in every for r in x["rows"]]
        indices = sorted({i for r in all_rows for i in r["record_indices"]})
        checkpoint, _ = scan_checkpoints(Path(args.output_dir))
        batch_file = self.output_dir / NONFINITE_FILE
        info = {
            "step": step,
            "kind": kind,
            "value": value_text,
            "source": self.source,
            "record_indices": indices,
            "note": first["note"],
            "rows": all_rows,
            "last_complete_checkpoint": str(checkpoint) if checkpoint else None,
        }

        def write() -> bool:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(batch_file, json_text(info, indent=2))
            except OSError:
                return False
            return True

        written = on_main(self.ranks, write, f"writing {batch_file}")
        self._reset()
        kept = (
            f"the last complete checkpoint is {checkpoint}"
            if checkpoint
            else "no checkpoint had been saved yet"
        )
        where = f"see {batch_file}" if written else f"{batch_file} could not be written"
        raise TrainingDivergedError(
            f"training diverged at step {step}: non-finite {kind} ({value_text}); stopped before "
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
        if not self.examples or not rows:
            return [[] for _ in rows], "no training examples given to the guard"
        if len(self.record_indices) != len(self.examples):
            return [[] for _ in rows], "no record index for the training examples"
        want: dict[bytes, list[int]] = {}
        for n, r in enumerate(rows):
            want.setdefault(_row_key(r), []).append(n)
        out: list[list[int]] = [[] for _ in rows]
        for pos, ids in enumerate(self.examples):
            for n in want.get(_row_key(ids), ()):
                out[n].append(int(self.record_indices[pos]))
        return [sorted(m) for m in out], "record_indices count records of the data file from 0"


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
