"""Several processes: who writes, what they agree on, and how FSDP2 shards the frozen base.

loraforge runs on the engines the ecosystem launches: ``torchrun`` or ``accelerate launch``
start the processes, [accelerate](https://huggingface.co/docs/accelerate)'s ``PartialState``
joins them (NCCL on GPUs, gloo on the CPU), transformers' Trainer (through accelerate) deals the
batches and wraps the model in PyTorch DDP, and torch's ``fully_shard`` shards it for FSDP2. This
module holds what loraforge adds on top:

* [`Ranks`][loraforge.training.distributed.Ranks] and
  [`join`][loraforge.training.distributed.join]: this process's place among the others (one
  process without a launcher: nothing is initialised, and every helper below is a plain call);
* [`on_main`][loraforge.training.distributed.on_main] and
  [`agreed`][loraforge.training.distributed.agreed]: exactly one writer, and one verdict. Work
  that writes (the run folder, the data report, checkpoints' manifests, the final save) runs on
  the main process, and an error there is raised on every process with the same message; a
  check made on every process (a guard) stops all of them together when it fails on any. No
  process is left waiting at a collective its peers will never reach;
* the steps of [`train`][loraforge.train] that exist because of several processes:
  [`check_processes`][loraforge.training.distributed.check_processes] (settings a launch cannot
  honour), [`shared_run_folder`][loraforge.training.distributed.shared_run_folder] (the main
  process opens and locks the run folder),
  [`quiet_unless_main`][loraforge.training.distributed.quiet_unless_main],
  [`check_same_plan`][loraforge.training.distributed.check_same_plan] and
  [`shard_if_planned`][loraforge.training.distributed.shard_if_planned];
* [`shard_base_model`][loraforge.training.distributed.shard_base_model]: FSDP2 for LoRA. Each
  decoder layer and the model are ``fully_shard``-ed with the adapter's parameters (and the
  output embedding, which the chunked loss reads outside the model's forward) left out of the
  shards: the frozen base weights are split across the processes, the adapter stays whole on
  every process in float32 beside them. The Trainer then must not wrap the model in DDP (see
  [`ReplicatedAdapter`][loraforge.training.distributed.ReplicatedAdapter]), and the adapter's
  gradients are averaged over the processes once per optimizer step, as DDP would.

Why the adapter is not sharded: it is a few tens of MB for a 14B model, so sharding it would
save little and cost a gathered state dict at every save, a sharded optimizer state at every
checkpoint and a resharding at every resume. Whole on every process, the adapter's saving,
checkpoints, optimizer state and resume are those of a single process; the saved adapter holds
full tensors and loads in plain PEFT.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from loraforge.errors import LoraForgeError, RecipeError
from loraforge.training.output import RunFolder, open_run_folder

if TYPE_CHECKING:
    from loraforge.fast.plan import FastPlan
    from loraforge.recipe import LoraRecipe

__all__ = [
    "Ranks",
    "ReplicatedAdapter",
    "agreed",
    "all_true",
    "barrier",
    "join",
    "launched",
    "on_all",
    "on_main",
    "one_gpu_per_process",
    "shard_base_model",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in the run.

    Attributes:
        world_size: processes training together (1 without a launcher).
        rank: this process's index among them (0 is the main process, the one that writes).
        local_rank: its index on this machine (its GPU).
        device: the device it trains on (``"cuda:1"``, ``"cpu"``).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """This is the process that writes."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1


