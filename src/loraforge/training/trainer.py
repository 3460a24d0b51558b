"""`train(recipe)`: a LoRA fine-tune from a recipe to a self-describing output folder.

The function reads top to bottom as the steps of a run: prepare the output folder, load the
tokenizer and model, apply LoRA, build the data, build the ``transformers.Trainer``, train, save.
The Trainer is composed, not subclassed; loraforge adds a padding collator, callbacks for plain
log lines and complete-checkpoint markers, and the saving of its artifacts.

The output folder's layout and its atomic saving live in [`loraforge.output`][loraforge.output].
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.data.builder import IGNORE_INDEX, DataReport, SFTDatasetBuilder
from loraforge.data.records import check_records
from loraforge.data.templates import get_template
from loraforge.errors import DataError
from loraforge.fast.attention import attention_implementation, set_attention
from loraforge.fast.liger import apply_liger
from loraforge.fast.packing import PackedCollator, PackedDataset, _chunkable_head, _PackedLoss
from loraforge.fast.plan import (
    DeviceInfo,
    FastPlan,
    ModelShape,
    check_environment,
    enable_selective_checkpointing,
    plan_fast_path,
)
from loraforge.models import (
    enable_checkpointing,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve_model_path,
    resolve_target_modules,
)
from loraforge.recipe import LoraRecipe
from loraforge.training.guards import disk_full_errors
from loraforge.training.nonfinite import NonFiniteGuard
from loraforge.training.output import (
    CHECKPOINTS,
    _prepare_output_dir,
    _save_run,
)

__all__ = ["TrainResult", "pad_collate", "train"]

logger = logging.getLogger(__name__)
_NON_BLOCKING_COPIES = True  # the benchmark turns it off to measure what it is worth
# transformers >= 5.20 renamed gradient to activation checkpointing; PEFT still asks by the old
# name on every forward pass. The warning tells a loraforge user nothing they can act on.
warnings.filterwarnings(
    "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
)


@dataclass(slots=True)
class TrainResult:
    """What [`train`][loraforge.train] produced.

    Attributes:
        output_dir: the output folder (for
            [`load_for_inference`][loraforge.load_for_inference]).
        metrics: final metrics (``train_loss``, ``first_loss``, ``last_loss``, ``eval_loss`` when
            evaluated, ``steps``, ``runtime_s``, ``train_tokens``...).
        data_report: the dataset builder's report for the training data.
        log_history: the Trainer's log entries.
    """

    output_dir: Path
    metrics: dict[str, Any]
    data_report: DataReport
    log_history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- collator


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of examples: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    with 0 and ``labels`` with -100 (so padding is never supervised and never masks EOS)."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.as_tensor(f["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.as_tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Collator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_collate(features, self.pad_token_id)


# --------------------------------------------------------------------------- callbacks


def _callbacks(
    out: Path | None = None, train_ds: Any = None, report: DataReport | None = None
) -> list[Any]:
    from transformers import TrainerCallback

    from loraforge.errors import TrainingDivergedError
    from loraforge.training import guards

    class PlainLog(TrainerCallback):
        """A plain log line every logging_steps, and the run's start and end."""

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
        """Mark a checkpoint complete once the Trainer has written all of it: copy the run's
        recipe into it, fsync it and write its manifest (see `loraforge.guards`)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir() or not state.is_world_process_zero:
                return
            model = kw.get("model")
            if model is not None and not guards.parameters_finite(model):
                raise TrainingDivergedError(
                    f"training diverged: non-finite weights at step {state.global_step}; "
                    f"{ckpt} is left unmarked and will not be resumed",
                    step=state.global_step,
                    kind="parameter",
                )
            recipe_file = Path(args.output_dir).parent / "recipe.yaml"
            with guards.disk_full_errors(ckpt, "marking the checkpoint"):
                if recipe_file.is_file():
                    shutil.copyfile(recipe_file, ckpt / "recipe.yaml")
                guards.mark_complete(ckpt, state.global_step)

    extra = [NonFiniteGuard(out, train_ds, report), guards.DiskSpaceGuard()] if out else []
    return [*extra, PlainLog(), MarkComplete()]  # the guards check before a save is marked


# --------------------------------------------------------------------------- train


def _quiet_progress(trainer: Any) -> None:
    """Keep the Trainer's progress bar but not its printed log dicts (loraforge logs each line)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Progress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            return None

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Progress())
    trainer.pop_callback(PrinterCallback)


