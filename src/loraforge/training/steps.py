"""The steps of [`train`][loraforge.train], each a function with a typed input and output.

[`loraforge.training.trainer`][loraforge.training.trainer] calls them in order; see its module
docstring for the page they make. The types they hand on:
[`TrainData`][loraforge.training.steps.TrainData] (the examples),
[`StepLayout`][loraforge.training.steps.StepLayout] (what one optimizer step holds),
[`Batches`][loraforge.training.steps.Batches] (what the Trainer iterates) and
[`Fit`][loraforge.training.steps.Fit] (what fitting produced).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.data.builder import IGNORE_INDEX, DataReport, SFTDatasetBuilder
from loraforge.data.records import check_records
from loraforge.data.sources import open_data
from loraforge.data.templates import (
    PromptTemplate,
)
from loraforge.errors import DataError, RecipeError
from loraforge.fast.attention import attention_implementation, set_attention
from loraforge.fast.fusion import recompute_mlps
from loraforge.fast.graphs import LayerGraphs, install_layer_graphs, layers_graphable
from loraforge.fast.host_embeddings import (
    HostEmbeddingCollator,
    HostEmbeddings,
    embedding_refusal,
    install_host_embeddings,
)
from loraforge.fast.liger import apply_liger
from loraforge.fast.lora_ops import apply_lean_functions
from loraforge.fast.losses import PackedLoss, head_is_detachable
from loraforge.fast.packing import PackedCollator, PackedDataset, fixed_shape
from loraforge.fast.plan import FastPlan, over_budget_advice, plan_fast_path
from loraforge.fast.quant import check_quantized
from loraforge.fast.rope import install_fused_rope
from loraforge.fast.shape import DeviceInfo, ModelShape
from loraforge.models import (
    enable_checkpointing,
    enable_selective_checkpointing,
    ensure_pad_token,
    load_model,
    peft_rename_warning_ignored,
    pick_dtype,
    resolve_model_path,
    resolve_target_modules,
)
from loraforge.recipe import LoraRecipe
from loraforge.training.distributed import (
    Ranks,
    ReplicatedAdapter,
    launched,
    on_all,
    on_main,
    one_gpu_per_process,
)
from loraforge.training.evaluation import load_eval_prompts
from loraforge.training.guards import (
    SKIPPED_FILE,
    DiskSpaceGuard,
    disk_full_errors,
    write_skipped_records,
)
from loraforge.training.loop import (
    MarkComplete,
    PlainLog,
    build_hf_trainer,
    lighter_steps,
    quiet_progress,
)
from loraforge.training.nonfinite import NonFiniteGuard
from loraforge.training.output import CHECKPOINTS, RunFolder
from loraforge.training.resume import (
    ResumePoint,
    load_checkpoint_adapter,
    resume_point,
)
from loraforge.variants import describe_variant, lora_config, loraplus_optimizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batches",
    "Fit",
    "PadCollator",
    "StepLayout",
    "TrainData",
    "apply_plan_and_lora",
    "build_data",
    "build_trainer",
    "check_data",
    "head_detachable",
    "lay_out_steps",
    "load_base_model",
    "model_path_of",
    "pad_collate",
    "plan_run",
    "prepare_base_model",
    "run_fit",
    "run_metrics",
    "start_point",
    "training_autocast",
]

logger = logging.getLogger(__name__)


_NON_BLOCKING_COPIES = True  # the benchmark turns it off to measure what it is worth


@dataclass(frozen=True, slots=True)
class TrainData:
    """The examples of a run (step 3)."""

    train: Any  # a datasets.Dataset with input_ids, attention_mask, labels, record_index
    eval: Any | None
    report: DataReport
    eval_report: DataReport | None
    lengths: list[int]  # of the training examples, read once for the plan and the layout


@dataclass(frozen=True, slots=True)
class StepLayout:
    """What one optimizer step holds on this run (logged, and saved in ``loraforge.json``).

    Attributes:
        packed: micro-batches are packed rows of whole examples (else padded batches).
        processes: processes training together; each takes ``micro_batches_per_step`` of the
            step's micro-batches.
        examples_per_epoch: training examples.
        tokens_per_epoch: their tokens.
        micro_batch: ``"<= N tokens (packed row)"`` or ``"B examples (padded)"``.
        micro_batches_per_step: ``grad_accum``.
        examples_per_step: mean examples in one optimizer step.
        tokens_per_step: mean real (unpadded) tokens in one optimizer step.
        supervised_tokens_per_step: mean supervised tokens in one optimizer step.
        steps_per_epoch: optimizer steps in one pass over the data.
        total_steps: optimizer steps of the run (the learning-rate schedule's length).
        warmup_steps: steps of learning-rate warm-up.
        repeated_per_epoch: examples (padded) or rows (packed) that several processes train
            twice in an epoch: accelerate completes the epoch's last micro-batches with the
            epoch's first ones (its ``even_batches``) so that every process takes as many full
            micro-batches; 0 with one process, or when the epoch divides evenly.
    """

    packed: bool
    processes: int
    examples_per_epoch: int
    tokens_per_epoch: int
    micro_batch: str
    micro_batches_per_step: int
    examples_per_step: float
    tokens_per_step: float
    supervised_tokens_per_step: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    repeated_per_epoch: int = 0

    def describe(self) -> str:
        several = f"{self.processes} processes x " if self.processes > 1 else ""
        unit = "rows" if self.packed else "examples"
        k = self.repeated_per_epoch
        repeats = (
            f"; the epoch's last micro-batches are completed with its first {k} {unit}, trained "
            "twice (accelerate's even batches; one process would not repeat them)"
            if k
            else ""
        )
        return (
            f"one optimizer step = {several}{self.micro_batches_per_step} x {self.micro_batch}: "
            f"{self.examples_per_step:.1f} examples, {self.tokens_per_step:,.0f} tokens, "
            f"{self.supervised_tokens_per_step:,.0f} supervised tokens on average; "
            f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in all "
            f"(learning-rate schedule over {self.total_steps} steps, {self.warmup_steps} warm-up)"
            f"{repeats}"
        )


def repeated_at_epoch_end(units: int, per_micro_batch: int, processes: int) -> int:
    """How many of an epoch's ``units`` (examples, or packed rows) several processes train twice:
    accelerate's batch sampler shard (``even_batches``, not ``drop_last``) completes the last
    micro-batch and the last round of micro-batches with the epoch's first units, so that each
    of ``processes`` takes as many micro-batches of ``per_micro_batch`` units."""
    if processes <= 1 or units <= 0:
        return 0
    round_size = per_micro_batch * processes
    return math.ceil(units / round_size) * round_size - units


@dataclass(frozen=True, slots=True)
class Batches:
    """The datasets and collator the Trainer iterates (step 7)."""

    train: Any
    eval: Any | None
    collator: Any
    layout: StepLayout
    graph_shape: tuple[int, int, int] | None = None  # (tokens, segments, segment cap) padded to


@dataclass(frozen=True, slots=True)
class Fit:
    """What fitting produced (step 10)."""

    train_loss: float | None
    history: list[dict[str, Any]]
    steps: int
    epochs: float | None
    runtime_s: float
    final_eval: dict[str, Any]


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


@dataclass(frozen=True, slots=True)
class PadCollator:
    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_collate(features, self.pad_token_id)


def check_data(recipe: LoraRecipe) -> None:
    """Read and check every record of the training and evaluation data (no tokenizer needed)."""
    if recipe.eval_prompts is not None:
        load_eval_prompts(recipe)
    for key in ("data", "eval_data"):
        if getattr(recipe, key):
            check_records(
                open_data(recipe, key),
                recipe.data_format,
                input_separator=recipe.input_separator,
                on_bad_record=recipe.on_bad_record,
            )


def model_path_of(recipe: LoraRecipe) -> str:
    return resolve_model_path(
        recipe.model, recipe.model_source, recipe.model_revision, recipe.cache_dir
    )


def _with_record_index(ds: Any, report: DataReport) -> Any:
    """Give each example the index of the record it was built from (the builder emits the
    records in order, minus the dropped ones)."""
    dropped = {d.index for d in report.dropped}
    index = [i for i in range(report.records_read) if i not in dropped]
    if len(index) != len(ds):  # the builder's report disagrees with its output: trace nothing
        index = [-1] * len(ds)
    return ds.add_column("record_index", index)


def build_data(recipe: LoraRecipe, tokenizer: Any, out: Path) -> TrainData:
    """Tokenize, mask and truncate the data; write the dropped records to ``skipped.jsonl``
    (and ``eval_skipped.jsonl``); hold out ``eval_fraction`` of the examples if asked."""
    builder = SFTDatasetBuilder.from_recipe(tokenizer, recipe)
    train_ds = builder.build(open_data(recipe, "data"))
    report = builder.report
    assert report is not None
    logger.info("data:\n%s", report.format_text())
    write_skipped_records(out / SKIPPED_FILE, report.dropped)
    train_ds = _with_record_index(train_ds, report)
    eval_ds, eval_report = None, None
    if recipe.eval_data:
        eval_ds = builder.build(open_data(recipe, "eval_data"))
        eval_report = builder.report
        assert eval_report is not None
        write_skipped_records(out / f"eval_{SKIPPED_FILE}", eval_report.dropped)
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
    lengths = [len(x) for x in train_ds["input_ids"]]
    return TrainData(train_ds, eval_ds, report, eval_report, lengths)


def load_base_model(recipe: LoraRecipe, model_path: str | None, ranks: Ranks) -> Any:
    """Load the base model in the recipe's dtype: onto the GPU when there is one and one
    process trains; with several, into the CPU's memory until the plan says whether each
    process holds all of it (DDP) or a shard (FSDP2)."""
    import torch

    assert model_path is not None
    model = load_model(
        model_path,
        dtype=pick_dtype(recipe.dtype),
        trust_remote_code=recipe.trust_remote_code,
        quantization=recipe.quantization,  # a quantized model is placed as it loads
    )
    if ranks.several or launched() or recipe.quantization != "none":
        return model  # placed after planning (several processes), or as it loaded (4-bit)
    return model.to("cuda") if torch.cuda.is_available() else model


def prepare_base_model(
    model: Any, tokenizer: Any, template: PromptTemplate, recipe: LoraRecipe
) -> list[str]:
    """Give the tokenizer a padding token that is no stop token, switch the cache off, and
    resolve the LoRA target modules against the model; returns the targets."""
    check_quantized(model, recipe.quantization)  # also a model given to train()
    note = ensure_pad_token(tokenizer, model, template.end_of_turn)
    if note:
        logger.warning(note)
    model.config.use_cache = False
    return resolve_target_modules(model, recipe.target_modules)


def plan_run(
    recipe: LoraRecipe,
    model: Any,
    device: DeviceInfo | None,
    data: TrainData,
    targets: Sequence[str],
    ranks: Ranks,
) -> FastPlan:
    """The fast path's plan for this model, data, machine and number of processes (logged)."""
    import torch

    head = model.get_output_embeddings()
    plan = plan_fast_path(
        recipe,
        ModelShape.from_model(model),
        device,
        longest_example=max(data.lengths),
        supervised_fraction=data.report.supervised_fraction or 1.0,
        chunkable_head=type(head) is torch.nn.Linear and "lm_head" not in targets,
        processes=ranks.world_size,
        ungraphable=layers_graphable(model),
        movable_embeddings=embedding_refusal(model, before_lora=True, targets=targets) is None,
    )
    logger.info("fast path: %s", plan.describe())
    graphs_wanted(recipe, plan, ranks)  # cuda_graphs: 'on' where it cannot be: an error now
    host_embeddings_wanted(recipe, plan, model, device, targets)  # likewise host_embeddings
    if not plan.fits:
        logger.warning("fast path: %s", over_budget_advice(recipe, plan))
    return plan


def apply_plan_and_lora(
    recipe: LoraRecipe, model: Any, plan: FastPlan, targets: Sequence[str], ranks: Ranks
) -> Any:
    """Kernels, attention and checkpointing on the base model, then LoRA and the lean functions;
    returns the PEFT model. Under DDP, and for a model given on the CPU to a run on a GPU, the
    model is first moved to this process's device; under FSDP2 its frozen base weights are
    sharded across the processes last."""
    from peft import get_peft_model

    quantized = recipe.quantization != "none"  # placed on this process's GPU as it loaded
    moved = ranks.several or launched() or given_on_cpu(model, ranks)
    if moved and _whole_on_device(model, plan) and not quantized:
        model = model.to(ranks.device)  # the checks below then run on the device
    elif plan.distributed == "fsdp2" and ranks.device != "cpu":
        logger.info(
            "FSDP2: the model stays in the CPU's memory until it is sharded (whole, it would "
            "not fit the budget); the numeric checks of the lean functions and the fused RoPE "
            "run there"
        )
    if plan.liger_kernels:
        replaced = apply_liger(model, skip_lean=recipe.fused_lora)
        logger.info("liger: %s", ", ".join(replaced) or "nothing left to it by the lean functions")
    set_attention(model, attention_implementation(plan.attention))
    if plan.gradient_checkpointing == "full":
        enable_checkpointing(model)
    elif plan.gradient_checkpointing == "partial":
        enable_checkpointing(model, layers=plan.checkpoint_layers)
    elif plan.gradient_checkpointing == "selective":
        enable_selective_checkpointing(model)
    model = get_peft_model(model, lora_config(recipe, targets))  # the variant is PEFT's
    mixed = training_autocast(model)
    if recipe.fused_lora:  # each kind of layer checked against PEFT's forward first
        apply_lean_functions(model, autocast_dtype=mixed)
    if plan.recompute_mlps:  # before any graph of the layers is captured
        recomputing = recompute_mlps(model, plan.recompute_mlps)
        log = logger.info if recomputing == plan.recompute_mlps else logger.warning
        log(
            "MLPs: %d recompute their gate_up output in the backward pass (planned %d%s)",
            recomputing,
            plan.recompute_mlps,
            ""
            if recomputing == plan.recompute_mlps
            else "; the others run PEFT's forward, "
            "which keeps more: the plan's memory estimate is low",
        )
    if plan.liger_kernels:  # Liger's fused RoPE, per attention instance, checked first
        rope = install_fused_rope(model, autocast_dtype=mixed)
        logger.info("rope: %s", rope[1])
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "%s r=%d alpha=%g on %s; trainable parameters %s of %s (%.3f%%)",
        describe_variant(recipe),
        recipe.lora_r,
        recipe.lora_alpha,
        ", ".join(f"{t} x{c}" for t, c in _lora_counts(model, targets).items()),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


def given_on_cpu(model: Any, ranks: Ranks) -> bool:
    """Whether every weight of ``model`` is in the CPU's memory while this process trains on
    another device: a model given to ``train()`` as it was built. The Trainer would move it at
    its first step; moved now, every start-of-run check (the lean functions, the fused RoPE, the
    chunked head, the graphs' shapes) runs where training runs."""
    return ranks.device != "cpu" and all(p.device.type == "cpu" for p in model.parameters())


def _whole_on_device(model: Any, plan: FastPlan) -> bool:
    """Whether this process holds the whole model on its device: always under DDP; under FSDP2
    until it is sharded, when the weights fit the budget (one large GPU, say)."""
    if plan.distributed != "fsdp2":
        return True
    if plan.budget_bytes is None:  # the CPU
        return True
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 2**30 <= plan.budget_bytes  # and a layer's shards while it is sharded


def _lora_counts(model: Any, targets: Sequence[str]) -> dict[str, int]:
    names = [n for n, _ in model.named_modules()]
    return {t: sum(1 for n in names if n.endswith("." + t + ".lora_A")) for t in targets}


def training_autocast(model: Any) -> torch.dtype | None:
    """The mixed precision training runs ``model`` under: its dtype when that is bfloat16 or
    float16 and a CUDA GPU trains it (the Trainer's ``bf16``/``fp16``), else
    ``None``."""
    import torch

    dtype = next(model.parameters()).dtype
    mixed = dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available()
    return dtype if mixed else None


def head_detachable(model: Any, batches: Batches, ranks: Ranks) -> bool:
    """Whether the loss may apply ``lm_head`` in chunks: checked on the real model, with a
    short packed row made by the training collator (on every process, the same row; all
    processes take the same verdict), under the mixed precision training uses
    (:func:`training_autocast`), so the check runs the layers training runs."""
    import contextlib

    import torch

    first = batches.train[0][0]  # the first example of the first packed row
    sample = {"input_ids": first["input_ids"][:16], "labels": first["labels"][:16]}
    # where the model's weights are (the process's device once apply_plan_and_lora placed it)
    device = getattr(model, "device", None) or torch.device(ranks.device)
    collator = batches.collator
    if batches.graph_shape is not None:  # the short row, not padded to the graphs' shape
        collator = PackedCollator(collator.pad_token_id)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([[sample]]).items()}
    dtype = training_autocast(model)
    mixed = torch.autocast(device.type, dtype=dtype) if dtype is not None else None
    with mixed or contextlib.nullcontext():
        ok, why = head_is_detachable(model, inputs)
    verdicts = on_all(ranks, (ok, why))
    ok, why = next(((o, w) for o, w in verdicts if not o), (ok, why))
    logger.info("chunked loss: %s", "on" if ok else f"off ({why})")
    return ok