def launched() -> bool:
    """Whether a launcher (``torchrun``, ``accelerate launch`` with several processes) started
    this process: it set ``LOCAL_RANK`` or a ``WORLD_SIZE`` above 1."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join() -> Ranks:
    """Join the run's other processes through accelerate's ``PartialState`` (which initialises
    ``torch.distributed`` from the launcher's environment: NCCL with GPUs, gloo without).
    Without a launcher, nothing is initialised and the single process's ``Ranks`` is returned."""
    import torch

    if not launched():
        return Ranks(device="cuda" if torch.cuda.is_available() else "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Ranks(
        world_size=state.num_processes,
        rank=state.process_index,
        local_rank=state.local_process_index,
        device=str(state.device),
    )


def _group_ready(ranks: Ranks) -> bool:
    import torch.distributed as dist

    return ranks.several and dist.is_available() and dist.is_initialized()


def barrier(ranks: Ranks) -> None:
    """Wait for every process (nothing with one process)."""
    import torch.distributed as dist

    if _group_ready(ranks):
        dist.barrier()


# ------------------------------------------------------------------ one writer, one verdict


def _portable(exc: BaseException) -> tuple[type[BaseException], str, dict[str, Any]]:
    """What another process needs to raise ``exc`` again: its type, message and attributes
    (exceptions whose ``__init__`` takes keyword arguments do not unpickle by themselves)."""
    import pickle

    state = {}
    for k, v in vars(exc).items():
        try:
            pickle.dumps(v)
        except Exception:  # an attribute that cannot travel stays behind
            continue
        state[k] = v
    kind = type(exc) if isinstance(exc, Exception) else RuntimeError
    return kind, str(exc), state


def _rebuild(kind: type[BaseException], message: str, state: dict[str, Any]) -> BaseException:
    try:
        exc = kind.__new__(kind)
        BaseException.__init__(exc, message)
        exc.__dict__.update(state)
        str(exc)  # a type whose __str__ needs what did not travel
        return exc
    except Exception:
        return LoraForgeError(message)


def on_main(ranks: Ranks, fn: Callable[[], T], what: str = "") -> T:
    """Run ``fn`` on the main process only and return its result on every process.

    An exception on the main process is raised there as it is, and on every other process as an
    exception of the same type with the same message (``what`` names the work in the message of
    a failure that is no loraforge error), so all processes stop together. The result must be
    picklable. With one process, ``fn()``.
    """
    if not _group_ready(ranks):
        return fn()
    import torch.distributed as dist

    result: Any = None
    error: BaseException | None = None
    if ranks.main:
        try:
            result = fn()
        except BaseException as exc:  # every process must hear of it, whatever it is
            error = exc
    payload: list[Any] = [
        (result, None if error is None else _portable(error)) if ranks.main else None
    ]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    result, portable = payload[0]
    if portable is not None:
        kind, message, state = portable
        if not issubclass(kind, LoraForgeError) and what:
            message = f"the main process failed {what}: {message}"
        raise _rebuild(kind, message, state)
    return result


@contextlib.contextmanager
def agreed(ranks: Ranks) -> Iterator[None]:
    """Make a check that every process runs stop every process when it fails on any.

    The body runs on every process; then the processes compare outcomes. If the body raised on
    some of them, each process raises the error of the lowest-ranked one (its own, with its
    traceback, where that is this process). Every process must enter the block the same number
    of times. With one process, the body runs as it is.
    """
    if not _group_ready(ranks):
        yield
        return
    import torch.distributed as dist

    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
    outcomes: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(outcomes, None if error is None else _portable(error))
    first = next(((r, o) for r, o in enumerate(outcomes) if o is not None), None)
    if first is None:
        return
    rank, (kind, message, state) = first
    if rank == ranks.rank and error is not None:
        raise error
    raise _rebuild(kind, message, state)


def on_all(ranks: Ranks, value: T) -> list[T]:
    """``value`` (picklable) from every process, in rank order (``[value]`` with one)."""
    if not _group_ready(ranks):
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def all_true(ranks: Ranks, flag: Any) -> Any:
    """``flag`` (a boolean tensor) and-ed over every process, without waiting for the result on
    the host: a non-finite loss on one process stops all of them at the same step."""
    import torch
    import torch.distributed as dist

    if not _group_ready(ranks):
        return flag
    values = flag.to(torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


def one_gpu_per_process(args: Any) -> None:
    """Keep a process to one GPU: a single process on a machine with several GPUs would
    otherwise have transformers' Trainer spread each batch over all of them with
    ``torch.nn.DataParallel``, which splits a packed row's batch of one and runs loraforge's
    per-instance functions on replicas (on a two-GPU H200 host it diverged at step 2). Sets this
    ``TrainingArguments`` instance's GPU count to 1, with a warning saying how to use them all."""
    if args.n_gpu <= 1:
        return
    logger.warning(
        "one process on a machine with %d GPUs: training on %s only. To train on all of them, "
        "launch one process per GPU: torchrun --nproc_per_node %d -m loraforge train recipe.yaml",
        args.n_gpu,
        args.device,
        args.n_gpu,
    )
    args._n_gpu = 1  # this instance's count (transformers reads it as args.n_gpu)


# ------------------------------------------------------------------ the steps of train()


def check_processes(recipe: LoraRecipe, ranks: Ranks) -> None:
    """Refuse a distributed setting one process cannot honour."""
    if recipe.distributed == "fsdp2" and recipe.quantization != "none":
        raise RecipeError(
            [
                f"distributed: 'fsdp2' with quantization: '{recipe.quantization}': loraforge does "
                "not shard 4-bit/8-bit weights; a 4-bit Phi-4 (about 8.5 GiB) fits each GPU, so "
                "use distributed: ddp (or auto)"
            ]
        )
    if recipe.distributed == "fsdp2" and recipe.eval_prompts is not None:
        raise RecipeError(
            [
                "distributed: 'fsdp2' with eval_prompts: answering them needs the whole model in "
                "one process, and FSDP2 shards it; use distributed: ddp where the model fits each "
                "GPU, or answer the prompts from the saved checkpoints afterwards (loraforge chat "
                "<run>/checkpoints/checkpoint-N)"
            ]
        )
    if recipe.distributed == "fsdp2" and not launched():
        raise RecipeError(
            [
                "distributed: 'fsdp2' shards the model across processes a launcher starts, and "
                "this is one process started without one; launch it (torchrun --nproc_per_node N "
                "-m loraforge train recipe.yaml, or accelerate launch --num_processes N -m "
                "loraforge train recipe.yaml), or use 'auto' or 'ddp'"
            ]
        )
    for plugin in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{plugin}", "").lower() == "true":
            raise RecipeError(
                [
                    f"distributed: this launch asks accelerate for its {plugin} plugin "
                    f"(distributed_type: {plugin} in the accelerate config, or --use_"
                    f"{plugin.lower()}); loraforge shards with FSDP2 itself and keeps the "
                    "adapter whole on every process: launch with distributed_type: MULTI_GPU "
                    "(or torchrun) and set distributed: fsdp2 (or auto) in the recipe"
                ]
            )
    if ranks.several:
        logger.info("process %d of %d on %s", ranks.rank, ranks.world_size, ranks.device)


@contextlib.contextmanager
def shared_run_folder(recipe: LoraRecipe, resume: bool, ranks: Ranks) -> Iterator[RunFolder]:
    """The run folder, opened (checked, locked, prepared) by the main process alone; the other
    processes wait for it and receive what it found (the checkpoint to resume from, a finished
    run), or the error it raised."""
    with contextlib.ExitStack() as stack:
        opened: list[RunFolder] = []

        def open_it() -> tuple[Any, Any]:
            opened.append(stack.enter_context(open_run_folder(recipe, resume=resume)))
            return opened[0].checkpoint, opened[0].finished

        checkpoint, finished = on_main(ranks, open_it, "opening the run folder")
        if opened:
            yield opened[0]
            return
        run = RunFolder(recipe, resume=resume)  # not entered: the main process holds the lock
        run.checkpoint, run.finished = checkpoint, finished
        yield run


@contextlib.contextmanager
def quiet_unless_main(ranks: Ranks) -> Iterator[None]:
    """Only the main process logs loraforge's progress; the others log warnings and errors
    (loraforge's own logger, restored afterwards)."""
    if ranks.main:
        yield
        return
    log = logging.getLogger("loraforge")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def check_same_plan(plan: FastPlan, ranks: Ranks) -> None:
    """Every process must train with the same plan (a GPU of another size could plan another
    row size or strategy, and the processes would then wait for each other forever)."""
    plans = on_all(ranks, plan)
    if any(p != plans[0] for p in plans):
        differ = "; ".join(f"process {n}: {p.describe()}" for n, p in enumerate(plans))
        raise RecipeError(
            [
                "the processes planned differently (GPUs of different sizes?): " + differ + ". "
                "Set max_memory_gib to what the smallest GPU holds, and pack_tokens and "
                "gradient_checkpointing explicitly"
            ]
        )


def shard_if_planned(model: Any, plan: FastPlan, ranks: Ranks) -> Any:
    """FSDP2: shard the frozen base weights across the processes, the adapter (and
    ``lm_head``) whole on each (the main process's adapter, broadcast to the others)."""
    if plan.distributed != "fsdp2":
        return model
    shard_base_model(model, ranks, keep_whole=[model.get_output_embeddings()])
    logger.info(
        "FSDP2: the frozen base weights sharded over %d processes; the adapter (and lm_head) "
        "whole on each, in %s",
        ranks.world_size,
        next(p for p in model.parameters() if p.requires_grad).dtype,
    )
    return model


# --------------------------------------------------------------------------- FSDP2


def shard_base_model(model: Any, ranks: Ranks, keep_whole: Sequence[Any] = ()) -> Any:
    """FSDP2 (torch's ``fully_shard``) on a PEFT model: every decoder layer, then the model.

    The adapter's parameters (those that require a gradient) and ``keep_whole`` (the output
    embedding, which the chunked loss applies outside the model's forward) are left out of the
    shards and moved whole to this process's device; the frozen base weights are sharded across
    all processes, each layer's gathered in its forward and backward and freed after them.
    Returns the model (sharded in place), to be trained through a
    [`ReplicatedAdapter`][loraforge.training.distributed.ReplicatedAdapter].

    Raises:
        RecipeError: the model has no decoder layers to shard, or torch lacks ``fully_shard``.
    """
    import torch

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6
        raise RecipeError(
            [
                "distributed: fsdp2 needs torch's fully_shard (torch >= 2.6; this is "
                f"{torch.__version__})"
            ]
        ) from exc
    from torch.distributed.device_mesh import init_device_mesh

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _decoder_layers(base)
    if not layers:
        raise RecipeError(
            [
                f"distributed: fsdp2 shards decoder layers, and {type(base).__name__} has no "
                "model.layers list; use distributed: ddp"
            ]
        )
    device = torch.device(ranks.device)
    mesh = init_device_mesh(device.type, (ranks.world_size,))
    whole = [p for p in model.parameters() if p.requires_grad]
    whole += [p for m in keep_whole for p in m.parameters(recurse=True)]
    with torch.no_grad():
        for p in whole:
            p.data = p.data.to(device)
        if _group_ready(ranks):  # every process starts from the main process's adapter
            import torch.distributed as dist

            for p in whole:
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
    ignored = set(whole)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored & set(layer.parameters()))
    fully_shard(base, mesh=mesh, ignored_params=ignored)
    return model


def _decoder_layers(base: Any) -> list[Any]:
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


class ReplicatedAdapter:
    """What the Trainer trains under FSDP2: the sharded model in a plain module (so accelerate
    does not wrap it in DDP, which cannot hold sharded parameters), and the averaging of the
    whole adapter's gradients over all processes once per optimizer step.

    Args:
        model: the model [`shard_base_model`][loraforge.training.distributed.shard_base_model]
            sharded.
        ranks: this process's place.
    """

    def __init__(self, model: Any, ranks: Ranks) -> None:
        import torch
        from accelerate.utils import convert_to_fp32

        class Sharded(torch.nn.Module):
            """The FSDP2-sharded model, as the Trainer calls it: under the mixed precision that
            accelerate adds to the model it prepares (this one it does not prepare)."""

            def __init__(self, module: Any) -> None:
                super().__init__()
                self.module = module
                self.autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
                    contextlib.nullcontext
                )

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                with self.autocast():
                    out = self.module(*args, **kwargs)
                return convert_to_fp32(out)

        self.module = Sharded(model)
        self.ranks = ranks
        self.params = [p for p in model.parameters() if p.requires_grad]

    def trained_module(self, autocast: Callable[[], contextlib.AbstractContextManager[Any]]) -> Any:
        """The module the Trainer trains in place of accelerate's DDP wrapper: the sharded model,
        each forward under ``autocast`` (the Trainer's ``accelerator.autocast``) with its
        half-precision outputs in float32, as accelerate's ``prepare_model`` does for DDP.
        Without it a bf16 run would reach the lean functions with no autocast, and they would
        hand every call back to PEFT's forward."""
        self.module.autocast = autocast
        return self.module

    def reshard(self) -> None:
        """Free every gathered layer and the model's gathered root on this process; call it on
        every process before a forward pass that follows work only the main process did.

        FSDP2 gathers a sharded module's weights in its forward pass and keeps the root's (the
        embeddings and final norm) gathered after it; what frees them differs by path (a backward
        pass frees all, a state dict frees the root). After an evaluation and then a checkpoint
        written by the main process alone, the main process's root is sharded and the others' is
        not: the next forward pass would gather the root on one process and the first layer on
        the others, a mismatch of collectives (seen with an eval split under FSDP2)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def average_gradients(self) -> None:
        """Average the adapter's gradients over every process (one flat all-reduce per dtype
        and device); call it once per optimizer step, after the last backward pass."""
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if not _group_ready(self.ranks):
            return
        groups: dict[tuple[Any, Any], list[Any]] = {}
        for p in self.params:
            if p.grad is None:  # unused on this process in this step: it contributes zeros
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.ranks.world_size)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(synced)
