"""transformers' Trainer as loraforge runs it: one subclass, its callbacks, and the step trims.

* [`build_hf_trainer`][loraforge.training.loop.build_hf_trainer]: a ``transformers.Trainer`` whose
  ``compute_loss`` hands each training micro-batch and its loss to the non-finite guard and, on
  the packed path with a detachable head, runs the forward with the head detached so the loss
  applies it in chunks (a batch with ``inputs_embeds``, gathered from a table in host memory, is
  given to the model without its ``input_ids``); and whose ``floating_point_ops`` counts from a
  cached parameter count.
  Under FSDP2 (a [`ReplicatedAdapter`][loraforge.training.distributed.ReplicatedAdapter] given)
  it trains the sharded model under the accelerator's autocast instead of a DDP wrapper,
  averages the adapter's gradients once per step, and reshards on every process before an
  evaluation and after a checkpoint. Everything the subclass uses is given to it when it is
  built; nothing is found by searching.
* [`PlainLog`][loraforge.training.loop.PlainLog] and
  [`MarkComplete`][loraforge.training.loop.MarkComplete]: a plain log line per logging step, and
  the manifest that marks a checkpoint complete (with the run's recipe and data fingerprint).
* [`lighter_steps`][loraforge.training.loop.lighter_steps]: the per-step CPU work a GPU waits
  for, trimmed on this model instance only and for the length of the fit; it restores what it
  changes. The garbage collector's state is never changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from loraforge.errors import TrainingDivergedError
from loraforge.fast.losses import detached_head
from loraforge.training import checkpoints, guards
from loraforge.training.distributed import Ranks, ReplicatedAdapter, agreed
from loraforge.training.nonfinite import NonFiniteGuard
from loraforge.training.resume import DATA_FINGERPRINT_FILE

__all__ = [
    "MarkComplete",
    "PlainLog",
    "build_hf_trainer",
    "lighter_steps",
    "quiet_progress",
]

logger = logging.getLogger(__name__)


class _LoraForgeTrainer(Trainer):
    """``transformers.Trainer`` with the hooks the module's docstring lists overridden."""

    def __init__(
        self,
        *args: Any,
        guard: NonFiniteGuard | None = None,
        detach_head: bool = False,
        replicated: ReplicatedAdapter | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self._guard = guard
        self._detach_head = detach_head
        self._replicated = replicated
        self._n_params: int | None = None
        self._micro = (-1, 0)  # (optimizer step, micro-batches of it seen on this process)

    def _wrap_model(self, model: Any, training: bool = True, dataloader: Any = None) -> Any:
        if self._replicated is not None and training:  # FSDP2: no DDP around the shards
            return self._replicated.trained_module(self.accelerator.autocast)
        return super()._wrap_model(model, training=training, dataloader=dataloader)

    def evaluate(self, *args: Any, **kw: Any) -> Any:
        if self._replicated is not None:  # FSDP2: every process starts from the same shards
            self._replicated.reshard()
        return super().evaluate(*args, **kw)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._replicated is not None:  # the main process's state dict resharded its root
            self._replicated.reshard()

    def training_step(self, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
        loss = super().training_step(model, inputs, *args, **kw)
        if self._replicated is not None and self.accelerator.sync_gradients:
            self._replicated.average_gradients()  # after the step's last backward pass
        return loss

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        import torch

        if model.training and torch.is_grad_enabled():
            torch.manual_seed(self._micro_batch_seed())
        # rows gathered from an input embedding table in host memory: the model takes those
        # (it refuses both); the ids stay in the batch for the guard
        given = (
            {k: v for k, v in inputs.items() if k != "input_ids"}
            if "inputs_embeds" in inputs
            else inputs
        )
        with detached_head(self.model) if self._detach_head else contextlib.nullcontext():
            loss, outputs = super().compute_loss(
                model, given, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if self._guard is not None and model.training and torch.is_grad_enabled():
            self._guard.record(loss, inputs)
        return (loss, outputs) if return_outputs else loss

    def _micro_batch_seed(self) -> int:
        """A seed for this training micro-batch's random numbers (LoRA dropout) from the run's
        seed and the micro-batch's place in the run: its optimizer step, its index in the step
        and its process. Process ``r`` of ``N`` takes the step's micro-batches ``j * N + r``, the
        one process of a run with ``N`` times the accumulation takes them all in that order: the
        same micro-batch draws the same masks whatever the number of processes (and a resumed
        run the masks of an uninterrupted one)."""
        args, step = self.args, self.state.global_step
        seen = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, seen + 1)
        index = (step * args.gradient_accumulation_steps + seen) * args.world_size
        index += args.process_index
        return (args.seed * 1_000_003 + index) % 2**63

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        ids = inputs.get("input_ids")
        if ids is None:
            return 0
        if self._n_params is None:  # the base class walks every parameter at every step
            count = getattr(self.model, "num_parameters", None)
            self._n_params = int(count(exclude_embeddings=True)) if count else 0
        return 6 * ids.numel() * self._n_params


def build_hf_trainer(
    *,
    guard: NonFiniteGuard | None = None,
    detach_head: bool = False,
    replicated: ReplicatedAdapter | None = None,
    **kwargs: Any,
) -> Trainer:
    """A ``transformers.Trainer`` (``kwargs`` as its constructor takes them) that feeds ``guard``;
    with ``detach_head``, lets a [`PackedLoss`][loraforge.fast.losses.PackedLoss] holding the
    real head apply it in chunks; with ``replicated`` (FSDP2), trains the sharded model through
    it and averages the adapter's gradients over the processes at each optimizer step."""
    return _LoraForgeTrainer(guard=guard, detach_head=detach_head, replicated=replicated, **kwargs)


class PlainLog(TrainerCallback):
    """A plain log line every ``logging_steps``."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                v = logs[key]
                parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
        logger.info(" | ".join(parts))


class MarkComplete(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it: copy the run's recipe
    and the data fingerprint into it, fsync it and write its manifest
    (see [`loraforge.training.guards`][loraforge.training.guards])."""

    def __init__(
        self, recipe_file: Path, data_fingerprint: Mapping[str, Any], ranks: Ranks | None = None
    ) -> None:
        self.recipe_file = recipe_file
        self.data_fingerprint = dict(data_fingerprint)
        self.ranks = ranks or Ranks()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # every process checks its weights; the main process marks; all stop if any fails
        with agreed(self.ranks):
            self._mark(args, state, kw.get("model"))

    def _mark(self, args: Any, state: Any, model: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if model is not None and not guards.parameters_finite(model):
            raise TrainingDivergedError(
                f"training diverged: non-finite weights at step {state.global_step}; "
                f"{ckpt} is left unmarked and will not be resumed",
                step=state.global_step,
                kind="parameter",
            )
        if not self.ranks.main or not ckpt.is_dir():
            return
        with guards.disk_full_errors(ckpt, "marking the checkpoint"):
            if self.recipe_file.is_file():
                shutil.copyfile(self.recipe_file, ckpt / "recipe.yaml")
            (ckpt / DATA_FINGERPRINT_FILE).write_text(
                json.dumps(self.data_fingerprint, indent=1), encoding="utf-8"
            )
            checkpoints.mark_complete(ckpt, state.global_step)


def quiet_progress(trainer: Any) -> None:
    """Keep the Trainer's progress bar but not its printed log dicts (loraforge logs each line)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Progress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            return None

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Progress())
    trainer.pop_callback(PrinterCallback)


@contextlib.contextmanager
def lighter_steps(model: Any) -> Iterator[None]:
    """Trim the Trainer's per-step CPU work, which a GPU waits for after each optimizer step:
    ``model.train()`` walks every module with method calls although they are all training
    already, and ``model.zero_grad()`` every parameter although only the adapter's have
    gradients. Set on this model instance only; both are the model's own again afterwards."""
    modules = list(model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    full_train = model.train

    def train(mode: bool = True) -> Any:
        if mode and all(m.training for m in modules):
            return model
        return full_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for p in trainable:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    model.train = train
    model.zero_grad = zero_grad
    try:
        yield
    finally:
        del model.train
        del model.zero_grad
