"""Work that a graphed pass of the decoder layers does once for all layers instead of per layer.

Replayed from a CUDA graph (:mod:`loraforge.fast.graphs`), a training step costs what its kernels
cost on the GPU, and the smallest kernels cost more than their work: a launch, a few microseconds
of a mostly idle GPU, and the gap to the next kernel. Two kinds were run per adapted layer:

* **Casts of the adapter weights.** Under mixed precision the LoRA weights are float32 (the
  optimizer's copies) and the lean functions compute in bfloat16, so each of Phi-4's 320 LoRA
  tensors was cast in the forward pass, and its gradient widened back in the backward pass: 640
  kernels of a few microseconds a step. Here one operation casts all of them at the start of the
  pass (``torch._foreach_copy_``), and one widens all their gradients at the end of the backward
  pass. The values are the ones the per-layer casts give (the same rounding to the compute dtype;
  a gradient widened exactly), so losses and gradients are unchanged bit for bit; a test checks it.
* **Dropout seeds.** Inside a graph each dropout draws its seed on the device
  (:func:`loraforge.fast.lora_ops.new_seed`): 160 one-element draws a step for Phi-4. Here one draw
  at the start of the pass makes them all; each dropout reads its own element. Each replay draws
  afresh, as before; the masks come from a different stream than before, with the same
  distribution.

:class:`PassInputs` holds what one graphed stack prepares; :meth:`PassInputs.active` makes it the
current one on this thread while the stack runs (its warm-up and its capture: a replay runs no
Python, it repeats the captured kernels). Outside that context :func:`adapter_weight` and
:func:`pooled_seed` change nothing, so eager calls (evaluation, generation, a layer called on its
own) cast and draw per layer as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["PassInputs", "adapter_weight", "pooled_seed"]

_CURRENT = threading.local()  # .inputs: the PassInputs of the pass running on this thread


class _CastAll(torch.autograd.Function):
    """``tuple(w.to(dtype) for w in weights)`` as one operation; the backward pass widens the
    gradients back to each weight's dtype, also as one operation."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.dtypes = [w.dtype for w in weights]
        return _copied(weights, dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if present:
            dst = [torch.empty_like(g, dtype=ctx.dtypes[i]) for i, g in present]
            torch._foreach_copy_(dst, [g for _, g in present])
            for (i, _), d in zip(present, dst, strict=True):
                out[i] = d
        return (None, *out)


def _copied(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    dst = [torch.empty_like(w, dtype=dtype) for w in weights]
    if dst:
        torch._foreach_copy_(dst, [w.detach() for w in weights])
    return tuple(dst)


class PassInputs:
    """The adapter weights in the compute dtype and the dropout seeds of one pass of a stack of
    layers, made at the start of the pass.

    Args:
        weights: LoRA weights of the layers the lean functions run; those in another dtype than
            ``dtype`` (the float32 masters under mixed precision) are cast. A layer that falls
            back to its own forward reads the weights themselves and casts under autocast.
        dtype: the compute dtype (the autocast dtype), or ``None`` for no casts.
        device: where seeds are drawn (the lean functions ask for pooled seeds only on a CUDA
            device, whose dropout kernel reads a seed tensor).

    Attributes:
        seeds: seeds a pass draws; learned from the first pass (which draws them one by one) and
            drawn together from then on.
    """

    def __init__(
        self, weights: Sequence[torch.Tensor], dtype: torch.dtype | None, device: torch.device
    ) -> None:
        self.weights = [w for w in weights if dtype is not None and w.dtype != dtype]
        self.dtype = dtype
        self.device = device
        self.seeds = 0
        self._copies: dict[int, tuple[torch.Tensor, int]] = {}
        self._pool: torch.Tensor | None = None
        self._taken = 0
        self._active = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Cast the weights and draw the seeds now; within the context, on this thread, the lean
        functions read them (:func:`adapter_weight`, :func:`pooled_seed`).

        Raises:
            RuntimeError: this instance is already active (a pass within its own pass).
        """
        if self._active:
            raise RuntimeError("PassInputs.active() entered again within its own pass")
        before = getattr(_CURRENT, "inputs", None)
        self._active = True
        try:
            self._taken = 0
            self._copies = self._cast()
            if self.seeds:
                shape = (self.seeds,)
                self._pool = torch.randint(0, 2**62, shape, dtype=torch.int64, device=self.device)
            _CURRENT.inputs = self
            yield
        finally:
            _CURRENT.inputs = before
            self.seeds = max(self.seeds, self._taken)
            self._copies, self._pool = {}, None
            self._active = False

    def _cast(self) -> dict[int, tuple[torch.Tensor, int]]:
        weights, dtype = self.weights, self.dtype
        if not weights or dtype is None:
            return {}
        # trained weights through one autograd node (their copies carry gradients back); frozen
        # ones copied without autograd, so no gradient is computed for them
        grad = torch.is_grad_enabled()
        trained = [w for w in weights if grad and w.requires_grad]
        frozen = [w for w in weights if not (grad and w.requires_grad)]
        copies = list(_CastAll.apply(dtype, *trained)) if trained else []
        copies += _copied(frozen, dtype)
        order = trained + frozen
        return {id(w): (c, w._version) for w, c in zip(order, copies, strict=True)}

    def copy_of(self, w: torch.Tensor) -> torch.Tensor:
        hit = self._copies.get(id(w))
        if hit is not None and hit[1] == w._version:  # not changed in place since the cast
            return hit[0]
        return w

    def seed(self, device: torch.device) -> torch.Tensor | None:
        if device != self.device:
            return None
        self._taken += 1
        pool = self._pool
        if pool is None or self._taken > pool.numel():
            return None
        return pool[self._taken - 1 : self._taken]


def _current() -> PassInputs | None:
    return getattr(_CURRENT, "inputs", None)


def adapter_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` in the pass's compute dtype when a pass of a stack is running on this thread and cast
    it, else ``w`` itself (the layer casts it)."""
    inputs = _current()
    return w if inputs is None else inputs.copy_of(w)


def pooled_seed(device: torch.device) -> torch.Tensor | None:
    """A dropout seed on ``device`` (a one-element int64 tensor, a view of the pass's single
    draw) when a pass of a stack is running on this thread and drew enough; ``None`` otherwise
    (the caller draws its own)."""
    inputs = _current()
    return None if inputs is None else inputs.seed(device)
