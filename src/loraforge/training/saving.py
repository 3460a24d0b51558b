"""The final save of a run: its files written into a staging folder, then moved into place.

[`save_run`][loraforge.training.saving.save_run] writes the adapter, the tokenizer,
``recipe.yaml``, ``data_report.json``, ``loss_curve.png`` and, last, ``loraforge.json`` into the
run folder that [`RunFolder`][loraforge.training.output.RunFolder] holds. Nothing in the folder
changes until every file is written and fsynced, and the run file, which marks a finished run, is
moved in last. The names moved in are recorded in the folder's marker first, so clearing the
folder later removes exactly them
(see [`run_folder_files`][loraforge.training.output.run_folder_files]).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from loraforge.data.builder import DataReport
from loraforge.data.templates import template_id
from loraforge.recipe import LoraRecipe, absolute_data_paths
from loraforge.training.files import fsync_dir
from loraforge.training.output import (
    CHECKPOINTS,
    DATA_REPORT_FILE,
    LOSS_CURVE_FILE,
    RECIPE_FILE,
    RUN_FILE,
    STAGING_PREFIX,
    record_saved,
)

__all__ = ["save_run"]


def _atomic_write(dst_dir: Path, files: dict[str, Any]) -> None:
    """Write the given files into a staging folder, then move each into place.

    Nothing in ``dst_dir`` changes until every file is written and fsynced (a full disk raises
    [`DiskFullError`][loraforge.DiskFullError] and removes the staging folder). The names about
    to be moved are recorded in the run marker first (they are loraforge's). The run file is
    removed first and moved in last, so a folder whose move was cut short never looks finished.
    """
    from loraforge.training.guards import disk_full_errors

    for old in dst_dir.glob(f"{STAGING_PREFIX}*"):  # left by a process that was killed
        shutil.rmtree(old, ignore_errors=True)
    stage = dst_dir / f"{STAGING_PREFIX}{os.getpid()}"
    try:
        with disk_full_errors(dst_dir, "saving the run to"):
            stage.mkdir(parents=True)
            for name, writer in files.items():
                writer(stage / name)
            for p in stage.iterdir():
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            record_saved(dst_dir, [p.name for p in stage.iterdir()])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (dst_dir / RUN_FILE).unlink(missing_ok=True)
    for p in sorted(stage.iterdir(), key=lambda p: p.name == RUN_FILE):  # run file last
        target = dst_dir / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(p, target)
    stage.rmdir()
    fsync_dir(dst_dir)


def save_run(
    out: Path,
    model: Any,
    tokenizer: Any,
    recipe: LoraRecipe,
    template: Any,
    model_path: str | None,
    report: DataReport,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    eval_report: DataReport | None = None,
    *,
    initial_adapter: Path | None = None,
) -> None:
    """Save a finished run into its folder, atomically: the adapter, the tokenizer,
    ``recipe.yaml``, ``data_report.json``, ``loss_curve.png`` and, last, ``loraforge.json``
    (which holds the resolved recipe too, so a finished run can be recognised even when its
    ``recipe.yaml`` is damaged). With ``initial_adapter`` (PiSSA/OLoRA, see
    [`loraforge.variants`][loraforge.variants]) the adapter is saved converted to apply to the
    original base model."""
    import peft
    import torch
    import transformers

    from loraforge import __version__
    from loraforge.fast.quant import quantization_record
    from loraforge.training.files import json_text
    from loraforge.training.guards import SKIPPED_FILE

    data = report.to_dict()
    for d in data["dropped"]:  # the raw records are in skipped.jsonl
        d.pop("record", None)
    if data["dropped"]:
        data["skipped_records_file"] = SKIPPED_FILE
    if eval_report is not None:
        data["eval"] = eval_report.to_dict()
        for d in data["eval"]["dropped"]:
            d.pop("record", None)
    run = {
        "loraforge_version": __version__,
        "template": template_id(template),
        "base_model": {
            "model": recipe.model,
            "source": recipe.model_source,
            "revision": recipe.model_revision,
            "resolved_path": str(Path(model_path).resolve()) if model_path else None,
            # QLoRA: the adapter was trained on this quantization of the base (None: 16-bit)
            "quantization": quantization_record(model),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "metrics": metrics,
        "recipe": absolute_data_paths(recipe.to_dict(), os.getcwd()),
    }

    def save_adapter(p: Path) -> None:
        p.mkdir()
        convert = {}
        if initial_adapter is not None:
            convert["path_initial_model_for_weight_conversion"] = str(initial_adapter)
        with warnings.catch_warnings():
            # PEFT's conversion loads the starting adapter beside the trained one, and warns that
            # PiSSA/OLoRA adapters should be converted: what it is doing here
            warnings.filterwarnings("ignore", message=r".* changes the base weights of the model")
            model.save_pretrained(str(p), safe_serialization=True, **convert)
        (p / "README.md").unlink(missing_ok=True)  # peft's empty model card
        for f in p.iterdir():
            os.replace(f, p.parent / f.name)
        p.rmdir()

    def save_tokenizer(p: Path) -> None:
        p.mkdir()
        tokenizer.save_pretrained(str(p))
        for f in p.iterdir():
            os.replace(f, p.parent / f.name)
        p.rmdir()

    files = {
        ".adapter": save_adapter,
        ".tokenizer": save_tokenizer,
        RECIPE_FILE: lambda p: recipe.to_yaml(p),
        DATA_REPORT_FILE: lambda p: p.write_text(json_text(data, indent=2), encoding="utf-8"),
        LOSS_CURVE_FILE: lambda p: _plot_losses(history, p),
        RUN_FILE: lambda p: p.write_text(json_text(run, indent=2), encoding="utf-8"),
    }
    _atomic_write(out, files)
    ckpts = out / CHECKPOINTS
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()


def _plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    # a Figure of its own with the Agg canvas: no pyplot, no backend switch for the caller
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_pts = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train_pts:
        ax.plot(*zip(*train_pts, strict=True), label="train loss")
    if eval_pts:
        ax.plot(*zip(*eval_pts, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train_pts or eval_pts:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