def graphs_wanted(recipe: LoraRecipe, plan: FastPlan, ranks: Ranks) -> tuple[bool, str]:
    """Whether the decoder layers are to replay from a CUDA graph (``cuda_graphs``), and the
    reason in words when not.

    Raises:
        RecipeError: ``cuda_graphs: on`` where the plan does not allow it.
    """
    import torch

    if recipe.cuda_graphs == "off":
        return False, "off (cuda_graphs: off)"
    why = None
    if not torch.cuda.is_available():
        why = "no CUDA GPU"
    elif not plan.packing:
        why = "packing is off"
    elif plan.attention != "varlen":
        why = f"attention is {plan.attention!r}, not 'varlen'"
    elif plan.gradient_checkpointing != "off":
        why = f"gradient checkpointing is {plan.gradient_checkpointing!r}"
    elif ranks.world_size > 1:
        why = f"{ranks.world_size} processes train together"
    elif plan.distributed != "none":
        why = f"distributed is {plan.distributed!r}"
    elif recipe.grad_accum != 1:  # the graph hands its gradient buffers to the parameters
        why = f"grad_accum is {recipe.grad_accum}"
    elif recipe.quantization == "int8":  # LLM.int8's outlier split depends on the data
        why = "quantization is 'int8'"
    elif not plan.fits:  # the graph's memory pool stays reserved between steps
        why = "the plan is over its memory budget"
    elif plan.ungraphable:
        why = plan.ungraphable
    if why is None:
        return True, "on"
    if recipe.cuda_graphs == "on":
        raise RecipeError(
            [
                f"cuda_graphs: 'on' needs a CUDA GPU, packing, attention 'varlen', no gradient "
                f"checkpointing, one process, grad_accum 1, no int8 base, a plan within its "
                f"memory budget and decoder layers at .model.layers without hooks; here {why}. "
                "Set cuda_graphs: auto (on where it can be) or off"
            ]
        )
    return False, f"off ({why})"


