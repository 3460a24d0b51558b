"""Runs of `train()` in every process of a launch (``torchrun --nproc_per_node N``).

``python -m torch.distributed.run --nproc_per_node 2 tests/_dist_child.py spec.json`` trains each
run of ``spec["runs"]`` in turn on the tiny demo model (``spec["base"]``), with the demo recipe
and the run's ``set`` overrides, and appends ``{"rank", "out", "steps"}`` to
``results-<rank>.jsonl`` beside the spec. Options of a run:

* ``"kill_at_step": N``: SIGKILL every process at the end of optimizer step N (kill -9 of all
  ranks mid-run); put such a run last;
* ``"poison_at_step": N``: make the adapter non-finite on the last process only, before step N
  (a non-finite loss on one process);
* ``"expect_error": "Type"``: the run must raise that exception (appended as
  ``{"rank", "out", "error", "message"}``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loraforge import train
from loraforge.demo import demo_recipe


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonLastRank(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step + 1 == self.step and args.process_index == args.world_size - 1:
            import torch

            with torch.no_grad():
                for name, p in kw["model"].named_parameters():
                    if "lora_B" in name:
                        p.fill_(float("inf"))


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    results = Path(path).with_name(f"results-{rank}.jsonl")

    def note(**entry: Any) -> None:
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": rank, **entry}) + "\n")

    for run in spec["runs"]:
        recipe = demo_recipe(spec["base"], run["out"], **run.get("set", {}))
        callbacks: list[Any] = [KillAt(run["kill_at_step"])] if "kill_at_step" in run else []
        if "poison_at_step" in run:
            callbacks.append(PoisonLastRank(run["poison_at_step"]))
        try:
            result = train(recipe, resume=run.get("resume", False), callbacks=callbacks)
        except Exception as exc:
            if type(exc).__name__ != run.get("expect_error"):
                raise
            note(out=run["out"], error=type(exc).__name__, message=str(exc))
            continue
        note(out=run["out"], steps=result.metrics["steps"])


if __name__ == "__main__":
    main(sys.argv[1])
