"""Padding-free packing: many examples in one row, each attending only to itself.

The tutorial trains with batch size 1 and pads; a 14B model's GPU then idles between tiny steps.
Packing fills each micro-batch with whole examples up to a token budget (best-fit decreasing), and
keeps them apart:

* ``position_ids`` restart at 0 for every example, and the attention kernel is told where each
  example starts (``cu_seq_lens``), so no token attends across examples;
* the first label of every example is ``-100``: in the unpacked computation nothing predicts an
  example's first token, so the packed row has exactly the unpacked loss terms;
* only positions whose next token is supervised go through ``lm_head`` (``logits_to_keep``), and
  the loss is the sum over supervised tokens divided by the number of supervised tokens of the whole
  optimizer step — identical to the plain path (a test checks loss and LoRA gradients);
* with ``chunked_loss`` the model hands back the hidden states at those positions and
  :func:`linear_cross_entropy` applies ``lm_head`` a few hundred rows at a time, so the
  ``(tokens, vocabulary)`` logits (~1 GB for a 2,048-token row of Phi-4) never exist at once.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

from loraforge.data.builder import IGNORE_INDEX
from loraforge.errors import DataError

__all__ = [
    "PackedCollator",
    "PackedDataset",
    "linear_cross_entropy",
    "pack_examples",
    "packed_loss",
]


def pack_examples(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group example indices into bins whose total length is at most ``budget`` (best-fit
    decreasing: longest first, each into the fullest bin it still fits).

    Raises:
        DataError: an example is longer than the budget.
    """
    if budget < 1:
        raise DataError(f"pack_tokens must be >= 1, got {budget}")
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise DataError(
            f"{len(too_long)} example(s) are longer than pack_tokens={budget} (first: example "
            f"{too_long[0]} with {lengths[too_long[0]]} tokens); raise pack_tokens to at least "
            "max_length"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # free space of each open bin, kept sorted with the bin index as a tie-breaker
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


class PackedDataset:
    """A map-style dataset whose items are bins of examples (lists of feature dicts).

    The bins are packed once; their order is shuffled by the Trainer's sampler each epoch.
    """

    def __init__(self, dataset: Any, budget: int, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.budget = budget
        self.input_ids: list[list[int]] = list(dataset["input_ids"])
        self.labels: list[list[int]] = list(dataset["labels"])
        self.bins = pack_examples([len(x) for x in self.input_ids], budget)
        random.Random(seed).shuffle(self.bins)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict[str, list[int]]]:
        return [{"input_ids": self.input_ids[j], "labels": self.labels[j]} for j in self.bins[i]]

    @property
    def fill(self) -> float:
        """Share of the bins' token budget filled with real tokens."""
        used = sum(len(x) for x in self.input_ids)
        return used / (len(self.bins) * self.budget) if self.bins else 0.0


class PackedCollator:
    """Concatenate the examples of one bin into a single row.

    Emits ``input_ids``, ``labels`` (first label of each example set to -100), ``position_ids``
    restarting per example, ``cu_seq_lens_q``/``cu_seq_lens_k`` and ``max_length_q``/``_k`` for
    variable-length attention, and ``logits_to_keep`` (positions whose next token is supervised)
    when ``supervised_logits_only``. With ``pad_to`` the row is padded to that many tokens with a
    separate, unsupervised segment (static shapes).
    """

    def __init__(
        self, pad_token_id: int, *, pad_to: int | None = None, supervised_logits_only: bool = True
    ) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.supervised_logits_only = supervised_logits_only

    def __call__(self, batch: Sequence[Any]) -> dict[str, Any]:
        import torch

        examples = [ex for item in batch for ex in (item if isinstance(item, list) else [item])]
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        cu = [0]
        for ex in examples:
            n = len(ex["input_ids"])
            ids.extend(ex["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(ex["labels"][1:])
            pos.extend(range(n))
            cu.append(cu[-1] + n)
        if self.pad_to is not None and len(ids) < self.pad_to:
            n = self.pad_to - len(ids)
            ids.extend([self.pad_token_id] * n)
            labels.extend([IGNORE_INDEX] * n)
            pos.extend(range(n))
            cu.append(cu[-1] + n)
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        out: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            # transformers builds the per-example mask from position_ids only without a cache
            "use_cache": False,
        }
        if self.supervised_logits_only:
            out["logits_to_keep"] = _keep_positions(out["labels"])
        return out


def _keep_positions(labels: Any) -> Any:
    """Positions ``t`` of a one-row batch whose target ``labels[t + 1]`` is supervised."""
    import torch

    nxt = labels[0, 1:]
    return torch.nonzero(nxt != IGNORE_INDEX).flatten()


def packed_loss(
    outputs: Any,
    labels: Any,
    num_items_in_batch: Any = None,
    keep_positions: Any = None,
    lm_head: Any = None,
) -> Any:
    """Cross-entropy summed over supervised tokens, divided by the optimizer step's supervised-token
    count (``num_items_in_batch``); for ``transformers.Trainer(compute_loss_func=...)``.

    Works with full logits ``(1, T, V)`` and with ``logits_to_keep`` logits ``(1, K, V)``; given
    the ``logits_to_keep`` positions (``keep_positions``) it picks the targets with an index
    instead of a boolean mask, which would make the GPU wait for the CPU. Given ``lm_head`` (a
    frozen ``nn.Linear``), ``outputs.logits`` are the hidden states at the kept positions and the
    loss is :func:`linear_cross_entropy`.
    """
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    nxt = labels[:, 1:]
    if logits.shape[1] == labels.shape[1]:  # full logits: standard shift
        flat_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        flat_targets = nxt.reshape(-1)
    else:  # logits only at positions whose next token is supervised, in order
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if keep_positions is not None and nxt.shape[0] == 1:
            flat_targets = nxt[0].index_select(0, keep_positions.to(nxt.device))
        else:
            flat_targets = nxt[nxt != IGNORE_INDEX]
    if lm_head is not None:
        total = linear_cross_entropy(
            flat_logits, lm_head.weight, flat_targets.to(flat_logits.device), lm_head.bias
        )
    else:
        total = F.cross_entropy(
            flat_logits.float(),
            flat_targets.to(flat_logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    if num_items_in_batch is None:
        num_items_in_batch = (flat_targets != IGNORE_INDEX).sum()
    return total / num_items_in_batch


_CHUNK_BYTES = 128 * 2**20  # float32 logits per chunk


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, bias: Any = None) -> Any:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` in chunks of rows.

    Each chunk's logits are made in float32, reduced to its loss terms and turned at once into the
    gradient for ``hidden``; only that gradient (``hidden``'s size) is kept for the backward pass.
    ``weight`` and ``bias`` must be frozen (an ``lm_head`` under LoRA). Targets of ``-100`` are
    ignored.
    """
    return _linear_ce_function().apply(hidden, weight, targets, bias)


@functools.cache
def _linear_ce_function() -> Any:
    """The autograd function, built on first use (torch is imported lazily in this module)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, bias: Any) -> Any:
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                raise ValueError("linear_cross_entropy: lm_head must be frozen")
            rows = max(1, _CHUNK_BYTES // (4 * weight.shape[0]))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need = ctx.needs_input_grad[0]
            grad: Any = torch.empty_like(hidden) if need else None
            for a in range(0, hidden.shape[0], rows):
                h, t = hidden[a : a + rows].to(weight.dtype), targets[a : a + rows]
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
                    grad[a : a + rows] = probs.to(weight.dtype) @ weight
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            (grad,) = ctx.saved_tensors
            return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None

    return LinearCrossEntropy


# --------------------------------------------------------------------------- in train()


class _PackedLoss:
    """``compute_loss_func`` for packed batches, with the hooks it needs on the model.

    A forward pre-hook on the model sees each call's ``logits_to_keep`` (a tensor of positions
    from the packed collator; ``generate`` passes an int and is left alone). For such a call it
    hands the positions to the loss, which then picks the targets by index rather than by a mask
    that would make the GPU wait, and, with a chunkable ``head``, makes ``head`` pass its input
    through for the length of that one forward call: the "logits" are the hidden states at those
    positions, and :func:`~loraforge.packing.linear_cross_entropy` applies ``head`` in chunks. Each
    loss also goes to the non-finite guard (with a ``compute_loss_func`` the model computes no
    loss of its own for the guard to see).
    """

    def __init__(self, guard: Any, head: Any) -> None:
        self.guard, self.head = guard, head
        self._keep: Any = None
        self._hidden = False
        self._swapped: tuple[bool, Any] | None = None

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        keep, hidden = self._keep, self._hidden
        self._keep, self._hidden = None, False
        loss = packed_loss(
            outputs,
            labels,
            num_items_in_batch,
            keep_positions=keep,
            lm_head=self.head if hidden else None,
        )
        if self.guard is not None:
            self.guard.record_loss(loss)
        return loss

    def _before(self, module: Any, args: Any, kwargs: Any) -> None:
        import torch

        keep = kwargs.get("logits_to_keep")
        self._keep = keep if torch.is_tensor(keep) else None
        self._hidden = self.head is not None and self._keep is not None
        if self._hidden:
            d = self.head.__dict__
            self._swapped = ("forward" in d, d.get("forward"))
            self.head.forward = _pass_through

    def _after(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._swapped is not None:
            had, previous = self._swapped
            self._swapped = None
            if had:
                self.head.forward = previous
            else:
                del self.head.forward

    @contextlib.contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._restore()


def _pass_through(hidden: Any) -> Any:
    return hidden


def _chunkable_head(model: Any, *, require_frozen: bool = True) -> Any:
    """The model's ``lm_head`` if the loss may apply it itself in chunks: a plain (frozen)
    ``nn.Linear`` whose output the model uses as the logits unchanged."""
    import torch

    head = model.get_output_embeddings()
    cfg = model.config
    scaled = any(
        getattr(cfg, k, None) not in (None, 1.0)
        for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    frozen = head is not None and not any(p.requires_grad for p in head.parameters())
    ok = type(head) is torch.nn.Linear and not scaled and (frozen or not require_frozen)
    return head if ok else None