def lay_out_steps(
    recipe: LoraRecipe, plan: FastPlan, data: TrainData, pad_id: int, ranks: Ranks
) -> Batches:
    """Packed rows or padded batches, and what one optimizer step holds (logged). With several
    processes, a step holds ``grad_accum`` micro-batches on each. Where the layers replay from a
    CUDA graph (:func:`graphs_wanted`), every packed row is padded to one fixed shape."""
    train_ds, eval_ds = data.train, data.eval
    graph_shape = None
    if plan.packing:
        assert plan.pack_tokens is not None
        train_ds = PackedDataset(train_ds, plan.pack_tokens, seed=recipe.seed)
        if eval_ds is not None:
            eval_ds = PackedDataset(eval_ds, plan.pack_tokens, seed=recipe.seed)
        collator: Any = PackedCollator(pad_id)
        graphs, why = graphs_wanted(recipe, plan, ranks)
        if graphs:
            shapes = [fixed_shape(d) for d in (train_ds, eval_ds) if d is not None]
            cap, segments = max(c for c, _ in shapes), max(n for _, n in shapes)
            graph_shape = (plan.pack_tokens, segments, cap)
            collator = PackedCollator(
                pad_id, pad_to=plan.pack_tokens, segment_cap=cap, segments=segments
            )
            why = (
                f"on (rows padded to {plan.pack_tokens} tokens and {segments} cu_seq_lens "
                f"entries, segments of <= {cap} tokens)"
            )
        logger.info("CUDA graphs: %s", why)
        micro = f"<= {plan.pack_tokens} tokens (packed row)"
        micro_batches = len(train_ds)
        logger.info(
            "packed %d examples into %d rows of <= %d tokens (%.0f%% full)",
            len(train_ds.input_ids),
            len(train_ds),
            plan.pack_tokens,
            100 * train_ds.fill,
        )
    else:
        collator = PadCollator(pad_id)
        micro = f"{recipe.micro_batch_size} examples (padded)"
        micro_batches = math.ceil(len(train_ds) / recipe.micro_batch_size)
    per_step = recipe.grad_accum * ranks.world_size
    steps_per_epoch = max(math.ceil(micro_batches / per_step), 1)
    total = (
        recipe.max_steps if recipe.max_steps > 0 else math.ceil(steps_per_epoch * recipe.num_epochs)
    )
    n, tokens = len(data.lengths), sum(data.lengths)
    supervised = tokens * data.report.supervised_fraction  # the builder measured it
    examples_per_step = n / steps_per_epoch
    layout = StepLayout(
        packed=plan.packing,
        processes=ranks.world_size,
        examples_per_epoch=n,
        tokens_per_epoch=tokens,
        micro_batch=micro,
        micro_batches_per_step=recipe.grad_accum,
        examples_per_step=examples_per_step,
        tokens_per_step=tokens / n * examples_per_step,
        supervised_tokens_per_step=supervised / n * examples_per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(recipe.warmup_ratio * total),
        repeated_per_epoch=repeated_at_epoch_end(
            len(train_ds), 1 if plan.packing else recipe.micro_batch_size, ranks.world_size
        ),
    )
    logger.info("steps: %s", layout.describe())
    return Batches(train_ds, eval_ds, collator, layout, graph_shape)


