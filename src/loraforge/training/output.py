"""The output folder of a run: preparing it, checking a resume, and saving atomically.

Layout::

    output_dir/
      adapter_model.safetensors, adapter_config.json   # loadable by plain peft
      tokenizer.json, tokenizer_config.json, ...       # the tokenizer used (pad token included)
      recipe.yaml                                      # the resolved recipe + loraforge_version
      loraforge.json                                   # template, base model, versions, metrics
      data_report.json                                 # what the dataset builder did
      skipped.jsonl                                    # records dropped, with why (if any)
      loss_curve.png                                   # train (and eval) loss
      checkpoints/checkpoint-N/                        # for resume; `.complete` marks whole ones
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from loraforge.data.builder import DataReport
from loraforge.data.templates import template_id
from loraforge.errors import OutputDirError
from loraforge.recipe import LoraRecipe, absolute_data_paths

__all__ = ["CHECKPOINTS", "COMPLETE_MARKER", "RUN_FILE"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = ".complete"
RUN_FILE = "loraforge.json"


# --------------------------------------------------------------------------- output folder


def _prepare_output_dir(recipe: LoraRecipe, resume: bool) -> tuple[Path, Path | None]:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir: {str(out)!r} exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if resume:
        from loraforge.errors import RecipeError
        from loraforge.training.guards import scan_checkpoints

        # complete = manifest present and every file matching it (see loraforge.guards)
        ckpt, incomplete = scan_checkpoints(out / CHECKPOINTS)
        # refuse a different run before touching anything in its folder
        if ckpt is not None and (ckpt / "recipe.yaml").is_file():
            _check_same_run(ckpt, recipe)  # the settings this checkpoint was trained with
        elif (out / "recipe.yaml").is_file():
            try:
                _check_same_run(out, recipe)
            except RecipeError:
                if ckpt is not None:
                    raise
                logger.warning("resume: %s/recipe.yaml is unreadable (write cut short?)", out)
        elif occupied and ckpt is None and not incomplete:
            raise OutputDirError(
                f"resume: {str(out)!r} holds files but no loraforge run (no recipe.yaml); "
                "choose a new output_dir or set overwrite_output_dir: true"
            )
        for p, why in incomplete:
            logger.warning("removing checkpoint %s: %s", p, why)
            shutil.rmtree(p, ignore_errors=True)
        for p in out.glob(".staging-*"):  # a final save cut short
            shutil.rmtree(p, ignore_errors=True)
        if ckpt is None:
            logger.warning("resume: no complete checkpoint in %s; starting from the beginning", out)
        else:
            logger.info("resuming from %s", ckpt)
        out.mkdir(parents=True, exist_ok=True)
        return out, ckpt
    if occupied and not recipe.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir: {str(out)!r} already holds files (another run?). Choose a new folder, "
            "resume it (train(recipe, resume=True) / --resume), or set overwrite_output_dir: true"
        )
    if occupied:
        logger.warning("overwrite_output_dir: clearing %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, None


# settings that may change between a run and its resume (they change no computed value)
_RESUMABLE_CHANGES = frozenset(
    {
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


def _check_same_run(out: Path, recipe: LoraRecipe) -> None:
    saved = out / "recipe.yaml"
    if not saved.is_file():
        return
    old = LoraRecipe.from_yaml(saved)
    now = LoraRecipe.from_dict(absolute_data_paths(recipe.to_dict(), os.getcwd()))
    diff = [
        k
        for k in old.to_dict()
        if k not in _RESUMABLE_CHANGES and getattr(old, k) != getattr(now, k)
    ]
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


def _atomic_write(dst_dir: Path, files: dict[str, Any]) -> None:
    """Write the given files into a staging folder, then move each into place.

    Nothing in ``dst_dir`` changes until every file is written and fsynced (a full disk raises
    [`DiskFullError`][loraforge.DiskFullError] and removes the staging folder). The run file is
    removed first and moved in last, so a folder whose move was cut short never looks finished.
    """
    from loraforge.training.guards import disk_full_errors, fsync_dir

    for old in dst_dir.glob(".staging-*"):  # left by a process that was killed
        shutil.rmtree(old, ignore_errors=True)
    stage = dst_dir / f".staging-{os.getpid()}"
    try:
        with disk_full_errors(dst_dir, "saving the run to"):
            stage.mkdir(parents=True)
            for name, writer in files.items():
                writer(stage / name)
            for p in stage.iterdir():
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (dst_dir / RUN_FILE).unlink(missing_ok=True)
    for p in sorted(stage.iterdir(), key=lambda p: p.name == RUN_FILE):  # run file last
        target = dst_dir / p.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(p, target)
    stage.rmdir()
    fsync_dir(dst_dir)


def _save_run(
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
) -> None:
    import peft
    import torch
    import transformers

    from loraforge import __version__
    from loraforge.training.guards import SKIPPED_FILE, json_text

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
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "metrics": metrics,
    }

    def save_adapter(p: Path) -> None:
        p.mkdir()
        model.save_pretrained(str(p), safe_serialization=True)
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
        "recipe.yaml": lambda p: recipe.to_yaml(p),
        "data_report.json": lambda p: p.write_text(json_text(data, indent=2), encoding="utf-8"),
        "loss_curve.png": lambda p: _plot_losses(history, p),
        RUN_FILE: lambda p: p.write_text(json_text(run, indent=2), encoding="utf-8"),
    }
    _atomic_write(out, files)
    ckpts = out / CHECKPOINTS
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()


def _plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
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
    plt.close(fig)
