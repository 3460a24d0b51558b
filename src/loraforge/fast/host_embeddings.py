"""The input embedding table in the CPU's memory for the length of a fit.

A frozen input embedding is only ever read by a gather: one row of the table per token. On a
small card its memory is worth more as activations: Phi-4's table is 0.96 GiB, which under a
16 GiB budget lets a 4-bit Phi-4 pack longer rows, spreading each row's fixed cost (dequantizing
every weight twice a step) over more tokens. :class:`HostEmbeddings` moves the table to pinned
host memory and back:

* the collator gathers each training row's embeddings on the CPU
  ([`HostEmbeddingCollator`][loraforge.fast.host_embeddings.HostEmbeddingCollator]), and the row
  reaches the GPU as ``inputs_embeds`` with the rest of the batch (pinned, without the CPU
  waiting for the GPU); the Trainer then calls the model without ``input_ids``;
* any other call of the model during the fit (generation of ``eval_prompts``, a check) goes
  through the table's stand-in module, which gathers on the CPU too and moves the rows to the
  model's device (the ids are copied to the CPU first, so the CPU waits for the GPU there);
* after the fit the model gets its own embedding module back, with its table on its device.

Only this model instance changes (its input embedding module, through
``set_input_embeddings``); the embeddings are the same numbers as the GPU gather gives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HostEmbeddingCollator",
    "HostEmbeddings",
    "embedding_refusal",
    "install_host_embeddings",
]

logger = logging.getLogger(__name__)


def _table(model: Any) -> Any:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def embedding_refusal(
    model: Any, *, before_lora: bool = False, targets: Sequence[str] = ()
) -> str | None:
    """Why ``model``'s input embedding cannot be kept in host memory, or ``None`` if it can: it
    must be exactly a ``torch.nn.Embedding`` with a frozen dense table (no ``max_norm``, which
    writes to the table), not shared with the output embedding, with no hooks, and the model
    must be able to swap it (``set_input_embeddings``).

    ``before_lora``: asked while planning, before PEFT freezes the base weights (the table may
    still require gradients then); ``targets``: the LoRA target module names, none of which may
    be the embedding's.
    """
    emb = _table(model)
    if type(emb) is not torch.nn.Embedding:
        return f"the input embedding is {type(emb).__name__}, not an nn.Embedding"
    if emb.weight.requires_grad and not before_lora:
        return "the input embedding is trained"
    if emb.max_norm is not None or emb.sparse:
        return "the input embedding renormalises its rows or has sparse gradients"
    if emb._forward_hooks or emb._forward_pre_hooks:
        return "the input embedding has hooks"
    name = next((n for n, m in model.named_modules() if m is emb), "")
    if targets and (name in targets or name.rsplit(".", 1)[-1] in targets):
        return "LoRA targets the input embedding"
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return "the input embedding is tied to the output embedding"
    if not callable(getattr(model, "set_input_embeddings", None)):
        return "the model cannot swap its input embedding"
    return None


def _gather(table: torch.Tensor, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """``F.embedding`` of ``ids`` (any device) in the table's memory."""
    return torch.nn.functional.embedding(ids.to(table.device), table, padding_idx)


class _OnHost(torch.nn.Module):
    """Stands in for the input embedding while its table is in host memory: gathers there and
    moves the rows to ``home`` (the model's device).

    Its ``weight`` is an empty frozen parameter of the table's dtype on ``home``: the model's
    parameters keep their names, and what transformers reads from the first of them (the
    model's ``device`` and ``dtype``, from which e.g. the training's autocast is chosen) stays
    what it was. Its state dict holds the table itself under ``weight`` (and loading one copies
    into the table), so whatever saves the model's state during the fit (a checkpoint that PEFT
    writes with the embedding layers, after the vocabulary was resized) saves the real table."""

    def __init__(self, original: torch.nn.Embedding, table: torch.Tensor, home: torch.device):
        super().__init__()
        empty = torch.empty(0, original.embedding_dim, dtype=table.dtype, device=home)
        self.weight = torch.nn.Parameter(empty, requires_grad=False)
        self.table = table  # a plain attribute: the pinned table, not a parameter
        self.home = home
        self.padding_idx = original.padding_idx
        self.embedding_dim = original.embedding_dim
        self.num_embeddings = original.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _gather(self.table, input_ids, self.padding_idx).to(self.home)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.table if keep_vars else self.table.detach()

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != tuple(self.table.shape):
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                f"input embedding table (in host memory) has shape {tuple(self.table.shape)}"
            )
            return
        with torch.no_grad():
            self.table.copy_(value)


@dataclass
class HostEmbeddings:
    """A model's input embedding table moved to pinned host memory (see the module's text);
    :meth:`restore` puts it back.

    Attributes:
        model: the model whose input embedding moved.
        original: its embedding module (given back by :meth:`restore`).
        home: the device the table came from.
        table: the table in host memory.
    """

    model: Any
    original: torch.nn.Embedding
    home: torch.device
    table: torch.Tensor

    @property
    def bytes(self) -> int:
        """Bytes of GPU memory the table no longer takes."""
        return self.table.numel() * self.table.element_size()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``input_ids`` (CPU ids), gathered in host memory."""
        return _gather(self.table, input_ids, self.original.padding_idx)

    def restore(self) -> None:
        """The model's own embedding module back, with its table on its device.

        If the device has no room for the table (after a fit that ran out of memory, whose
        tensors the error still holds), the stand-in stays, so the model keeps working with the
        table in host memory, and a warning says so; the fit's own error is not masked."""
        try:
            weight = self.table.to(self.home)
        except torch.OutOfMemoryError as exc:
            logger.warning(
                "input embeddings: the table stays in host memory (moving it back to %s ran out "
                "of memory: %s); the model still embeds through it",
                self.home,
                str(exc).split(".")[0],
            )
            return
        self.original.weight.data = weight
        self.model.set_input_embeddings(self.original)


def install_host_embeddings(model: Any) -> HostEmbeddings:
    """Move ``model``'s input embedding table to host memory (pinned where a GPU is there) and
    give the model a stand-in that gathers there; :meth:`HostEmbeddings.restore` undoes it.

    Raises:
        ValueError: [`embedding_refusal`][loraforge.fast.host_embeddings.embedding_refusal]
            says why the table cannot move.
    """
    why = embedding_refusal(model)
    if why is not None:
        raise ValueError(f"host embeddings: {why}")
    original = _table(model)
    home = original.weight.device
    table = original.weight.detach().to("cpu")
    if home.type == "cuda":
        table = table.pin_memory()
    original.weight.data = table  # the device copy is freed (the module is off the model)
    model.set_input_embeddings(_OnHost(original, table, home))
    return HostEmbeddings(model, original, home, table)


class HostEmbeddingCollator:
    """A collator's batches with ``inputs_embeds``: the rows of its ``input_ids`` gathered from
    the table in host memory (the ``input_ids`` stay in the batch for the guards; the Trainer
    leaves them out of the model's call)."""

    def __init__(self, collator: Any, host: HostEmbeddings) -> None:
        self.collator = collator
        self.host = host

    def __call__(self, batch: Any) -> dict[str, Any]:
        out = dict(self.collator(batch))
        out["inputs_embeds"] = self.host.embed(out["input_ids"])
        return out

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's settings (pad_to, ...)
        if name in ("collator", "host"):
            raise AttributeError(name)
        return getattr(self.collator, name)