def host_embeddings_wanted(
    recipe: LoraRecipe,
    plan: FastPlan,
    model: Any,
    device: DeviceInfo | None,
    targets: Sequence[str] = (),
) -> None:
    """``host_embeddings: on`` where the plan does not keep the table in host memory.

    Raises:
        RecipeError: naming why (no GPU, the model's embedding, packing, checkpointing, several
            processes).
    """
    if recipe.host_embeddings != "on" or plan.host_embeddings:
        return
    if device is None:
        why = "this machine has no CUDA GPU"
    else:
        why = embedding_refusal(model, before_lora=True, targets=targets) or _unmovable_by(plan)
    raise RecipeError(
        [
            "host_embeddings: 'on' needs one process on a GPU, packing, no layer checkpointed "
            f"and an untied, frozen nn.Embedding input embedding; here {why}. Set "
            "host_embeddings: auto or off"
        ]
    )


def _unmovable_by(plan: FastPlan) -> str:
    """What in ``plan`` kept the input embedding table on the GPU (the embedding could move)."""
    if not plan.packing:
        return "packing is off"
    if plan.gradient_checkpointing != "off":
        return (
            f"gradient checkpointing is {plan.gradient_checkpointing!r} (PEFT then hooks the "
            "input embedding)"
        )
    if plan.distributed != "none":
        return f"distributed is {plan.distributed!r}"
    return (
        "with the table in host memory the plan would checkpoint layers (PEFT then hooks the "
        "input embedding), and without checkpointing it does not fit max_memory_gib"
    )