def _apply_plan(model: Any, plan: FastPlan) -> None:
    """Kernels, attention and checkpointing on the base model, before LoRA wraps it."""
    if plan.liger_kernels:
        apply_liger(model)
    set_attention(model, attention_implementation(plan.attention))
    if plan.gradient_checkpointing == "full":
        enable_checkpointing(model)
    elif plan.gradient_checkpointing == "partial":
        enable_checkpointing(model, layers=plan.checkpoint_layers)
    elif plan.gradient_checkpointing == "selective":
        enable_selective_checkpointing(model)


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    """Move the objects alive before training out of the garbage collector's sight: its full
    passes over the model's and datasets' objects otherwise land between GPU steps."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _lighter_steps(model: Any) -> Iterator[None]:
    """Trim the Trainer's per-step CPU work, which a GPU waits for after each optimizer step:
    ``model.train()`` walks every module with method calls although they are all training
    already, and ``model.zero_grad()`` every parameter although only the adapter's have
    gradients. Both are the model's own again afterwards."""
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


def _make_trainer(**kwargs: Any) -> Any:
    """transformers' Trainer, counting FLOPs from a cached parameter count (its own
    ``floating_point_ops`` walks every parameter at every step)."""
    from transformers import Trainer

    class _Trainer(Trainer):
        _n_params: int | None = None

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            ids = inputs.get("input_ids")
            if ids is None:
                return 0
            if self._n_params is None:
                count = getattr(self.model, "num_parameters", None)
                self._n_params = int(count(exclude_embeddings=True)) if count else 0
            return 6 * ids.numel() * self._n_params

    return _Trainer(**kwargs)


def _ids(ds: Any) -> Any:
    return ds.input_ids if isinstance(ds, PackedDataset) else ds["input_ids"]


