"""What a plan costs in memory: the estimate the planner fits plans under.

[`plan_fast_path`][loraforge.fast.plan.plan_fast_path] pairs each packed row size with the fewest
decoder layers it needs checkpointed (or, for graphed rows on a 4-bit base, the fewest MLPs
recomputing their ``gate_up`` output) to fit ``max_memory_gib``: the resident weights, a reserve,
and per token what each decoder layer keeps for its backward pass
([`loraforge.fast.activations`][loraforge.fast.activations]), the working set of one layer's
backward pass and the loss. Pure arithmetic: no torch. Its time counterpart is
[`loraforge.fast.costs`][loraforge.fast.costs].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.fast.activations import FLOAT32 as _F32
from loraforge.fast.activations import (
    dora_layer_bytes,
    dora_working_bytes,
    layer_activation_bytes,
)
from loraforge.fast.losses import CHUNK_BYTES as _CHUNK_BYTES

if TYPE_CHECKING:
    from loraforge.fast.shape import ModelShape
    from loraforge.recipe import LoraRecipe

__all__ = ["RESERVE_BYTES", "Memory", "estimate_memory", "resident"]

GiB = 2**30

_WORKING_SET = 20  # the backward pass of one layer, in hidden-sized activations per token
_BYTES_LOGIT = 14  # the loss per vocabulary entry of each position with logits (unchunked)
_CHUNKED_LOSS_BYTES = 3 * _CHUNK_BYTES  # one chunk's float32 logits, their bf16 copy, the grad
RESERVE_BYTES = int(1.5 * GiB)  # CUDA context, allocator slack, optimizer state of the adapter


def resident(shape: ModelShape) -> int:
    """The weights, and with a quantized base the dense copies dequantizing makes."""
    return shape.weight_bytes + shape.dequant_bytes


@dataclass(frozen=True, slots=True)
class Memory:
    """Bytes for a micro-batch of ``tokens`` with ``k`` of the ``layers`` decoder layers
    checkpointed (a checkpointed layer keeps its input; the layer being recomputed all of its
    activations) and ``m`` of the others' MLPs recomputing their ``gate_up`` output (each keeps
    ``mlp_kept`` bytes a token less), against ``free`` bytes under the budget."""

    free: float
    layers: int
    per_layer: float
    layer_input: float
    per_token: float  # outside the layers: norms lean_norms leaves alone, working set, loss
    fixed: float = 0.0
    layer_fixed: float = 0.0  # what a layer keeps whatever the tokens (DoRA's weight copies)
    mlp_kept: float = 0.0  # per token: the gate_up output a recomputing MLP does not keep

    def needed(self, tokens: int, k: int, m: int = 0) -> float:
        """Bytes for ``tokens`` with ``k`` layers checkpointed and ``m`` MLPs recomputed.

        Raises:
            ValueError: ``m`` MLPs recomputed beside layers checkpointed, or more than the
                layers there are (the planner asks for one or the other).
        """
        if m and (k or m > self.layers or not self.mlp_kept):
            raise ValueError(
                f"Memory.needed: m={m} MLPs recomputed needs k=0 layers checkpointed, at most "
                f"{self.layers} MLPs and MLPs that can recompute (got k={k})"
            )
        per_token = (
            (self.layers - k) * self.per_layer
            + k * self.layer_input
            + (self.per_layer if k else 0.0)
            + self.per_token
            - m * self.mlp_kept
        )
        kept = (self.layers - k + (1 if k else 0)) * self.layer_fixed
        return tokens * per_token + self.fixed + kept

    def fewest_checkpointed(self, tokens: int) -> int | None:
        """The fewest layers to checkpoint for ``tokens`` to fit, or None if none does."""
        for k in range(self.layers + 1):
            if self.needed(tokens, k) <= self.free:
                return k
        return None

    def fewest_recomputed_mlps(self, tokens: int) -> int | None:
        """The fewest MLPs recomputing their ``gate_up`` output for ``tokens`` to fit with no
        layer checkpointed, or None if none does (or the MLPs cannot recompute)."""
        for m in range(self.layers + 1 if self.mlp_kept else 1):
            if self.needed(tokens, 0, m) <= self.free:
                return m
        return None


def estimate_memory(
    recipe: LoraRecipe,
    shape: ModelShape,
    attention: str,
    packing: bool,
    supervised_fraction: float,
    chunkable_head: bool,
    cap: int,
) -> Memory:
    """What the activations, the loss and the working set of a micro-batch need, and what is
    free for them under ``cap`` once the weights (``resident``) and ``RESERVE_BYTES`` are
    counted."""
    h, e = shape.hidden_size, shape.activation_bytes
    # DoRA layers keep PEFT's forward (the allow-list refuses them): counted as such
    lean = recipe.fused_lora and not recipe.use_dora
    per_layer = layer_activation_bytes(
        shape,
        fused_lora=lean,
        lora_r=recipe.lora_r,
        lora_dropout=recipe.lora_dropout,
        attention=attention,
    )
    dora_per_token, dora_fixed = dora_layer_bytes(shape) if recipe.use_dora else (0.0, 0.0)
    per_layer += dora_per_token
    dora_working = dora_working_bytes(shape) if recipe.use_dora else 0.0  # its float32 products
    # norms lean_norms leaves alone keep their float32 input (PEFT's count has it already)
    plain_norms = max(0, 2 * shape.num_hidden_layers + 1 - shape.lean_norms)
    norms = plain_norms * h * _F32 if lean else 0
    chunked = packing and chunkable_head and recipe.chunked_loss
    # unpacked batches have logits at every position
    supervised = min(max(supervised_fraction, 0.0), 1.0) if packing else 1.0
    loss = 0.0 if chunked else supervised * shape.vocab_size * _BYTES_LOGIT
    return Memory(
        free=cap - resident(shape) - RESERVE_BYTES,
        layers=shape.num_hidden_layers,
        per_layer=per_layer,
        layer_input=h * e,
        per_token=norms + _WORKING_SET * h * e + loss + dora_working,
        fixed=_CHUNKED_LOSS_BYTES if chunked else 0.0,
        layer_fixed=dora_fixed,
        # the lean fused SwiGLU function can recompute its gate_up output (LoraSwiGLUFunction)
        mlp_kept=2 * shape.intermediate_size * e if lean and shape.fused_mlp else 0.0,
    )