def embeddings_to_host(
    model: Any, batches: Batches, plan: FastPlan
) -> tuple[Batches, HostEmbeddings | None]:
    """Where the plan says so, the model's input embedding table in host memory for the fit and
    the batches' collator gathering each row's embeddings there (logged); ``restore()`` the
    returned [`HostEmbeddings`][loraforge.fast.host_embeddings.HostEmbeddings] after the fit."""
    if not plan.host_embeddings:
        return batches, None
    host = install_host_embeddings(model)
    logger.info(
        "input embeddings: in host memory for the fit (%.2f GiB of GPU memory freed); the "
        "collator gathers each row's",
        host.bytes / 2**30,
    )
    return replace(batches, collator=HostEmbeddingCollator(batches.collator, host)), host


def install_graphs(model: Any, batches: Batches, plan: FastPlan) -> LayerGraphs | None:
    """The decoder layers replayed from a CUDA graph where :func:`lay_out_steps` fixed the rows'
    shape (logged); ``None`` where they run eagerly. Where the plan's row size was chosen for
    graphed layers (``plan.cuda_graphs``) and they end up eager (refused here, or a failed
    capture later), the warning says how to plan for eager layers instead."""
    if batches.graph_shape is None:
        return None
    tokens, segments, cap = batches.graph_shape
    advice = (
        f"the plan's {plan.pack_tokens}-token rows were sized for layers replayed from a graph "
        "and may be slow eagerly; set cuda_graphs: off to plan for eager layers"
        if plan.cuda_graphs
        else ""
    )
    graphs, line = install_layer_graphs(
        model,
        tokens=tokens,
        segments=segments,
        max_length=cap,
        autocast_dtype=training_autocast(model),
        advice=advice,
    )
    if graphs is None and advice:
        logger.warning("CUDA graphs: %s; %s", line, advice)
    else:
        logger.info("CUDA graphs: %s", line)
    return graphs


