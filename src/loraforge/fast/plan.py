"""The fast-path planner: a pure function from a recipe, a model's shape and a device to a plan.

[`plan_fast_path`][loraforge.fast.plan.plan_fast_path] resolves the recipe's ``auto`` settings
(packing, the packed row size ``pack_tokens``, attention, Liger, how many decoder layers to
checkpoint) from three plain values:

* the recipe;
* a [`ModelShape`][loraforge.fast.shape.ModelShape]: the sizes the arithmetic needs, read off a
  loaded model or off its config alone (:mod:`loraforge.fast.shape`);
* a [`DeviceInfo`][loraforge.fast.shape.DeviceInfo], or ``None`` for the CPU.

The planner imports no torch, calls no CUDA and registers nothing: the plan *names* the attention
(``"varlen"``, ``"sdpa"``, ...) and [`loraforge.fast.attention`][loraforge.fast.attention] turns the
name into a registered implementation when the plan is applied. Settings that can be refused from
the recipe alone are refused by [`LoraRecipe`][loraforge.LoraRecipe]; those that depend on the
machine by :func:`check_environment`, before the model is loaded.

Memory and time: under ``max_memory_gib`` each packed row size (2,048 to 8,192 tokens) is paired
with the fewest decoder layers it needs checkpointed to fit
([`estimate_memory`][loraforge.fast.memory.estimate_memory]), and the planner takes the pair with
the least estimated time per token ([`relative_time`][loraforge.fast.costs.relative_time]: a
checkpointed layer runs its forward twice; each row pays a fixed cost of launches, and on a 4-bit
base of dequantizing every weight in each pass, which longer rows spread over more tokens). Where
the decoder layers can replay from a CUDA graph (one process on a GPU, packing with varlen
attention, ``grad_accum`` 1, no int8 base, ``cuda_graphs`` not ``off``; see
[`loraforge.fast.graphs`][loraforge.fast.graphs]), a plan with no layer checkpointed pays far
less for its launches, and rows shorter than 2,048 tokens are tried too: 1,024 tokens for
examples of at most 512, and on a 4-bit base 1,536 for examples of at most 768, with no layer
checkpointed but, on a 4-bit base, as many MLPs as they need recomputing their ``gate_up`` output
(:func:`~loraforge.fast.fusion.recompute_mlps`). Where the plan would be such a short row, the
input embedding table may be kept in host memory (``host_embeddings``; ``auto``: on a 4-bit
base) if that lets the planner choose a plan it estimates faster. DoRA,
whose count is verified on 2,048-token rows only, takes the fewest checkpointed layers, then the
shorter row. If no pair fits, every layer is checkpointed on the shortest row. What a decoder
layer keeps for the backward pass is counted from the shape
([`loraforge.fast.activations`][loraforge.fast.activations]); a test measures it against the
tensors autograd really keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from loraforge.errors import RecipeError
from loraforge.fast.costs import relative_time
from loraforge.fast.memory import RESERVE_BYTES, estimate_memory, resident
from loraforge.fast.shape import DeviceInfo, ModelShape

if TYPE_CHECKING:
    from loraforge.recipe import LoraRecipe

__all__ = [
    "FastPlan",
    "check_environment",
    "over_budget_advice",
    "plan_fast_path",
    "sharded_shape",
]

GiB = 2**30

# --------------------------------------------------------------------------- rows tried

_ROWS = (8192, 6144, 4096, 3072, 2048)  # packed row sizes tried, largest first
# tried too where the decoder layers can replay from a CUDA graph, and only with no layer
# checkpointed: eagerly such short rows are bound by the CPU (on an H200, QLoRA under a 16 GiB cap:
# 1,024-token rows 7,346 tokens/s graphed, 3,419-4,026 eager; docs/benchmarks.md, session 7)
# 1,536 too, on a 4-bit base only: on an H200 a 4-bit Phi-4's graphed rows (24 GiB cap, all
# fitting) ran at 7,866-7,898 tokens/s for 1,024 tokens, 7,795 for 1,152, 7,895-7,901 for 1,280,
# 7,942 for 1,408, 8,426-8,638 for 1,536 and 8,397 for 1,664 (docs/benchmarks.md, session 13):
# the matrix products' speed depends on the row length, and 1,152-1,408 do not pay
_GRAPHED_ROWS = (1024, 1536)
_CPU_ROW = 4096


def _cap(recipe: LoraRecipe, device: DeviceInfo) -> int:
    if recipe.max_memory_gib is None:
        return device.memory_bytes
    return min(device.memory_bytes, int(recipe.max_memory_gib * GiB))


def _packs(recipe: LoraRecipe, device: DeviceInfo | None) -> bool:
    """Whether examples are packed: ``packing: on``, or ``auto`` on a GPU when the recipe does
    not ask for padded batches of ``batch_size`` examples."""
    auto = recipe.packing == "auto" and device is not None and recipe.batch_size is None
    return recipe.packing == "on" or auto


def _sizes_memory(recipe: LoraRecipe, packing: bool) -> bool:
    """Whether the planner chooses something from the memory budget."""
    return recipe.gradient_checkpointing == "auto" or (packing and recipe.pack_tokens is None)


def _memory_problems(recipe: LoraRecipe, shape: ModelShape, device: DeviceInfo) -> list[str]:
    """The weights (and the reserve) do not fit under the budget the planner sizes for."""
    packing = _packs(recipe, device)
    cap = _cap(recipe, device)
    if not _sizes_memory(recipe, packing) or resident(shape) + RESERVE_BYTES < cap:
        return []
    weights = f"{shape.weight_bytes / GiB:.1f} GiB"
    card = f"{device.memory_bytes / GiB:.1f} GiB"
    reserve = f"{RESERVE_BYTES / GiB:g} GiB"
    if cap < device.memory_bytes:
        return [
            f"max_memory_gib: {recipe.max_memory_gib:g} GiB leaves nothing for training: the "
            f"model's weights take {weights} (and {reserve} is kept in reserve); raise it (the GPU "
            f"{device.name} has {card}) or set it to null to plan for the whole card"
        ]
    return [
        f"max_memory_gib: the GPU {device.name} has {card}, and the model's weights take "
        f"{weights} of it (and {reserve} is kept in reserve): nothing is left for training; "
        "use a GPU with more memory, or a smaller model or dtype"
    ]


def check_environment(
    recipe: LoraRecipe, device: DeviceInfo | None, shape: ModelShape | None = None
) -> None:
    """Refuse the fast-path settings this machine cannot honour, before any model is loaded.

    Call it with [`DeviceInfo.probe()`][loraforge.fast.shape.DeviceInfo.probe] (``loraforge
    validate`` and the start of ``train()``), and with the model's shape from its config
    ([`ModelShape.from_config`][loraforge.fast.shape.ModelShape.from_config]) where it is known,
    to check the weights against ``max_memory_gib`` too.

    Raises:
        RecipeError: listing every problem: ``liger_kernels: on`` without Liger-Kernel or a GPU,
            ``attention: varlen`` without a GPU and a torch that has it or with ``dtype:
            float32``, ``pack_tokens`` on a CPU
            where ``packing: auto`` does not pack, weights that fill the memory budget.
    """
    problems: list[str] = []
    here = "this machine has no CUDA GPU"
    if recipe.liger_kernels == "on" and (device is None or not device.liger):
        why = (
            here
            if device is None
            else "liger-kernel is not installed (pip install 'loraforge[gpu]')"
        )
        problems.append(
            f"liger_kernels: 'on' needs the liger-kernel package and a CUDA GPU, and {why}; "
            "use 'auto' or 'off'"
        )
    if recipe.attention == "varlen" and (device is None or not device.varlen_attention):
        why = here if device is None else "this torch has no torch.nn.attention.varlen"
        problems.append(
            "attention: 'varlen' needs a CUDA GPU and torch >= 2.9 (torch.nn.attention.varlen), "
            f"and {why}; use 'auto' or 'sdpa'"
        )
    if recipe.attention == "varlen" and recipe.dtype == "float32":
        problems.append(_FLASH_16_BITS.format(bits=32))
    if recipe.attention == "flex_attention" and device is None:
        problems.append(
            "attention: 'flex_attention' trains only on a GPU (torch's FlexAttention has no "
            f"backward pass on the CPU), and {here}; use 'auto', 'sdpa' or 'eager'"
        )
    if device is None and recipe.packing == "auto" and recipe.pack_tokens is not None:
        problems.append(
            "pack_tokens: has no effect here: packing: auto packs only on a GPU, and this machine "
            "has none (set packing: on to pack on the CPU, or remove pack_tokens)"
        )
    if device is not None and shape is not None:
        problems += _memory_problems(recipe, shape, device)
    if recipe.quantization != "none":
        from loraforge.fast.quant import quantization_problems

        problems += quantization_problems(recipe.quantization, on_gpu=device is not None)
    if problems:
        raise RecipeError(problems)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class FastPlan:
    """What the fast path chose for a run (logged, and saved in ``loraforge.json``).

    Attributes:
        packing: examples are packed into rows.
        pack_tokens: tokens of one packed row (``None`` without packing).
        attention: ``"varlen"``, ``"sdpa"``, ``"eager"`` or ``"flex_attention"``; turn it into a
            transformers implementation with
            [`attention_implementation`][loraforge.fast.attention.attention_implementation].
        gradient_checkpointing: ``"off"``, ``"full"``, ``"selective"`` or ``"partial"`` (the
            first ``checkpoint_layers`` decoder layers checkpointed, the rest keep their
            activations).
        liger_kernels: apply Liger-Kernel.
        reason: why, in words.
        checkpoint_layers: decoder layers checkpointed (all of them for ``"full"`` and
            ``"selective"``).
        estimated_bytes: the planner's estimate of the peak GPU memory (weights, activations,
            loss, reserve); ``None`` on the CPU.
        budget_bytes: the memory it planned under (``max_memory_gib`` or the card); ``None`` on
            the CPU.
        distributed: ``"none"`` (one process), ``"ddp"`` (a whole model on each process) or
            ``"fsdp2"`` (the frozen base weights sharded across the processes; the estimates are
            per process).
        processes: the processes training together.
        cuda_graphs: the row size was chosen counting on the decoder layers replaying from a
            CUDA graph (one process on a GPU, packing, varlen attention, no layer checkpointed,
            ``grad_accum`` 1, no int8 base, ``cuda_graphs`` not ``off``, a plan within its
            budget); whether they do is decided when the run starts
            (``loraforge.training.steps.graphs_wanted``), on the same conditions.
        ungraphable: why the model's decoder layers cannot replay from a CUDA graph whatever
            the plan (``None``: they can, or the planner was not told).
        recompute_mlps: decoder MLPs (the first ones) whose ``gate_up`` output is computed
            again in the backward pass instead of kept
            ([`recompute_mlps`][loraforge.fast.fusion.recompute_mlps]); planned only for rows
            replayed from a CUDA graph on a 4-bit base, where the memory buys a longer row.
        host_embeddings: the input embedding table is kept in host memory for the fit
            ([`loraforge.fast.host_embeddings`][loraforge.fast.host_embeddings]) and the plan
            counts the GPU memory that frees.
    """

    packing: bool
    pack_tokens: int | None
    attention: str
    gradient_checkpointing: str
    liger_kernels: bool
    reason: str
    checkpoint_layers: int = 0
    estimated_bytes: int | None = None
    budget_bytes: int | None = None
    distributed: str = "none"
    processes: int = 1
    cuda_graphs: bool = False
    ungraphable: str | None = None
    recompute_mlps: int = 0
    host_embeddings: bool = False

    @property
    def fits(self) -> bool:
        """The estimate is within the budget (always true on the CPU)."""
        if self.estimated_bytes is None or self.budget_bytes is None:
            return True
        return self.estimated_bytes <= self.budget_bytes

    def describe(self) -> str:
        """One line for the log: ``packing 2048 tokens/row; attention varlen; ...``."""
        pack = f"packing {self.pack_tokens} tokens/row" if self.packing else "no packing"
        ckpt = self.gradient_checkpointing
        if ckpt == "partial":
            ckpt = f"{self.checkpoint_layers} layers"
        if self.recompute_mlps:
            ckpt += f", {self.recompute_mlps} MLPs recompute gate_up"
        several = f"{self.distributed} over {self.processes} process" + (
            "es; " if self.processes > 1 else "; "
        )
        several = several if self.distributed != "none" else ""
        return (
            f"{several}{pack}; attention {self.attention}; checkpointing "
            f"{ckpt}; liger {'on' if self.liger_kernels else 'off'}"
            f" ({self.reason})"
        )


_MAY_FIT_BYTES = 2 * GiB  # how far a plan recomputing every layer may be over and still fit


def over_budget_advice(recipe: LoraRecipe, plan: FastPlan) -> str:
    """What to say when the plan's memory estimate is over its budget.

    A plan that recomputes every layer (not DoRA) and is over by at most 2 GiB may still fit:
    the count errs high there (a 4-bit Phi-4 on 8,192-token rows reserved 15.1 GiB where it
    estimated 16.6). Any other plan over its budget should expect an out-of-memory error; the
    advice names what to lower for it."""
    budget = plan.budget_bytes or 0
    over = (plan.estimated_bytes or 0) - budget
    limit = (
        f"max_memory_gib={recipe.max_memory_gib:g}"
        if recipe.max_memory_gib is not None and recipe.max_memory_gib * GiB <= budget
        else f"the card's {budget / GiB:.1f} GiB"
    )
    said = f"estimated {(plan.estimated_bytes or 0) / GiB:.1f} GiB, over {limit}"
    rows = "pack_tokens or max_length" if plan.packing else "batch_size or max_length"
    recomputes_all = plan.gradient_checkpointing == "full" and not recipe.use_dora
    if recomputes_all and over <= _MAY_FIT_BYTES:
        return (
            f"the plan is {said}. The count errs high when every layer is recomputed, so the run "
            f"may fit; if it runs out of memory, lower {rows} or raise max_memory_gib"
        )
    if plan.gradient_checkpointing in ("off", "selective"):
        fix = "set gradient_checkpointing: auto or full, lower " + rows
    else:
        fix = "lower " + rows
    return f"the plan is {said}; expect an out-of-memory error ({fix}, or raise max_memory_gib)"


_FLASH_16_BITS = (
    "attention: 'varlen' (flash attention) computes in bfloat16 or float16 only, and the model "
    "computes in {bits}-bit floats; set dtype: bfloat16 (or give train() a 16-bit model), or "
    "attention: auto (sdpa for such a model) or sdpa"
)


def _attention(requested: str, packing: bool, device: DeviceInfo | None, shape: ModelShape) -> str:
    """The attention kernel: ``auto`` is varlen flash attention when packing on a GPU that has it
    and the model computes in 16 bits (flash attention takes bfloat16 and float16 only), else
    SDPA (:func:`plan_fast_path` refuses ``varlen`` for other models)."""
    if requested == "auto":
        usable = device is not None and device.varlen_attention and shape.activation_bytes == 2
        return "varlen" if packing and usable else "sdpa"
    return requested


def plan_fast_path(
    recipe: LoraRecipe,
    shape: ModelShape,
    device: DeviceInfo | None,
    *,
    longest_example: int,
    supervised_fraction: float = 1.0,
    chunkable_head: bool = True,
    processes: int = 1,
    ungraphable: str | None = None,
    movable_embeddings: bool = False,
) -> FastPlan:
    """Resolve the recipe's ``auto`` fast-path settings for a model of ``shape`` on ``device``.

    A pure function: no torch, no CUDA, no registration. The recipe is expected to have passed
    :func:`check_environment` for ``device`` (``liger_kernels: on`` is planned as on, ``attention:
    varlen`` as varlen, whatever ``device`` says).

    On the CPU (``device`` is ``None``): packing only when ``packing: on`` (rows of
    ``pack_tokens``, else 4,096 tokens or the longest example), ``sdpa`` for ``auto`` attention,
    no checkpointing for ``auto``. On a GPU: packing under ``auto``, varlen attention when packing
    and available for a model computing in 16 bits (SDPA for float32), and the row size and
    checkpointing from the memory under ``max_memory_gib`` (see the module's description).

    Args:
        recipe: the run's settings.
        shape: the model's shape.
        device: the GPU, or ``None`` for the CPU.
        longest_example: tokens of the longest training example (a packed row holds it).
        supervised_fraction: the share of training tokens that are supervised; with packing,
            logits are computed only there.
        chunkable_head: the loss may apply ``lm_head`` in chunks (``chunked_loss``).
        processes: the processes training together, each on a ``device`` of its own. With more
            than one, ``distributed: auto`` picks DDP when the whole model and the planned
            activations fit ``max_memory_gib`` on each device, else FSDP2 (the frozen base
            weights sharded across all processes), and the reason says how many shards the
            weights need; the memory estimates are per process.
        ungraphable: why the model's decoder layers cannot replay from a CUDA graph
            ([`layers_graphable`][loraforge.fast.graphs.layers_graphable]), or ``None`` if they
            can; the plan then sizes rows for eager layers, and records why
            (``FastPlan.ungraphable``).
        movable_embeddings: the model's input embedding table may be kept in host memory
            ([`embedding_refusal`][loraforge.fast.host_embeddings.embedding_refusal] found no
            reason against it). With one process on a GPU, packing and no layer checkpointed
            (PEFT hooks the input embedding of a checkpointed model), ``host_embeddings: on``
            then plans without the table's GPU memory, and ``auto`` does so only on a 4-bit base
            where the plan without it is a short graphed row and the plan with it is estimated
            faster (a 4-bit Phi-4 under ``max_memory_gib: 15`` or ``16``: fewer MLPs
            recomputed, or a longer row).

    Returns:
        The [`FastPlan`][loraforge.fast.plan.FastPlan].

    Raises:
        RecipeError: on a GPU, the model's weights fill the memory the planner sizes for
            (:func:`check_environment` with the shape reports the same before loading);
            ``attention: varlen`` for a model computing in float32.
    """
    if recipe.attention == "varlen" and shape.activation_bytes != 2:  # whatever the strategy
        raise RecipeError([_FLASH_16_BITS.format(bits=8 * shape.activation_bytes)])
    if processes < 2 and recipe.distributed != "fsdp2":
        return _plan_one(
            recipe,
            shape,
            device,
            longest_example,
            supervised_fraction,
            chunkable_head,
            graphs=_graphs_possible(recipe, device, ungraphable),
            ungraphable=ungraphable,
            movable_embeddings=movable_embeddings,
        )

    def plan(weights: ModelShape) -> FastPlan:
        return _plan_one(
            recipe, weights, device, longest_example, supervised_fraction, chunkable_head
        )

    def fitting(weights: ModelShape) -> FastPlan | None:
        try:
            p = plan(weights)
        except RecipeError:  # the weights alone fill the budget
            return None
        return p if p.fits else None

    strategy, why = recipe.distributed, f"distributed: {recipe.distributed}"
    quantized = getattr(recipe, "quantization", "none") != "none"
    if strategy == "auto" and quantized:  # 4-bit weights are not sharded: DDP or nothing
        strategy, why = "ddp", "DDP: quantized weights are not sharded"
    if strategy == "auto":
        whole = fitting(shape) if device is not None else plan(shape)
        if whole is not None:
            strategy = "ddp"
            why = "DDP: the whole model fits each process" + ("" if device else " (CPU)")
        else:
            strategy = "fsdp2"
            need = next(
                (n for n in range(2, processes + 1) if fitting(sharded_shape(shape, n))), None
            )
            why = "FSDP2: the whole model does not fit one process's budget" + (
                f"; the weights need >= {need} shards, sharded over all {processes}"
                if need
                else f"; it does not fit even sharded over all {processes}"
            )
    weights = sharded_shape(shape, processes) if strategy == "fsdp2" else shape
    try:
        chosen = plan(weights)
    except RecipeError as exc:
        if strategy != "fsdp2":
            raise
        raise RecipeError(
            [
                f"max_memory_gib: {recipe.max_memory_gib:g} GiB per process: the model's weights "
                f"take {shape.weight_bytes / GiB:.1f} GiB whole and "
                f"{weights.weight_bytes / GiB:.1f} GiB on each of {processes} processes under "
                "FSDP2 (its share, the output embedding and two layers gathered at a time), "
                f"which leaves nothing for training ({exc.problems[0]}); train on more "
                "processes or GPUs with more memory, or raise max_memory_gib"
            ]
        ) from None
    return replace(
        chosen,
        reason=f"{why}; {chosen.reason}",
        distributed=strategy,
        processes=processes,
    )


def sharded_shape(shape: ModelShape, shards: int) -> ModelShape:
    """``shape`` with the weights one of ``shards`` FSDP2 processes holds: its share of the
    decoder layers and the input embedding, the whole output embedding (kept whole for the
    chunked loss) and two decoder layers gathered whole at a time (the one running and the one
    fetched ahead)."""
    e, h = shape.activation_bytes, shape.hidden_size
    q = shape.num_attention_heads * shape.head_dim
    k = shape.num_key_value_heads * shape.head_dim
    layer = (h * (2 * q + 2 * k) + 3 * h * shape.intermediate_size + 2 * h) * e
    head = shape.vocab_size * h * e
    rest = max(shape.weight_bytes - head, 0)
    per_process = -(-rest // shards) + head + 2 * layer
    return replace(shape, weight_bytes=min(per_process, shape.weight_bytes))


def _graphs_possible(
    recipe: LoraRecipe, device: DeviceInfo | None, ungraphable: str | None
) -> bool:
    """Whether one process's decoder layers may replay from a CUDA graph, as far as the recipe,
    the device and the model's layers say (the plan must also pack rows for varlen attention,
    checkpoint no layer and fit its budget)."""
    return (
        device is not None
        and ungraphable is None
        and recipe.cuda_graphs != "off"
        and recipe.grad_accum == 1
        and recipe.quantization != "int8"
    )


def _plan_one(
    recipe: LoraRecipe,
    shape: ModelShape,
    device: DeviceInfo | None,
    longest_example: int,
    supervised_fraction: float,
    chunkable_head: bool,
    *,
    graphs: bool = False,
    ungraphable: str | None = None,
    movable_embeddings: bool = False,
) -> FastPlan:
    """The plan of one process whose weights are ``shape.weight_bytes``; ``graphs``: its
    decoder layers may replay from a CUDA graph (:func:`_graphs_possible`);
    ``movable_embeddings``: its input embedding table may be kept in host memory (see
    :func:`plan_fast_path`)."""
    args = (recipe, shape, device, longest_example, supervised_fraction, chunkable_head)
    plan = _plan_rows(*args, graphs=graphs, ungraphable=ungraphable)
    moved = shape.input_embedding_bytes
    if not (movable_embeddings and plan.packing and device is not None and moved):
        return plan
    if recipe.host_embeddings == "off":
        return plan
    lighter = replace(shape, weight_bytes=shape.weight_bytes - moved)
    host = _plan_rows(recipe, lighter, *args[2:], graphs=graphs, ungraphable=ungraphable)
    if host.gradient_checkpointing != "off":  # PEFT hooks the input embedding for checkpointing
        if recipe.host_embeddings != "on" or recipe.gradient_checkpointing != "auto":
            return plan
        # asked for: the plan with the table in host memory and no layer checkpointed, if it fits
        off = recipe.replace(gradient_checkpointing="off")
        host = _plan_rows(off, lighter, *args[2:], graphs=graphs, ungraphable=ungraphable)
        if host.gradient_checkpointing != "off" or not host.fits:
            return plan
    short = plan.cuda_graphs and (plan.pack_tokens or 0) < min(_ROWS)
    faster = host.cuda_graphs and _time(recipe, shape, host) < _time(recipe, shape, plan)
    measured = recipe.quantization == "nf4"  # auto only where it was measured to pay
    if recipe.host_embeddings == "auto" and not (short and faster and measured):
        return plan
    return replace(
        host,
        host_embeddings=True,
        reason=f"{host.reason}; input embeddings in host memory ({moved / GiB:.2f} GiB)",
    )


def _time(recipe: LoraRecipe, shape: ModelShape, plan: FastPlan) -> float:
    """A packed plan's estimated time per token (:func:`relative_time`)."""
    return relative_time(
        plan.pack_tokens or 1,
        plan.checkpoint_layers if plan.gradient_checkpointing in ("partial", "full") else 0,
        shape.num_hidden_layers,
        quantized=recipe.quantization == "nf4",
        graphed=plan.cuda_graphs,
        recomputed_mlps=plan.recompute_mlps,
    )