def train(
    recipe: LoraRecipe,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    model: Any = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Fine-tune ``recipe.model`` with LoRA on ``recipe.data`` and save a self-describing folder.

    Args:
        recipe: the run's settings.
        resume: continue from the last complete checkpoint in ``recipe.output_dir``.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        model: an already loaded base model to fine-tune instead of loading ``recipe.model``
            (``recipe.model`` is still recorded as its name).
        tokenizer: the tokenizer to use with ``model`` (default: loaded from ``recipe.model``).

    Returns:
        A [`TrainResult`][loraforge.TrainResult].

    Raises:
        LoraForgeError: any bad setting, model, data or output folder, before a training step.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments, set_seed

    # 1. output folder and template
    out, checkpoint = _prepare_output_dir(recipe, resume)
    template = get_template(recipe.template)
    set_seed(recipe.seed)

    # 2. data records (before any download: bad data fails fast), tokenizer, examples
    for path in (recipe.data, recipe.eval_data):
        if path:
            check_records(
                path,
                recipe.data_format,
                input_separator=recipe.input_separator,
                on_bad_record=recipe.on_bad_record,
            )
    model_path: str | None = None  # None: the caller passed the model and tokenizer objects
    if model is None or tokenizer is None:
        model_path = resolve_model_path(
            recipe.model, recipe.model_source, recipe.model_revision, recipe.cache_dir
        )
    if tokenizer is None:
        assert model_path is not None
        tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.trust_remote_code)
    builder = SFTDatasetBuilder.from_recipe(tokenizer, recipe)
    train_ds = builder.build(recipe.data)
    assert builder.report is not None
    report = builder.report
    logger.info("data:\n%s", report.format_text())
    from loraforge.training.guards import (  # every dropped record, with why
        SKIPPED_FILE,
        write_skipped_records,
    )

    write_skipped_records(out / SKIPPED_FILE, report.dropped)
    eval_ds, eval_report = None, None
    if recipe.eval_data:
        eval_ds = builder.build(recipe.eval_data)
        eval_report = builder.report
        eval_dropped = eval_report.dropped if eval_report else []
        write_skipped_records(out / f"eval_{SKIPPED_FILE}", eval_dropped)
        builder.report = report
    elif recipe.eval_fraction > 0:
        n_eval = math.ceil(len(train_ds) * recipe.eval_fraction)
        if not 1 <= n_eval < len(train_ds):
            raise DataError(
                f"eval_fraction={recipe.eval_fraction} of {len(train_ds)} examples leaves "
                f"{n_eval} for evaluation and {len(train_ds) - n_eval} for training; both need at "
                "least one (more data, another eval_fraction, or eval_data)",
                source=recipe.data,
            )
        split = train_ds.train_test_split(test_size=n_eval, seed=recipe.seed)
        train_ds, eval_ds = split["train"], split["test"]

    # 3. model, padding, LoRA
    dtype = pick_dtype(recipe.dtype)
    if model is None:
        assert model_path is not None
        model = load_model(model_path, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
    dtype = next(model.parameters()).dtype
    note = ensure_pad_token(tokenizer, model, template.end_of_turn)
    if note:
        logger.warning(note)
    targets = resolve_target_modules(model, recipe.target_modules)
    model.config.use_cache = False
    longest = max(len(x) for x in train_ds["input_ids"])
    device = DeviceInfo.probe()
    check_environment(recipe, device)
    plan = plan_fast_path(
        recipe,
        ModelShape.from_model(model),
        device,
        longest_example=longest,
        supervised_fraction=report.supervised_fraction or 1.0,
        chunkable_head=_chunkable_head(model, require_frozen=False) is not None
        and "lm_head" not in targets,
    )
    logger.info("fast path: %s", plan.describe())
    _apply_plan(model, plan)
    model = get_peft_model(
        model,
        LoraConfig(
            r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    if recipe.fused_lora:
        from loraforge.fast.lora_ops import fuse_lora_forward, lean_norms

        fuse_lora_forward(model)
        lean_norms(model)
    trainable, total = model.get_nb_trainable_parameters()
    counts = {
        t: sum(1 for n, _ in model.named_modules() if n.endswith("." + t + ".lora_A"))
        for t in targets
    }
    logger.info(
        "LoRA r=%d alpha=%g on %s; trainable parameters %s of %s (%.3f%%)",
        recipe.lora_r,
        recipe.lora_alpha,
        ", ".join(f"{t} x{c}" for t, c in counts.items()),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    # 4. trainer
    guard_callbacks = _callbacks(out, train_ds, report)
    collator: Any = _Collator(tokenizer.pad_token_id)
    loss_func: _PackedLoss | None = None
    batch_size = recipe.batch_size
    if plan.packing:
        assert plan.pack_tokens is not None
        train_ds = PackedDataset(train_ds, plan.pack_tokens, seed=recipe.seed)
        logger.info(
            "packed %d examples into %d rows of <= %d tokens (%.0f%% full)",
            len(train_ds.input_ids),
            len(train_ds),
            plan.pack_tokens,
            100 * train_ds.fill,
        )
        if eval_ds is not None:
            eval_ds = PackedDataset(eval_ds, plan.pack_tokens, seed=recipe.seed)
        collator = PackedCollator(tokenizer.pad_token_id)
        guard = next((c for c in guard_callbacks if isinstance(c, NonFiniteGuard)), None)
        head = _chunkable_head(model) if recipe.chunked_loss else None
        loss_func = _PackedLoss(guard, head)
        batch_size = 1
        per_row = len(train_ds.input_ids) / max(len(train_ds), 1)
        logger.warning(
            "packing: batch_size=%d is not used; each optimizer step is grad_accum=%d packed "
            "row(s) of <= %d tokens (about %.0f examples per row). Set packing: off for "
            "fixed-size batches.",
            recipe.batch_size,
            recipe.grad_accum,
            plan.pack_tokens,
            per_row,
        )
    steps_per_epoch = math.ceil(len(train_ds) / (batch_size * recipe.grad_accum))
    total_steps = (
        recipe.max_steps if recipe.max_steps > 0 else math.ceil(steps_per_epoch * recipe.num_epochs)
    )
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        num_train_epochs=recipe.num_epochs,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=math.ceil(recipe.warmup_ratio * total_steps),
        optim=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        eval_strategy="no" if eval_ds is None else ("steps" if recipe.eval_steps else "epoch"),
        eval_steps=recipe.eval_steps,
        report_to=list(recipe.report_to) or "none",
        bf16=dtype == torch.bfloat16 and on_gpu,
        fp16=dtype == torch.float16 and on_gpu,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
        # batches go to the GPU from pinned memory without the CPU waiting for the GPU to finish
        # the previous step (a blocking copy idles the GPU while the next step is prepared)
        accelerator_config={"non_blocking": on_gpu and _NON_BLOCKING_COPIES},
        disable_tqdm=False,
        # the non-finite guard stops the run instead; the filter reads the loss every step,
        # which makes the GPU wait for the CPU
        logging_nan_inf_filter=False,
    )
    trainer = _make_trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        compute_loss_func=loss_func,
        callbacks=[*guard_callbacks, *callbacks],
    )

    # 5. train
    recipe.to_yaml(out / "recipe.yaml")
    start = time.perf_counter()
    _quiet_progress(trainer)
    with contextlib.ExitStack() as hooks:
        if loss_func is not None:
            hooks.enter_context(loss_func.installed(model))
        with (
            disk_full_errors(out / CHECKPOINTS, "saving a checkpoint to"),
            _lighter_steps(model),
            _frozen_gc(),
        ):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        runtime = time.perf_counter() - start
        final_eval = trainer.evaluate() if eval_ds is not None else {}

    # 6. save
    history = list(trainer.state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "runtime_s": round(runtime, 3),
        "train_examples": len(builder_ids := _ids(train_ds)),
        "train_tokens_per_epoch": int(sum(len(x) for x in builder_ids)),
        "fast_path": plan.describe(),
        "trainable_parameters": trainable,
        "lora_target_modules": counts,
    }
    metrics.update(final_eval)
    _save_run(
        out, model, tokenizer, recipe, template, model_path, report, metrics, history, eval_report
    )
    logger.info("saved adapter and run files to %s", out)
    return TrainResult(out, metrics, report, history)
