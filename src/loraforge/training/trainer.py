"""`train(recipe)`: a LoRA fine-tune from a recipe to a self-describing output folder.

[`train`][loraforge.train] reads top to bottom as the steps of a run, each a function of its own
with a typed input and output:

1. check what needs no model (the template, the model settings, the machine's settings, the
   processes a launcher started, every data record), before anything is written or downloaded;
2. open the run folder (checked, locked; a finished run is not trained again);
3. load the tokenizer (its end-of-turn marker must be stoppable) and build the examples;
4. load the base model and prepare it (padding token, LoRA targets);
5. plan the fast path (a pure function of the model's shape, the recipe and the memory budget);
6. apply the plan and LoRA; with FSDP2, shard the frozen base across the processes;
7. lay out the optimizer steps (packed rows or padded batches) and say what one step holds;
8. find where a resumed run starts (same data, never past the last step);
9. build the ``transformers.Trainer``;
10. fit;
11. save the adapter and the run's files.

Launched as several processes (``torchrun``, ``accelerate launch``), every process runs the same
page: the main process alone checks the data, prepares the run folder, builds the examples and
saves, and the others receive what it found or the error it raised
([`loraforge.training.distributed`][loraforge.training.distributed]).

The Trainer is composed, with one subclass in [`loraforge.training.loop`][loraforge.training.loop];
the output folder's layout lives in [`loraforge.training.output`][loraforge.training.output], its
final, atomic save in [`loraforge.training.saving`][loraforge.training.saving].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.data.builder import DataReport
from loraforge.data.templates import check_recordable, check_stoppable, get_template
from loraforge.errors import ModelError
from loraforge.fast.plan import check_environment
from loraforge.fast.shape import DeviceInfo
from loraforge.models import check_model_source, load_tokenizer
from loraforge.recipe import LoraRecipe
from loraforge.training.distributed import (
    agreed,
    check_processes,
    check_same_plan,
    join,
    on_main,
    quiet_unless_main,
    shard_if_planned,
    shared_run_folder,
)
from loraforge.training.evaluation import eval_samples, samples_report
from loraforge.training.resume import data_fingerprint, processes_fingerprint, rows_fingerprint
from loraforge.training.saving import save_run
from loraforge.training.steps import (
    apply_plan_and_lora,
    build_data,
    build_trainer,
    check_data,
    embeddings_to_host,
    head_detachable,
    install_graphs,
    lay_out_steps,
    load_base_model,
    model_path_of,
    plan_run,
    prepare_base_model,
    run_fit,
    run_metrics,
    start_point,
)
from loraforge.training.trackers import check_trackers
from loraforge.variants import save_initial_adapter

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    """What [`train`][loraforge.train] produced.

    Attributes:
        output_dir: the output folder (for
            [`load_for_inference`][loraforge.load_for_inference]).
        metrics: final metrics (``train_loss``, ``first_loss``, ``last_loss``, ``eval_loss`` when
            evaluated, ``steps``, ``runtime_s``, ``train_tokens``, ``step`` — what one optimizer
            step held...).
        data_report: the dataset builder's report for the training data.
        log_history: the Trainer's log entries.
    """

    output_dir: Path
    metrics: dict[str, Any]
    data_report: DataReport
    log_history: list[dict[str, Any]] = field(default_factory=list)


def train(
    recipe: LoraRecipe,
    *,
    resume: bool = False,
    allow_changed_data: bool = False,
    callbacks: Sequence[Any] = (),
    model: Any = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Fine-tune ``recipe.model`` with LoRA on ``recipe.data`` and save a self-describing folder.

    Args:
        recipe: the run's settings.
        resume: continue from the last complete checkpoint in ``recipe.output_dir``.
        allow_changed_data: resume although the data files' content changed since the
            checkpoint was saved (refused by default).
        callbacks: extra ``transformers.TrainerCallback`` objects.
        model: an already loaded base model to fine-tune instead of loading ``recipe.model``
            (``recipe.model`` is still recorded as its name).
        tokenizer: the tokenizer to use with ``model`` (default: loaded from ``recipe.model``).

    Returns:
        A [`TrainResult`][loraforge.TrainResult].

    Raises:
        LoraForgeError: any bad setting, model, data or output folder, before a training step.
    """
    from transformers import set_seed

    template = get_template(recipe.template)  # 1: nothing is written or loaded yet
    check_recordable(template)  # inference can rebuild it from the run folder (or a warning)
    if model is None:  # the model settings, without downloading anything
        problems = check_model_source(recipe)
        if problems:
            raise ModelError("; ".join(problems))
    ranks = join()  # one process, or this one's place among those a launcher started
    device = DeviceInfo.probe(ranks.local_rank)  # None on the CPU
    with agreed(ranks):  # a check failing on one process (a mixed machine) stops all of them
        check_environment(recipe, device)
        check_processes(recipe, ranks)
        check_trackers(recipe)  # report_to: known names, installed packages
    on_main(ranks, lambda: check_data(recipe), "checking the data")
    with shared_run_folder(recipe, resume, ranks) as run, quiet_unless_main(ranks):  # 2
        if run.finished is not None:  # a resume of a run that finished with these settings
            return TrainResult(run.path, dict(run.finished.get("metrics") or {}), run.data_report())
        out = run.path
        set_seed(recipe.seed)
        model_path = None
        if model is None or tokenizer is None:  # downloaded once (by the main process)
            model_path = on_main(ranks, lambda: model_path_of(recipe), "resolving the model")
        with agreed(ranks):  # below, a failure on one process stops all of them
            if model_path is not None and not ranks.main:
                model_path = model_path_of(recipe)  # from the cache the main process filled
            if tokenizer is None:
                assert model_path is not None
                tokenizer = load_tokenizer(model_path, trust_remote_code=recipe.trust_remote_code)
            check_stoppable(template, tokenizer)  # generation can stop on its end-of-turn marker
        data = on_main(ranks, lambda: build_data(recipe, tokenizer, out), "building the data")  # 3
        with agreed(ranks):
            model = model if model is not None else load_base_model(recipe, model_path, ranks)  # 4
            targets = prepare_base_model(model, tokenizer, template, recipe)
            plan = plan_run(recipe, model, device, data, targets, ranks)  # 5
        check_same_plan(plan, ranks)  # mixed GPUs could plan differently
        with agreed(ranks):
            model = apply_plan_and_lora(recipe, model, plan, targets, ranks)  # 6
        model = shard_if_planned(model, plan, ranks)  # FSDP2
        initial_adapter = on_main(  # PiSSA/OLoRA only
            ranks, lambda: save_initial_adapter(model, out, recipe), "saving the initial adapter"
        )
        batches = lay_out_steps(recipe, plan, data, tokenizer.pad_token_id, ranks)  # 7
        fingerprint = on_main(ranks, lambda: data_fingerprint(recipe), "fingerprinting the data")
        fingerprint |= processes_fingerprint(ranks) | rows_fingerprint(plan.pack_tokens)
        start = on_main(  # 8: the main process reads the checkpoints; the others get its answer
            ranks,
            lambda: start_point(run, batches.layout, fingerprint, allow_changed_data),
            "finding where to resume",
        )
        detach = plan.packing and recipe.chunked_loss and head_detachable(model, batches, ranks)
        graphs = install_graphs(model, batches, plan)  # replayed from a CUDA graph, if planned
        samples = eval_samples(recipe, out, tokenizer, template, plan, ranks)  # eval_prompts
        extra = [*callbacks, *([samples] if samples else [])]
        host = None
        try:
            batches, host = embeddings_to_host(model, batches, plan)  # if planned
            trainer = build_trainer(  # 9
                recipe, out, model, batches, detach, fingerprint, extra, plan, ranks
            )
            if samples:
                samples.bind(trainer)  # the trackers of report_to get the answers too
            fit = run_fit(trainer, model, batches, start)  # 10
        finally:
            if graphs is not None:  # the layers' own forward back; the graph's memory released
                graphs.uninstall()
            if host is not None:  # the model's own input embedding back on its device
                host.restore()
        metrics = on_main(
            ranks,
            lambda: (
                run_metrics(fit, batches, plan, model, targets, graphs) | samples_report(samples)
            ),
        )
        on_main(  # 11
            ranks,
            lambda: save_run(
                out,
                model,
                tokenizer,
                recipe,
                template,
                model_path,
                data.report,
                metrics,
                fit.history,
                data.eval_report,
                initial_adapter=initial_adapter,
            ),
            "saving the run",
        )
        logger.info("saved adapter and run files to %s", out)
    return TrainResult(out, metrics, data.report, fit.history)