def _plan_rows(
    recipe: LoraRecipe,
    shape: ModelShape,
    device: DeviceInfo | None,
    longest_example: int,
    supervised_fraction: float,
    chunkable_head: bool,
    *,
    graphs: bool = False,
    ungraphable: str | None = None,
) -> FastPlan:
    """:func:`_plan_one` with the weights on the GPU: the row size and checkpointing."""
    packing = _packs(recipe, device)
    liger = recipe.liger_kernels == "on" or (
        recipe.liger_kernels == "auto" and device is not None and device.liger
    )
    attention = _attention(recipe.attention, packing, device, shape)
    graphs = graphs and packing and attention == "varlen"
    ckpt: str = recipe.gradient_checkpointing
    if device is None:
        rows = (recipe.pack_tokens or max(_CPU_ROW, longest_example)) if packing else None
        ckpt = "off" if ckpt == "auto" else ckpt
        layers = shape.num_hidden_layers if ckpt in ("full", "selective") else 0
        reason = "CPU: recomputation would only cost time"
        return FastPlan(packing, rows, attention, ckpt, liger, reason, layers)

    if _sizes_memory(recipe, packing):
        problems = _memory_problems(recipe, shape, device)
        if problems:
            raise RecipeError(problems)
    cap = _cap(recipe, device)
    mem = estimate_memory(
        recipe, shape, attention, packing, supervised_fraction, chunkable_head, cap
    )
    if not packing:  # the micro-batch is batch_size padded sequences
        candidates = [recipe.micro_batch_size * max(recipe.max_length, longest_example)]
    elif recipe.pack_tokens:
        candidates = [max(recipe.pack_tokens, longest_example)]
    else:
        candidates = [t for t in _ROWS if t >= longest_example] or [longest_example]
    # shorter rows, replayed from a graph with no layer checkpointed (ranked only so); only for
    # examples of at most half a row, which best-fit packing fills well (a graphed row is padded
    # to its full size, so a half-empty one would cost a full row's compute)
    tried = _GRAPHED_ROWS if recipe.quantization == "nf4" else _GRAPHED_ROWS[:1]  # 1,536: 4 bits
    short = (
        [t for t in tried if 2 * longest_example <= t < min(candidates)]
        if graphs and not recipe.pack_tokens and not recipe.use_dora
        else []
    )
    n = shape.num_hidden_layers
    m = 0  # MLPs recomputing their gate_up output
    if ckpt == "auto":
        nf4 = recipe.quantization == "nf4"  # dequantized per pass (int8 is not: unmeasured)
        # the short graphed rows on a 4-bit base may keep less by recomputing MLPs' gate_up
        # outputs instead of checkpointing layers (measured there only: docs/benchmarks.md,
        # session 13; a longer row spreads the dequantization of every weight over more tokens)
        mlps = graphs and nf4 and not recipe.use_dora

        def time(t: int, k: int, m: int) -> float:
            return relative_time(
                t, k, n, quantized=nf4, graphed=graphs and k == 0, recomputed_mlps=m
            )

        def options(t: int) -> list[tuple[int, int]]:  # (checkpointed, recomputed MLPs) that fit
            k = mem.fewest_checkpointed(t)
            found = [(k, 0)] if k is not None and (k == 0 or t not in short) else []
            if mlps and k != 0 and t in short:
                m = mem.fewest_recomputed_mlps(t)
                found += [(0, m)] if m is not None else []
            return found

        fits = {
            t: min(o, key=lambda km: time(t, *km))
            for t in (*candidates, *short)
            if (o := options(t))
        }

        def order(t: int) -> tuple[float, int]:  # the least estimated time, then the longer row
            k, m = fits[t]
            if recipe.use_dora:  # its count is verified on 2,048-token rows only: the fewest
                return (k, t)  # checkpointed layers, then the shorter row
            return (time(t, k, m), -t)

        if fits:
            rows = min(fits, key=order)
            k, m = fits[rows]
        else:
            rows, k = min(candidates), n
        ckpt = "off" if k == 0 else "full" if k >= n else "partial"
        sized = k
    else:  # "off", "full" or "selective" were asked for: the largest row that fits with it
        k = n if ckpt in ("full", "selective") else 0
        sized = n if ckpt == "full" else 0  # selective keeps at most what no checkpointing keeps
        short = short if ckpt == "off" else []  # graphed rows have no layer checkpointed
        ok = [t for t in candidates if mem.needed(t, sized) <= mem.free]
        ok = ok or [t for t in short if mem.needed(t, 0) <= mem.free]
        rows = max(ok) if ok else min([*candidates, *short])  # else the closest to fitting
    estimate = resident(shape) + RESERVE_BYTES + mem.needed(rows, sized, m)
    reason = (
        f"{mem.free / GiB:.1f} GiB for activations under a {cap / GiB:.0f} GiB cap, "
        f"weights {shape.weight_bytes / GiB:.1f} GiB"
    )
    if estimate > cap:
        reason += f"; estimated {estimate / GiB:.1f} GiB, over the cap"
    if not packing and recipe.packing == "auto":
        reason += "; packing off: batch_size is set (unset it to pack rows on a GPU)"
    graphed = graphs and k == 0 and int(estimate) <= cap  # as FastPlan.fits
    if graphed:
        reason += "; layers replayed from a CUDA graph"
    if m:
        reason += f"; {m} MLPs recompute their gate_up output to fit"
    return FastPlan(
        packing,
        rows if packing else None,
        attention,
        ckpt,
        liger,
        reason,
        k,
        estimated_bytes=int(estimate),
        budget_bytes=cap,
        cuda_graphs=graphed,
        ungraphable=ungraphable,
        recompute_mlps=m,
    )
