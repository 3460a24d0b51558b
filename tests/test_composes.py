"""loraforge changes nothing outside the model instance it was given.

Run in a fresh interpreter, so that what is compared is the process as a user's script or
notebook has it: transformers' modeling module, the warning filters, matplotlib's backend, the
garbage collector, torch's global switches. One interpreter trains and chats padded, then packed
(one import of torch and transformers instead of two); each run's snapshot is compared with the
one taken before loraforge was imported.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import background

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, warnings
    import matplotlib
    matplotlib.use("svg")  # the caller's choice, which loraforge must keep
    import torch
    import transformers
    from transformers.models.phi3 import modeling_phi3

    def snapshot():
        return {
            "phi3": {k: id(v) for k, v in vars(modeling_phi3).items() if not k.startswith("__")},
            "phi3_classes": {
                k: {a: id(b) for a, b in vars(v).items()}
                for k, v in vars(modeling_phi3).items()
                if isinstance(v, type) and v.__module__ == modeling_phi3.__name__
            },
            "filters": [repr(f) for f in warnings.filters],
            "backend": matplotlib.get_backend(),
            "gc_enabled": gc.isenabled(),
            "gc_frozen": gc.get_freeze_count() > 0,
            "grad": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "threads": torch.get_num_threads(),
            "default_dtype": str(torch.get_default_dtype()),
            "attention": sorted(transformers.AttentionInterface._global_mapping),
        }

    before = snapshot()
    import loraforge
    from loraforge.demo import demo_recipe, prepare_tiny_base
    base = prepare_tiny_base(sys.argv[1] + "/base", hidden_size=32)
    after = {}
    for packing in sys.argv[2:]:
        out = sys.argv[1] + "/out-" + packing
        recipe = demo_recipe(base, out, num_epochs=2, packing=packing)
        result = loraforge.train(recipe)
        chat = loraforge.load_for_inference(result.output_dir, device="cpu")
        chat.chat("hi", max_new_tokens=4)
        after[packing] = snapshot()
    print(json.dumps({"before": before, "after": after}))
    """
)
PACKING = ["off", "on"]


def _both_runs(folder: Path) -> dict:
    """One fresh interpreter's snapshots: before loraforge, and after each run (padded first)."""
    return {"args": [sys.executable, "-c", SCRIPT, str(folder), *PACKING]}


@background(_both_runs)
@pytest.mark.parametrize("packing", PACKING)
def test_train_and_chat_leave_the_process_as_they_found_it(background_run, packing: str):
    root, proc = background_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    snapshots = json.loads(proc.stdout.strip().splitlines()[-1])
    # compared with the process before loraforge was imported, also for the second run
    before, after = snapshots["before"], snapshots["after"][packing]
    # transformers caches a class-level probe result on first use (``*_cached_value``): its own
    # doing, which a model built without loraforge does too
    for name, attrs in after["phi3_classes"].items():
        for attr in [a for a in attrs if a not in before["phi3_classes"][name]]:
            assert attr.endswith("_cached_value"), (name, attr)
            del attrs[attr]
    for key in before:
        assert after[key] == before[key], key
    assert after["backend"] == "svg"
    assert (root / f"out-{packing}" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
