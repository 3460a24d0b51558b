"""What a decoder layer keeps for its backward pass, counted from the model's shape.

The planner ([`plan_fast_path`][loraforge.fast.plan.plan_fast_path]) budgets activations with
[`layer_activation_bytes`][loraforge.fast.activations.layer_activation_bytes] (the lean
functions' or PEFT's forward) and, for DoRA,
[`dora_layer_bytes`][loraforge.fast.activations.dora_layer_bytes]. Pure arithmetic on a
[`ModelShape`][loraforge.fast.shape.ModelShape]: no torch. ``tests/test_plan.py`` measures the
counts against the tensors autograd really keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraforge.fast.shape import ModelShape

__all__ = ["FLOAT32", "dora_layer_bytes", "dora_working_bytes", "layer_activation_bytes"]

# Bytes a decoder layer keeps for the backward pass, per token (measured against the tensors
# autograd keeps: tests/test_plan.py on the CPU; an H200 with Phi-4's and Qwen2.5-7B's shapes gave
# 23.86 / 52.33 x hidden (lean) and 53.55 / 78.21 x hidden (PEFT), as counted here).
FLOAT32 = 4  # a norm's 1/rms and attention's log-sum-exp (per token, per head); float32 norm input
_PEFT_MASK = 1  # PEFT's dropout mask on CUDA: one bool per element
# PEFT's DoRA forward keeps, per layer it has run and until that layer's backward, copies of the
# adapted base weights in the compute dtype (autocast's cast for F.linear, the weight-norm's
# operands): measured on the CPU under bf16 autocast (saved-tensor bytes, tests/test_plan.py) at
# 1.7-2.6x the layer's weights; on an H200 a Phi-4 DoRA run with 18 layers not checkpointed
# peaked 30.6 GiB over its weights (about 2x with the per-token count below). Counted as:
_DORA_WEIGHT_COPIES = 2.75


def _adapted_inputs(shape: ModelShape) -> tuple[int, ...]:
    """``in_features`` of one decoder layer's linear layers (LoRA on every one, 'all-linear')."""
    h, q = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    qkv = (h,) if shape.fused_qkv else (h, h, h)
    gate_up = (h,) if shape.fused_mlp else (h, h)
    return (*qkv, q, *gate_up, shape.intermediate_size)


def _adapted_outputs(shape: ModelShape) -> tuple[int, ...]:
    """``out_features`` of one decoder layer's linear layers, in :func:`_adapted_inputs`' order."""
    h, q = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    qkv = (q + 2 * kv,) if shape.fused_qkv else (q, kv, kv)
    inter = shape.intermediate_size
    gate_up = (2 * inter,) if shape.fused_mlp else (inter, inter)
    return (*qkv, h, *gate_up, h)


def dora_layer_bytes(shape: ModelShape) -> tuple[float, float]:
    """What PEFT's DoRA forward keeps beyond plain LoRA's (PEFT's forward), for one decoder
    layer with DoRA on every linear layer: bytes per token (the base output and the LoRA output
    of each adapted layer, which the magnitude's gradient needs) and bytes whatever the tokens
    (copies of the layer's base weights in the compute dtype, ``_DORA_WEIGHT_COPIES`` of
    them)."""
    e = shape.activation_bytes
    ins, outs = _adapted_inputs(shape), _adapted_outputs(shape)
    weights = sum(i * o for i, o in zip(ins, outs, strict=True)) * e
    return 2 * sum(outs) * e, _DORA_WEIGHT_COPIES * weights


def dora_working_bytes(shape: ModelShape) -> float:
    """What PEFT's DoRA adds, per token, to the backward pass of the layer being run: its
    magnitude scale is float32, so the DoRA terms ``(scale - 1) * base`` and ``scale * lora`` are
    float32 products of the layer's output, and so are their gradients; counted as two float32
    copies of the largest adapted output (``gate_up_proj``'s on Phi-4). On an H200, Phi-4 DoRA on
    8,192-token rows with every layer recomputed peaked 1.55 GiB above the count without this
    term (2.2 GiB with it)."""
    return 2 * FLOAT32 * max(_adapted_outputs(shape))


def _attention_bytes(shape: ModelShape, attention: str, o_proj_keeps_input: bool) -> float:
    """q, k, v, the output and the log-sum-exp. With transformers' SDPA on Phi-3's fused qkv,
    v is a view of the whole qkv output (all of which stays), and the output comes back laid out
    (heads, tokens), so an ``o_proj`` that keeps its input keeps a copy (measured)."""
    e = shape.activation_bytes
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    kept = (2 * q + 2 * kv) * e + shape.num_attention_heads * FLOAT32
    if attention != "varlen" and shape.fused_qkv:
        kept += (q + kv) * e + (q * e if o_proj_keeps_input else 0)
    return kept


def layer_activation_bytes(
    shape: ModelShape,
    *,
    fused_lora: bool = True,
    lora_r: int = 8,
    lora_dropout: float = 0.1,
    attention: str = "varlen",
) -> float:
    """Bytes one decoder layer keeps for its backward pass, per token, on a CUDA GPU, with LoRA
    on every linear layer.

    With the lean functions (``fused_lora``, norms taken by ``lean_norms``): each norm's output
    and ``1/rms``; attention's q, k, v, output and log-sum-exp; per adapted layer the rank-r
    product and the dropout mask as bits; the MLP's ``gate_up`` output (fused SwiGLU) or its gate,
    up, activation and product (separate projections). With PEFT's forward: each norm's float32
    input; per adapted layer the dropped copy of its input, the mask (one byte an element) and the
    rank-r product; the MLP's gate and up outputs and the activation.

    On the CPU the lean functions keep a seed instead of the mask's bits, and PEFT's mask has the
    input's dtype; the count here is the GPU's.
    """
    e, h, inter = shape.activation_bytes, shape.hidden_size, shape.intermediate_size
    inputs = _adapted_inputs(shape)
    dropout = lora_dropout > 0
    attn = _attention_bytes(shape, attention, o_proj_keeps_input=fused_lora)
    if fused_lora:
        norms = 2 * (h * e + FLOAT32)
        adapters = sum(lora_r * e + (d / 8 if dropout else 0) for d in inputs)
        mlp = (2 if shape.fused_mlp else 4) * inter * e
    else:
        norms = 2 * (h * FLOAT32 + FLOAT32)
        adapters = sum(d * e + (d * _PEFT_MASK if dropout else 0) + lora_r * e for d in inputs)
        mlp = 3 * inter * e
    return norms + attn + adapters + mlp