def start_point(
    run: RunFolder,
    layout: StepLayout,
    fingerprint: dict[str, Any],
    allow_changed_data: bool,
) -> ResumePoint:
    if run.checkpoint is None:  # not resuming, or nothing to resume from
        return ResumePoint(None)
    start = resume_point(
        run.path / CHECKPOINTS,
        layout.total_steps,
        fingerprint,
        allow_changed_data=allow_changed_data,
    )
    if start.finished:
        logger.info(
            "resume: %s is at the run's last step (%d); nothing left to train, saving it",
            start.checkpoint,
            start.step,
        )
    elif start.checkpoint is not None:
        logger.info("resuming from %s (step %d)", start.checkpoint, start.step)
    return start


def optimizer_name(recipe: LoraRecipe, mixed: torch.dtype | None) -> str:
    """The Trainer's ``optim`` for ``recipe`` under the autocast dtype ``mixed``: the recipe's,
    except ``adamw_torch_fused`` under float16 loss scaling, where ``adamw_torch`` (the same
    update) runs instead. There the fused optimizer applies the grad scaler's skips itself, so
    accelerate does not see a skipped step and the Trainer would advance the learning-rate
    schedule on it (huggingface/accelerate#4242)."""
    import torch

    if recipe.optimizer == "adamw_torch_fused" and mixed == torch.float16:
        logger.info(
            "optimizer: adamw_torch instead of adamw_torch_fused under float16 loss scaling "
            "(a step the grad scaler skips must not advance the learning-rate schedule)"
        )
        return "adamw_torch"
    return recipe.optimizer


