"""Padding-free packing: many examples in one row, each attending only to itself.

The tutorial trains with batch size 1 and pads; a 14B model's GPU then idles between tiny steps.
Packing fills each micro-batch with whole examples up to a token budget (best-fit decreasing), and
keeps them apart:

* ``position_ids`` restart at 0 for every example, and the attention kernel is told where each
  example starts (``cu_seq_lens``), so no token attends across examples;
* the first label of every example is ``-100``: in the unpacked computation nothing predicts an
  example's first token, so the packed row has exactly the unpacked loss terms;
* only positions whose next token is supervised go through ``lm_head``: the collator says which
  (``logits_to_keep``), and the loss of [`loraforge.fast.losses`][loraforge.fast.losses] pairs
  them with their targets.
"""

from __future__ import annotations

import bisect
import itertools
import random
from array import array
from collections.abc import Sequence
from typing import Any

from loraforge.data.builder import IGNORE_INDEX
from loraforge.errors import DataError

__all__ = ["PackedCollator", "PackedDataset", "fixed_shape", "pack_examples"]


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

    The bins are packed once; their order is shuffled by the Trainer's sampler each epoch. Each
    example's tokens and labels are held as an ``array("i")`` rather than a list of ints: 4 bytes
    a token, and one object an example that the garbage collector scans in constant time during
    the fit (a list's every element is visited).
    """

    def __init__(self, dataset: Any, budget: int, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.budget = budget
        self.input_ids: list[Sequence[int]] = [array("i", x) for x in dataset["input_ids"]]
        self.labels: list[Sequence[int]] = [array("i", x) for x in dataset["labels"]]
        self.bins = pack_examples([len(x) for x in self.input_ids], budget)
        random.Random(seed).shuffle(self.bins)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> list[dict[str, Sequence[int]]]:
        return [{"input_ids": self.input_ids[j], "labels": self.labels[j]} for j in self.bins[i]]

    @property
    def fill(self) -> float:
        """Share of the bins' token budget filled with real tokens."""
        used = sum(len(x) for x in self.input_ids)
        return used / (len(self.bins) * self.budget) if self.bins else 0.0


def fixed_shape(rows: PackedDataset) -> tuple[int, int]:
    """``(segment_cap, segments)`` for :class:`PackedCollator` that fit every row of ``rows``
    padded to its budget: the longest example bounds every segment (the padding is split into
    segments no longer), and ``segments`` is the most ``cu_seq_lens`` entries a row then needs."""
    longest = max((len(x) for x in rows.input_ids), default=1)
    most = 0
    for b in rows.bins:
        used = sum(len(rows.input_ids[j]) for j in b)
        most = max(most, len(b) + -(-(rows.budget - used) // longest))
    return longest, most + 1


class PackedCollator:
    """Concatenate the examples of one bin into a single row.

    Emits ``input_ids``, ``labels`` (first label of each example set to -100), ``position_ids``
    restarting per example, ``cu_seq_lens_q``/``cu_seq_lens_k`` and ``max_length_q``/``_k`` for
    variable-length attention, and ``logits_to_keep`` (positions whose next token is supervised)
    when ``supervised_logits_only``. With ``pad_to`` the row is padded to that many tokens with a
    separate, unsupervised segment (static shapes). For fixed shapes throughout (CUDA graphs,
    :mod:`loraforge.fast.graphs`), ``segment_cap`` splits that padding into segments of at most
    that many tokens, and ``segments`` pads ``cu_seq_lens`` to that many entries with empty
    segments at the end; the model's result for the real tokens is the same.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        pad_to: int | None = None,
        supervised_logits_only: bool = True,
        segment_cap: int | None = None,
        segments: int | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.supervised_logits_only = supervised_logits_only
        self.segment_cap = segment_cap
        self.segments = segments

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
            left = self.pad_to - len(ids)
            while left:
                n = min(left, self.segment_cap or left)
                ids.extend([self.pad_token_id] * n)
                labels.extend([IGNORE_INDEX] * n)
                pos.extend(range(n))
                cu.append(cu[-1] + n)
                left -= n
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        if self.segments is not None:
            if len(cu) > self.segments:
                raise DataError(
                    f"a packed row has {len(cu) - 1} segments, more than the {self.segments - 1} "
                    "its fixed shape allows"
                )
            cu.extend([cu[-1]] * (self.segments - len(cu)))  # empty segments
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
            # positions t whose target labels[t + 1] is supervised
            nxt = out["labels"][0, 1:]
            out["logits_to_keep"] = torch.nonzero(nxt != IGNORE_INDEX).flatten()
        return out
