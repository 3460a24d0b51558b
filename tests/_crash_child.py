"""One `train()` run in a child process that can kill itself with SIGKILL at a chosen moment.

tests/test_reliability.py starts these children from a multiprocessing *forkserver* that has
imported torch, transformers and loraforge once (``preload``), so a child starts in a fraction of
a second instead of ~8 s. Each child is an ordinary process: the test can also SIGKILL it from
outside at a random time.

A crash point is installed by patching transformers / loraforge internals *in the child only*;
the library holds no test hooks. ``spec["crash"]`` is one of:

==========================  ====================================================================
``step_end:N``              after optimizer step N (between checkpoints)
``save_weights:N``          saving checkpoint N: adapter written, optimizer state not yet
``save_optimizer_half:N``   saving checkpoint N: half of ``optimizer.pt`` written
``save_rng:N``              saving checkpoint N: ``rng_state.pth`` written, trainer state not yet
``save_unmarked:N``         the Trainer finished checkpoint N, loraforge has not marked it yet
``save_marking:N``          the manifest of checkpoint N written to its temp file, not renamed
``rotate:N``                after saving N, rotation deleting the oldest checkpoint: half of
                            its files gone (its ``.complete`` marker kept), then killed
``resume_load``             loading the checkpoint a resumed run starts from
``final_save``              the final save: two files moved into the output folder, not the rest
==========================  ====================================================================

The child appends what it is doing to ``spec["journal"]`` (one line per event: ``start``,
``resume-from <checkpoint|none>``, ``train-begin``, ``step N``, ``save-begin N``, ``saved N``,
``final-save``, ``done``, ``crash <point>``), so the test knows in which phase a kill landed.
``spec["slow"]`` (``{"step": s, "save": s}``) sleeps after each step and twice inside each
checkpoint save, widening those windows for kills at random times (the arithmetic is unchanged).
Run directly (``python tests/_crash_child.py spec.json``) it does the same without a forkserver.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Imported here so that a forkserver preloading this module has them all in memory.
import peft  # noqa: F401
import torch
import transformers
import transformers.trainer
from transformers import TrainerCallback

from loraforge.demo import demo_recipe

lf_train = importlib.import_module("loraforge.training.trainer")


def journal(spec: dict[str, Any], event: str) -> None:
    with open(spec["journal"], "a", encoding="utf-8") as f:
        f.write(f"{time.monotonic():.4f} {event}\n")


def _die(spec: dict[str, Any], point: str) -> None:
    journal(spec, f"crash {point}")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _install(spec: dict[str, Any]) -> None:
    """Journal the phases and install the requested crash point."""
    point, _, n = (spec.get("crash") or "").partition(":")
    step = int(n) if n else None
    slow = spec.get("slow") or {}  # seconds added to widen the windows of random kills
    Trainer = transformers.trainer.Trainer

    def at(s: int) -> bool:
        return step is not None and s == step

    save_checkpoint = Trainer._save_checkpoint

    def _save_checkpoint(self: Any, model: Any, trial: Any) -> None:
        journal(spec, f"save-begin {self.state.global_step}")
        save_checkpoint(self, model, trial)
        if point == "save_unmarked" and at(self.state.global_step):
            _die(spec, spec["crash"])

    Trainer._save_checkpoint = _save_checkpoint

    save_opt = Trainer._save_optimizer_and_scheduler

    def _save_optimizer_and_scheduler(self: Any, output_dir: str) -> None:
        if point == "save_weights" and at(self.state.global_step):
            _die(spec, spec["crash"])
        time.sleep(slow.get("save", 0))  # adapter written, optimizer state not yet
        save_opt(self, output_dir)

    Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler

    save_rng = Trainer._save_rng_state

    def _save_rng_state(self: Any, output_dir: str) -> None:
        save_rng(self, output_dir)
        time.sleep(slow.get("save", 0))  # trainer_state.json not written yet
        if point == "save_rng" and at(self.state.global_step):
            _die(spec, spec["crash"])

    Trainer._save_rng_state = _save_rng_state

    load_ckpt = Trainer._load_from_checkpoint

    def _load_from_checkpoint(self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
        if point == "resume_load":
            _die(spec, spec["crash"])
        load_ckpt(self, resume_from_checkpoint, model)

    Trainer._load_from_checkpoint = _load_from_checkpoint

    torch_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
        name = str(f)
        if (
            point == "save_optimizer_half"
            and name.endswith("optimizer.pt")
            and Path(name).parent.name == f"checkpoint-{step}"
        ):
            buf = io.BytesIO()
            torch_save(obj, buf, *args, **kw)
            data = buf.getvalue()
            with open(name, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            _die(spec, spec["crash"])
        torch_save(obj, f, *args, **kw)

    torch.save = save

    replace = os.replace
    moved = [0]

    def _replace(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        s, d = Path(src), Path(dst)
        if point == "save_marking" and d.name == ".complete" and d.parent.name.endswith(f"-{step}"):
            _die(spec, spec["crash"])
        if point == "final_save" and s.parent.name.startswith(".staging-"):
            moved[0] += 1
            if moved[0] > 2:
                _die(spec, spec["crash"])
        replace(src, dst, *args, **kw)

    os.replace = _replace

    rotate = transformers.trainer.rotate_checkpoints

    def rotate_checkpoints(output_dir: str, save_total_limit: Any = None, **kw: Any) -> None:
        from transformers.trainer_utils import sort_checkpoints

        ckpts = sort_checkpoints(output_dir, use_mtime=False)
        newest = ckpts[-1] if ckpts else ""
        if (
            point == "rotate"
            and newest.endswith(f"checkpoint-{step}")
            and save_total_limit
            and len(ckpts) > save_total_limit
        ):
            victim = Path(ckpts[0])
            files = sorted(p for p in victim.iterdir() if p.is_file() and p.name != ".complete")
            for p in files[::2]:
                p.unlink()
            _die(spec, spec["crash"])
        rotate(output_dir, save_total_limit=save_total_limit, **kw)

    transformers.trainer.rotate_checkpoints = rotate_checkpoints

    start_point = lf_train.start_point

    def _start_point(*args: Any, **kw: Any) -> Any:
        start = start_point(*args, **kw)
        journal(spec, f"resume-from {start.checkpoint.name if start.checkpoint else 'none'}")
        return start

    lf_train.start_point = _start_point

    save_run = lf_train.save_run

    def _save_run(*args: Any, **kw: Any) -> None:
        journal(spec, "final-save")
        save_run(*args, **kw)

    lf_train.save_run = _save_run

    class Journal(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            journal(spec, "train-begin")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            journal(spec, f"step {state.global_step}")
            time.sleep(slow.get("step", 0))
            if point == "step_end" and at(state.global_step):
                _die(spec, spec["crash"])

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            journal(spec, f"saved {state.global_step}")  # runs after loraforge's marker

    spec["_callbacks"] = [Journal()]


def run(spec: dict[str, Any]) -> None:
    """Train as ``spec`` says: ``base``, ``out``, ``recipe`` (overrides of demo_recipe),
    ``resume``, ``crash`` (see the module doc), ``journal``, ``log`` and ``result`` paths."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    torch.set_num_threads(1)  # same arithmetic in every child, whatever the machine
    journal(spec, "start")
    _install(spec)
    recipe = demo_recipe(spec["base"], spec["out"], **spec["recipe"])
    res = lf_train.train(recipe, resume=spec.get("resume", False), callbacks=spec.pop("_callbacks"))
    Path(spec["result"]).write_text(json.dumps({"steps": res.metrics["steps"]}))
    journal(spec, "done")


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