def build_trainer(
    recipe: LoraRecipe,
    out: Path,
    model: Any,
    batches: Batches,
    detach_head: bool,
    fingerprint: dict[str, Any],
    callbacks: Sequence[Any],
    plan: FastPlan,
    ranks: Ranks,
) -> Any:
    """The ``transformers.Trainer`` with loraforge's guards, loss and arguments (under FSDP2,
    training the sharded model through a
    [`ReplicatedAdapter`][loraforge.training.distributed.ReplicatedAdapter])."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    mixed = training_autocast(model)
    guard = NonFiniteGuard(
        out,
        examples=batches.train.input_ids
        if isinstance(batches.train, PackedDataset)
        else batches.train["input_ids"],
        record_indices=_record_indices(batches.train),
        source=recipe.data,
        ranks=ranks,
    )
    layout = batches.layout
    loss = PackedLoss(model.get_output_embeddings() if detach_head else None)
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=1 if layout.packed else recipe.micro_batch_size,
        per_device_eval_batch_size=1 if layout.packed else recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        max_steps=layout.total_steps,  # one definition of the run's length: the layout's
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=layout.warmup_steps,
        optim=optimizer_name(recipe, mixed),
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        eval_strategy="no" if batches.eval is None else ("steps" if recipe.eval_steps else "epoch"),
        eval_steps=recipe.eval_steps,
        report_to=list(recipe.report_to) or "none",
        bf16=mixed == torch.bfloat16,
        fp16=mixed == torch.float16,
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
        # several processes: the loss is divided by the step's supervised tokens over all of
        # them (not a mean of per-process means), and every adapter weight is used each step
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
    )
    one_gpu_per_process(args)  # never DataParallel over the GPUs one process sees
    on_main(ranks, lambda: recipe.to_yaml(out / "recipe.yaml"), "writing recipe.yaml")
    trainer = build_hf_trainer(
        guard=guard,
        detach_head=detach_head,
        replicated=ReplicatedAdapter(model, ranks) if plan.distributed == "fsdp2" else None,
        model=model,
        args=args,
        train_dataset=batches.train,
        eval_dataset=batches.eval,
        data_collator=batches.collator,
        compute_loss_func=loss if layout.packed else None,
        optimizers=(loraplus_optimizer(model, args, recipe), None),  # (None, None) unless LoRA+
        # the guards check before a save is marked complete
        callbacks=[
            guard,
            DiskSpaceGuard(ranks),
            PlainLog(),
            MarkComplete(out / "recipe.yaml", fingerprint, ranks),
            *callbacks,
        ],
    )
    quiet_progress(trainer)
    return trainer


def _record_indices(ds: Any) -> list[int]:
    if isinstance(ds, PackedDataset):
        return list(ds.dataset["record_index"])
    return list(ds["record_index"])


def run_fit(trainer: Any, model: Any, batches: Batches, start: ResumePoint) -> Fit:
    """Train (from ``start``), then evaluate once more if there is evaluation data."""
    began = time.perf_counter()
    train_loss: float | None = None
    with peft_rename_warning_ignored():
        if start.finished:
            assert start.checkpoint is not None
            history = load_checkpoint_adapter(model, start.checkpoint)
            trainer.state.global_step = start.step
            trainer.state.log_history = history
            losses = [h["loss"] for h in history if "loss" in h]
            train_loss = sum(losses) / len(losses) if losses else None
        else:
            checkpoints = trainer.args.output_dir
            with (
                disk_full_errors(checkpoints, "saving a checkpoint to"),
                lighter_steps(model),
            ):
                resume_from = str(start.checkpoint) if start.checkpoint else None
                result = trainer.train(resume_from_checkpoint=resume_from)
            train_loss = result.training_loss
        runtime = time.perf_counter() - began
        final_eval = trainer.evaluate() if batches.eval is not None else {}
    return Fit(
        train_loss=train_loss,
        history=list(trainer.state.log_history),
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        runtime_s=round(runtime, 3),
        final_eval=final_eval,
    )


def run_metrics(
    fit: Fit,
    batches: Batches,
    plan: FastPlan,
    model: Any,
    targets: Sequence[str],
    graphs: LayerGraphs | None = None,
) -> dict[str, Any]:
    losses = [h["loss"] for h in fit.history if "loss" in h]
    trainable, _ = model.get_nb_trainable_parameters()
    metrics: dict[str, Any] = {
        "train_loss": fit.train_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": fit.steps,
        "epochs": fit.epochs,
        "runtime_s": fit.runtime_s,
        "train_examples": batches.layout.examples_per_epoch,
        "train_tokens_per_epoch": batches.layout.tokens_per_epoch,
        "fast_path": plan.describe(),
        "cuda_graphs": graphs.summary() if graphs is not None else "off",
        "step": asdict(batches.layout),
        "trainable_parameters": trainable,
        "lora_target_modules": _lora_counts(model, targets),
    }
    metrics.update(fit.final_eval)
    return metrics
