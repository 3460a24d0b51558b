"""Losses of the packed path: one definition of the step's normalisation, and ``lm_head`` in chunks.

* [`packed_loss`][loraforge.fast.losses.packed_loss]: cross-entropy summed over the supervised
  tokens of a packed row and divided by the supervised-token count of the whole optimizer step
  (``num_items_in_batch``, which the Trainer counts over every micro-batch of the step) — the
  same normalisation as the plain path, so packed and unpacked training compute the same loss.
  With logits only at the positions whose next token is supervised (``logits_to_keep``), the
  targets are paired with them by a stable sort of the label row, which needs no device-to-host
  wait (a boolean mask would make the GPU wait for the CPU).
* [`linear_cross_entropy`][loraforge.fast.losses.linear_cross_entropy]: ``lm_head`` and the
  cross-entropy a few hundred rows at a time, so the ``(positions, vocabulary)`` logits (about
  1 GB for a 2,048-token row of Phi-4) never exist at once.
* [`PackedLoss`][loraforge.fast.losses.PackedLoss]: the ``compute_loss_func`` given to the
  Trainer, built with the head it applies (or none).
* [`detached_head`][loraforge.fast.losses.detached_head]: for the length of a fit, the model's
  output embedding passes hidden states through and the loss applies the real head in chunks;
  used only after [`head_is_detachable`][loraforge.fast.losses.head_is_detachable] has shown, on
  the real model, that its logits are exactly ``lm_head(hidden)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraforge.data.builder import IGNORE_INDEX

__all__ = [
    "CHUNK_BYTES",
    "ROW_ALIGN",
    "PackedLoss",
    "chunk_rows",
    "detached_head",
    "head_is_detachable",
    "linear_cross_entropy",
    "packed_loss",
]

logger = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 2**20
"""Float32 logits per chunk of [`linear_cross_entropy`][loraforge.fast.losses.linear_cross_entropy]
(the planner counts three such buffers: the logits, their low-precision copy and the gradient)."""

ROW_ALIGN = 64
"""Rows per chunk of [`linear_cross_entropy`][loraforge.fast.losses.linear_cross_entropy] are a
multiple of this (where a chunk holds that many): the number of supervised positions changes from
step to step, and each new matrix-product shape costs the GPU library a kernel choice (on an H200,
milliseconds with the GPU idle); padded to a few shapes, each is chosen once."""


def chunk_rows(n: int, most: int, align: int | None = None) -> tuple[int, int]:
    """Rows per chunk and number of chunks for ``n`` rows in chunks of at most ``most``: equal
    chunks whose size is a multiple of ``align`` (``ROW_ALIGN`` by default; when ``most`` allows
    one), so the padding is less than ``align`` rows a chunk.

    Examples:
        >>> chunk_rows(342, 334)  # two chunks of 192 rows: 42 rows of padding
        (192, 2)
        >>> chunk_rows(100, 334)
        (128, 1)
        >>> chunk_rows(23, 5)  # chunks smaller than ROW_ALIGN are not aligned
        (5, 5)
        >>> chunk_rows(0, 334)  # no rows: no chunk
        (0, 0)
    """
    if n <= 0:
        return 0, 0
    align = ROW_ALIGN if align is None else align
    align = align if most >= align else 1
    most = most // align * align
    chunks = max(1, -(-n // most))
    rows = -(-n // chunks)
    return -(-rows // align) * align, chunks


def _targets_at_kept(labels: Any, kept: int) -> Any:
    """The supervised targets of a one-row label tensor in position order, when the logits were
    computed only at the ``kept`` positions whose next label is supervised.

    A stable sort moves the supervised entries of ``labels[0, 1:]`` to the front in their order;
    the count comes from the logits' shape, known on the host, so nothing waits for the device.
    """
    import torch

    nxt = labels[0, 1:]
    order = torch.argsort((nxt == IGNORE_INDEX).to(torch.int8), stable=True)
    return nxt.index_select(0, order[:kept])


def packed_loss(
    outputs: Any, labels: Any, num_items_in_batch: Any = None, lm_head: Any = None
) -> Any:
    """Cross-entropy summed over supervised tokens, divided by the optimizer step's supervised-token
    count (``num_items_in_batch``; the row's own count when ``None``).

    Works with full logits ``(1, T, V)`` (the standard shift) and with ``logits_to_keep`` logits
    ``(1, K, V)`` at the positions whose next token is supervised. Given ``lm_head`` (a frozen
    ``nn.Linear``), ``outputs.logits`` are the hidden states at those positions and the loss is
    [`linear_cross_entropy`][loraforge.fast.losses.linear_cross_entropy].
    """
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if logits.shape[1] == labels.shape[1] and lm_head is None:  # full logits: standard shift
        flat_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        flat_targets = labels[:, 1:].reshape(-1)
    else:  # logits (or hidden states) only at positions whose next token is supervised
        if labels.shape[0] != 1:
            raise ValueError("packed_loss: supervised-only logits need one packed row per batch")
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_targets = _targets_at_kept(labels, flat_logits.shape[0])
    flat_targets = flat_targets.to(flat_logits.device)
    if lm_head is not None:
        total = linear_cross_entropy(flat_logits, lm_head.weight, flat_targets, lm_head.bias)
    else:
        total = F.cross_entropy(
            flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    if num_items_in_batch is None:
        num_items_in_batch = (flat_targets != IGNORE_INDEX).sum()
    return total / num_items_in_batch


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, bias: Any = None) -> Any:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` in chunks of rows.

    Each chunk's logits are made in float32, reduced to its loss terms and turned at once into the
    gradient for ``hidden``; only that gradient (``hidden``'s size) is kept for the backward pass.
    ``weight`` and ``bias`` must be frozen (an ``lm_head`` under LoRA). Targets of ``-100`` are
    ignored.
    """
    return _linear_ce_function().apply(hidden, weight, targets, bias, CHUNK_BYTES)


@functools.cache
def _linear_ce_function() -> Any:
    """The autograd class, defined on first use so that importing this module needs no torch
    (pure memoisation of a class definition)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, hidden: Any, weight: Any, targets: Any, bias: Any, chunk_bytes: int
        ) -> Any:
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                raise ValueError("linear_cross_entropy: lm_head must be frozen")
            rows, chunks = chunk_rows(hidden.shape[0], max(1, chunk_bytes // (4 * weight.shape[0])))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need = ctx.needs_input_grad[0]
            grad: Any = torch.empty_like(hidden) if need else None
            for a in range(0, rows * chunks, max(rows, 1)):
                h, t = hidden[a : a + rows].to(weight.dtype), targets[a : a + rows]
                short = rows - h.shape[0]  # the last chunk: zero rows with ignored targets
                if short:
                    h = torch.cat([h, h.new_zeros(short, h.shape[1])])
                    t = torch.cat([t, t.new_full((short,), IGNORE_INDEX)])
                logits = (
                    h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
                ).float()
                valid = t != IGNORE_INDEX
                safe = torch.where(valid, t, 0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if need:
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
                    probs.scatter_add_(1, safe, torch.full_like(picked, -1.0).unsqueeze(1))
                    probs.mul_(valid.unsqueeze(1))
                    grad[a : a + rows] = (probs.to(weight.dtype) @ weight)[: rows - short]
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            (grad,) = ctx.saved_tensors
            dh = None if grad is None else grad * grad_out.to(grad.dtype)
            return dh, None, None, None, None

    return LinearCrossEntropy


@dataclass(frozen=True, slots=True)
class PackedLoss:
    """``compute_loss_func`` for packed rows (see
    [`packed_loss`][loraforge.fast.losses.packed_loss]).

    Attributes:
        head: the model's real ``lm_head`` while
            [`detached_head`][loraforge.fast.losses.detached_head] makes the model return hidden
            states; ``None`` when the model returns logits.
    """

    head: Any = None

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        return packed_loss(outputs, labels, num_items_in_batch, lm_head=self.head)


def _frozen_linear(module: Any) -> bool:
    import torch

    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


def head_is_detachable(model: Any, inputs: dict[str, Any]) -> tuple[bool, str]:
    """Whether the loss may apply ``model``'s output embedding itself, in chunks, and why not.

    The head must be a frozen ``torch.nn.Linear`` (nothing else is on the allow-list), and the
    model's logits must be exactly ``head(hidden)``: checked on the real model with ``inputs``
    (a short batch as the training path feeds it, e.g. one packed row with its ``position_ids``
    and ``cu_seq_lens``; ``labels`` and ``logits_to_keep`` are ignored), by comparing the logits
    the model computes with ``head`` applied to what it returns while the head passes hidden
    states through. A model that scales, caps or otherwise transforms its logits after the head
    fails the check and keeps the model's own logits (``logits_to_keep`` still applies).
    """
    import torch

    head = model.get_output_embeddings()
    if head is None or not _frozen_linear(head):
        return False, f"the output embedding is {type(head).__name__}, not a frozen nn.Linear"
    batch = {k: v for k, v in inputs.items() if k not in ("labels", "logits_to_keep")}
    keep = torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            reference = model(**batch, logits_to_keep=keep).logits
            with detached_head(model) as real:
                hidden = model(**batch, logits_to_keep=keep).logits
                recomputed = real(hidden.to(real.weight.dtype))
    finally:
        model.train(was_training)
    if recomputed.shape != reference.shape:
        return False, "the model's logits are not lm_head(hidden) (shapes differ)"
    ref = reference.float()
    err = (recomputed.float() - ref).abs().max().item()
    tol = 1e-4 if reference.dtype == torch.float32 else 2e-2
    scale = max(ref.abs().max().item(), 1.0)
    if not err <= tol * scale:
        return False, f"the model's logits differ from lm_head(hidden) by {err:.3g}"
    return True, "the logits are lm_head(hidden) (checked on the model)"


@contextlib.contextmanager
def detached_head(model: Any) -> Iterator[Any]:
    """For the block, ``model``'s output embedding passes hidden states through; yields the real
    head. Only this model instance changes, and it is restored on every exit path."""
    import torch

    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)
