"""What the planner reads: a model's shape and the device it trains on.

* [`ModelShape`][loraforge.fast.shape.ModelShape]: the sizes the planner's arithmetic needs, read
  off a loaded model ([`ModelShape.from_model`][loraforge.fast.shape.ModelShape.from_model]) or off
  its config alone, before any weights are loaded
  ([`ModelShape.from_config`][loraforge.fast.shape.ModelShape.from_config]);
* [`DeviceInfo`][loraforge.fast.shape.DeviceInfo], or ``None`` for the CPU.
  [`DeviceInfo.probe`][loraforge.fast.shape.DeviceInfo.probe] is the one place of planning that
  asks CUDA.

Plain values: [`plan_fast_path`][loraforge.fast.plan.plan_fast_path] is a pure function of them and
the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loraforge.errors import ModelError

__all__ = ["DeviceInfo", "ModelShape"]

# Model types whose decoder layer has one fused qkv_proj and one gate_up_proj (Phi-3 and Phi-4);
# other types are planned with separate q/k/v and gate/up projections (the Llama layout).
_FUSED_PROJECTIONS = frozenset({"phi3"})
# Model types whose decoder norms are Llama-style RMSNorms that ``lean_norms`` takes.
_LEAN_NORM_TYPES = frozenset({"phi3", "llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the planner needs to know about a decoder-only model.

    Attributes:
        hidden_size: the residual stream's width.
        num_hidden_layers: decoder layers.
        vocab_size: output vocabulary.
        intermediate_size: the MLP's width.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (fewer with grouped-query attention).
        head_dim: width of one head.
        weight_bytes: bytes of all parameters as they sit on the device.
        activation_bytes: bytes of one activation element (2 for bfloat16/float16, 4 for float32).
        lean_norms: decoder norms (two a layer and the final one) that
            [`lean_norms`][loraforge.fast.lora_ops.lean_norms] takes; the others keep their input.
        fused_qkv: one ``qkv_proj`` per layer instead of ``q_proj``/``k_proj``/``v_proj``.
        fused_mlp: one ``gate_up_proj`` and a SiLU activation, which the lean LoRA functions run
            as a single function keeping 2 x ``intermediate_size`` per token instead of 4 x.
        dequant_bytes: with a quantized base (QLoRA), the memory of dequantizing weights while
            training: two dense copies of the largest quantized weight (one layer's forward and
            the next's, or a backward pass's); 0 otherwise.
        input_embedding_bytes: bytes of the input embedding table, which may be kept in host
            memory ([`loraforge.fast.host_embeddings`][loraforge.fast.host_embeddings]); 0 when it
            is tied to the output embedding.
    """

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    weight_bytes: int
    activation_bytes: int = 2
    lean_norms: int = 0
    fused_qkv: bool = False
    fused_mlp: bool = False
    dequant_bytes: int = 0
    input_embedding_bytes: int = 0

    @classmethod
    def from_config(
        cls, config: Any, dtype: Any = "bfloat16", quantization: str = "none"
    ) -> ModelShape:
        """The shape of a transformers decoder config, before any weights are loaded.

        The weights are counted from the sizes (embeddings, attention and MLP projections, norms,
        an untied ``lm_head``; biases, a few millionths of the total, are left out) in ``dtype``.
        Phi-3/Phi-4 (``model_type: phi3``) have fused projections; Llama, Mistral, Qwen2 and
        Qwen3 norms are taken by ``lean_norms``; other types are planned with separate
        projections and no lean norms (more memory, never less).

        With ``quantization: nf4`` the decoder layers' linear weights count half a byte each plus
        their scales (double quantization: about 0.516 bytes a weight), with ``int8`` one byte plus
        a float32 scale per row; embeddings, norms and ``lm_head`` stay in ``dtype``.

        Args:
            config: a ``transformers.PretrainedConfig`` (or anything with its attributes).
            dtype: the weights' dtype: a ``torch.dtype`` or its name (``"bfloat16"``).
            quantization: ``"none"``, ``"nf4"`` or ``"int8"`` (the recipe's setting).

        Raises:
            ModelError: the config lacks a size the planner needs.
        """
        get_text = getattr(config, "get_text_config", None)
        cfg = get_text() if callable(get_text) else config

        def need(name: str) -> int:
            value = getattr(cfg, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                kind = getattr(cfg, "model_type", type(cfg).__name__)
                raise ModelError(
                    f"model config ({kind}) has no usable {name} (got {value!r}): the fast-path "
                    "planner needs the sizes of a decoder-only transformer"
                )
            return value

        h, layers, vocab = need("hidden_size"), need("num_hidden_layers"), need("vocab_size")
        inter, heads = need("intermediate_size"), need("num_attention_heads")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        q, k = heads * head_dim, kv * head_dim
        linear = h * (2 * q + 2 * k) + 3 * h * inter
        per_layer = linear + 2 * h
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        embeddings = vocab * h * (1 if tied else 2)
        params = embeddings + layers * per_layer + h
        size = _dtype_bytes(dtype)
        weight_bytes, dequant = params * size, 0
        if quantization in ("nf4", "int8"):
            from loraforge.fast.quant import nf4_bytes_per_weight

            rows = q + 2 * k + q + h + 2 * inter  # qkv, o, gate_up, down output rows
            quantized = (
                linear * nf4_bytes_per_weight() if quantization == "nf4" else linear + 4 * rows
            )
            weight_bytes = int((params - layers * linear) * size + layers * quantized)
            dequant = 2 * 2 * h * inter * size if quantization == "nf4" else 0
        model_type = getattr(cfg, "model_type", "")
        fused = model_type in _FUSED_PROJECTIONS
        return cls(
            hidden_size=h,
            num_hidden_layers=layers,
            vocab_size=vocab,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            weight_bytes=weight_bytes,
            activation_bytes=size,
            lean_norms=2 * layers + 1 if model_type in _LEAN_NORM_TYPES else 0,
            fused_qkv=fused,
            fused_mlp=fused and getattr(cfg, "hidden_act", None) in ("silu", "swish"),
            dequant_bytes=dequant,
            input_embedding_bytes=0 if tied else vocab * h * size,
        )

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """The shape of a loaded model (a transformers model, or a PEFT model around one): sizes
        from its config, the bytes of its parameters, its dtype, the projections it has and the
        norms ``loraforge.fast.lora_ops.lean_norm_candidates`` finds in the model's dtype."""
        from loraforge.fast.lora_ops import lean_norm_candidates

        dtype = getattr(model, "dtype", None)
        if dtype is None:
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        base = cls.from_config(model.config, dtype)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        fused_mlp = "gate_up_proj" in names
        act = getattr(model.config, "hidden_act", None)
        from loraforge.fast.quant import quantized_weight_bytes

        weight_bytes, largest_dense = quantized_weight_bytes(model)  # scales of 4-bit weights too
        return replace(  # the sizes of the config; what the loaded model holds
            base,
            weight_bytes=weight_bytes,
            lean_norms=sum(1 for m in lean_norm_candidates(model) if m.weight.dtype == dtype),
            fused_qkv="qkv_proj" in names,
            fused_mlp=fused_mlp and act in ("silu", "swish"),
            dequant_bytes=2 * largest_dense,
        )


def _dtype_bytes(dtype: Any) -> int:
    itemsize = getattr(dtype, "itemsize", None)  # a torch.dtype
    if isinstance(itemsize, int):
        return itemsize
    sizes = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
    name = str(dtype).removeprefix("torch.")
    if name not in sizes:
        raise ModelError(f"dtype {dtype!r}: expected one of {', '.join(sizes)} or a torch.dtype")
    return sizes[name]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The accelerator a run trains on (``None`` in its place means the CPU).

    Attributes:
        name: the device's name, for messages (``"NVIDIA H200"``).
        memory_bytes: its total memory.
        varlen_attention: this torch has ``torch.nn.attention.varlen`` to run on it.
        liger: Liger-Kernel is installed.
    """

    name: str
    memory_bytes: int
    varlen_attention: bool = False
    liger: bool = False

    @classmethod
    def probe(cls, device_index: int = 0) -> DeviceInfo | None:
        """Ask torch about CUDA device ``device_index``; ``None`` without a CUDA device. The only
        part of planning that queries the machine."""
        import torch

        from loraforge.fast.attention import varlen_attention_available
        from loraforge.fast.liger import liger_available

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device_index)
        return cls(
            name=str(props.name),
            memory_bytes=int(props.total_memory),
            varlen_attention=varlen_attention_available(),
            liger=liger_available(),
        )
