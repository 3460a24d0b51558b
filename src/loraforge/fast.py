"""The GPU fast path: variable-length attention, selective checkpointing, a token budget.

Each piece is chosen by measurement (see ``docs/benchmarks.md``) and can be turned off in the
recipe:

* ``attention``: ``"varlen"`` registers PyTorch's own flash-attention kernel for packed rows
  (``torch.nn.attention.varlen.varlen_attn``, told where each example starts through
  ``cu_seq_lens``) with transformers' ``AttentionInterface``; ``"sdpa"`` and ``"eager"`` use the
  block-diagonal mask transformers builds from restarting ``position_ids`` (the CPU path);
  ``"flex_attention"`` uses transformers' flex-attention block mask.
* ``gradient_checkpointing="selective"``: each decoder layer is checkpointed, but the outputs of
  its large matrix products and of attention are kept; only cheap element-wise work (norms, RoPE,
  SwiGLU, dropout, the rank-r LoRA up-projection) is recomputed in the backward pass.
* the packing budget (``pack_tokens``) is chosen from the memory left after the weights.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "VARLEN_ATTENTION",
    "FastPlan",
    "apply_liger",
    "choose_attention",
    "plan_fast_path",
    "register_varlen_attention",
    "selective_checkpoint_context",
    "varlen_attention_available",
]

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "loraforge_varlen"


def varlen_attention_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen`` and a CUDA device to run it on."""
    import torch

    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _causal_kwargs() -> dict[str, Any]:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:  # pragma: no cover - unknown API
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn: unknown causal argument")
    kw["_gqa"] = "enable_gqa" in params
    return kw


def _varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function over a packed row: (1, H, T, D) -> (1, T, H, D)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise RuntimeError(
            "loraforge varlen attention needs cu_seq_lens_q/max_length_q (packed batches); "
            "use attention='sdpa' for unpacked input"
        )
    if query.shape[0] != 1:
        raise RuntimeError("loraforge varlen attention expects one packed row per micro-batch")
    kw = dict(_CAUSAL)
    gqa = kw.pop("_gqa")
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    if k.shape[1] != q.shape[1]:
        if gqa:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out: Any = varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, **kw)
    return out.unsqueeze(0), None


_CAUSAL: dict[str, Any] = {}


def register_varlen_attention() -> str:
    """Register the varlen attention function with transformers; returns its name."""
    from transformers import AttentionInterface

    if not _CAUSAL:
        _CAUSAL.update(_causal_kwargs())
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    return VARLEN_ATTENTION


def choose_attention(requested: str, packing: bool) -> str:
    """Resolve the recipe's ``attention`` setting to a transformers implementation name."""
    if requested == "auto":
        if packing and varlen_attention_available():
            return register_varlen_attention()
        return "sdpa"
    if requested == "varlen":
        if not varlen_attention_available():
            from .errors import RecipeError

            raise RecipeError(
                [
                    "attention: 'varlen' needs a CUDA GPU and torch >= 2.9 "
                    "(torch.nn.attention.varlen); use 'sdpa'"
                ]
            )
        if not packing:
            from .errors import RecipeError

            raise RecipeError(["attention: 'varlen' works on packed batches; set packing: on"])
        return register_varlen_attention()
    return requested


def set_attention(model: Any, name: str) -> None:
    """Switch a loaded model's attention implementation."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
            return
        except Exception as exc:  # older transformers: fall back to the config
            logger.debug("set_attn_implementation(%s) failed (%s); setting the config", name, exc)
    model.config._attn_implementation = name


def selective_checkpoint_context() -> Any:
    """A ``context_fn`` for ``torch.utils.checkpoint``: keep the outputs of large matrix products
    and attention, recompute everything else (element-wise ops, rank-r LoRA products)."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    mms = {aten.mm.default, aten.bmm.default}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if func in mms:
            inner = args[0].shape[-1]
            return CheckpointPolicy.MUST_SAVE if inner >= 256 else CheckpointPolicy.PREFER_RECOMPUTE
        if func is aten.addmm.default:
            inner = args[1].shape[-1]
            return CheckpointPolicy.MUST_SAVE if inner >= 256 else CheckpointPolicy.PREFER_RECOMPUTE
        name = str(func)
        if "attn" in name or "attention" in name:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_selective_checkpointing(model: Any) -> None:
    """Selective activation checkpointing on every decoder layer (non-reentrant)."""
    from .models import enable_checkpointing

    enable_checkpointing(model, context_fn=selective_checkpoint_context)


# --------------------------------------------------------------------------- the plan

# Activation bytes per token and decoder layer, in units of hidden_size, measured on an H100 with
# Phi-4's shape (bf16, PEFT LoRA r=8 with dropout, varlen attention; docs/benchmarks.md):
# no checkpointing ~72 x hidden; full checkpointing keeps each layer's input (2 x hidden) plus
# one layer's working set while it is recomputed.
_BYTES_NO_CKPT = 72
_BYTES_LAYER_INPUT = 2
_RESERVE_GIB = 1.5
_BUDGETS = (8192, 4096, 2048)


@dataclass(frozen=True, slots=True)
class FastPlan:
    """What the fast path chose for a run (logged, and saved in ``loraforge.json``)."""

    packing: bool
    pack_tokens: int | None
    attention: str
    gradient_checkpointing: str
    liger_kernels: bool
    reason: str

    def describe(self) -> str:
        pack = f"packing {self.pack_tokens} tokens/row" if self.packing else "no packing"
        return (
            f"{pack}; attention {self.attention}; checkpointing "
            f"{self.gradient_checkpointing}; liger {'on' if self.liger_kernels else 'off'}"
            f" ({self.reason})"
        )


def liger_available() -> bool:
    """Whether Liger-Kernel can be used here (installed, and a CUDA device)."""
    import importlib.util

    import torch

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def plan_fast_path(recipe: Any, model: Any, max_example_tokens: int) -> FastPlan:
    """Resolve the recipe's ``auto`` settings for this model and machine."""
    import torch

    from .errors import RecipeError

    on_gpu = torch.cuda.is_available()
    packing = recipe.packing == "on" or (recipe.packing == "auto" and on_gpu)
    liger = recipe.liger_kernels == "on" or (recipe.liger_kernels == "auto" and liger_available())
    if recipe.liger_kernels == "on" and not liger_available():
        raise RecipeError(
            [
                "liger_kernels: 'on' needs the liger-kernel package and a CUDA GPU "
                "(pip install 'loraforge[gpu]'), or use 'auto'/'off'"
            ]
        )
    ckpt = recipe.gradient_checkpointing
    budget = recipe.pack_tokens
    reason = "as set in the recipe"
    if on_gpu and (ckpt == "auto" or (packing and budget is None)):
        hidden = model.config.hidden_size
        layers = model.config.num_hidden_layers
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        card = torch.cuda.get_device_properties(0).total_memory
        cap = card if recipe.max_memory_gib is None else min(card, recipe.max_memory_gib * 2**30)
        free = cap - weights - _RESERVE_GIB * 2**30
        per_tok_none = _BYTES_NO_CKPT * hidden * layers
        per_tok_full = _BYTES_LAYER_INPUT * hidden * layers + _BYTES_NO_CKPT * hidden
        if not packing:  # the micro-batch is batch_size padded sequences
            candidates = [recipe.batch_size * max(recipe.max_length, max_example_tokens)]
        elif budget:
            candidates = [max(budget, max_example_tokens)]
        else:
            candidates = [b for b in _BUDGETS if b >= max_example_tokens] or [max_example_tokens]
        smallest_fast = 2048 if packing and not recipe.pack_tokens else 1
        chosen = None
        if ckpt in ("auto", "off"):
            fit = [b for b in candidates if b >= smallest_fast and b * per_tok_none <= free]
            if fit:
                chosen = (max(fit), "off")
        if chosen is None and ckpt in ("auto", "full", "selective"):
            fit = [b for b in candidates if b * per_tok_full <= free]
            mode = "full" if ckpt == "auto" else ckpt
            chosen = (max(fit) if fit else min(candidates), mode)
        if chosen is None:
            chosen = (min(candidates), ckpt)
        budget, ckpt = chosen
        reason = (
            f"{free / 2**30:.1f} GiB for activations under a {cap / 2**30:.0f} GiB cap, "
            f"weights {weights / 2**30:.1f} GiB"
        )
    if ckpt == "auto":
        ckpt = "off"  # CPU: recomputation only costs time
    if packing and budget is None:
        budget = max(4096, max_example_tokens)
    attention = choose_attention(recipe.attention, packing)
    return FastPlan(packing, budget if packing else None, attention, ckpt, liger, reason)


def apply_liger(model: Any) -> None:
    """Patch a loaded model instance with Liger-Kernel's fused RMSNorm, SwiGLU and RoPE (the loss
    stays loraforge's, which computes logits only at supervised positions)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    params = inspect.signature(_apply_liger_kernel_to_instance).parameters
    kwargs = {k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in params}
    _apply_liger_kernel_to_instance(model=model, **kwargs)


# --------------------------------------------------------------------------- LoRA forward


def _lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's vanilla LoRA forward, computed with fewer passes over the activations.

    ``base(x) + B(A(dropout(x))) * s`` becomes ``addmm(base(x), A(dropout(x)) * s, B^T)``: the
    scale is applied to the rank-r product instead of the full output, the add is fused into the
    up-projection, and the input keeps its dtype (PEFT casts bf16 activations to the fp32 adapter
    dtype first; under autocast the matmuls run in bf16 either way). Any case outside vanilla
    single-adapter LoRA goes to PEFT's own forward.
    """
    import torch

    active = self.active_adapters
    if (
        self.disable_adapters
        or self.merged
        or len(active) != 1
        or kwargs
        or args
        or active[0] not in self.lora_A
        or active[0] in getattr(self, "lora_variant", {})
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and x.dtype != lora_a.dtype:  # PEFT would cast x: let it
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    z = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        z, lora_b = z.to(dtype), lora_b.to(dtype)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        z.reshape(-1, z.shape[-1]).to(result.dtype),
        lora_b.t().to(result.dtype),
    )
    return out.view(result.shape)


def fuse_lora_forward(model: Any) -> int:
    """Give every PEFT ``lora.Linear`` of ``model`` the leaner forward; returns how many."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lora_forward, module)  # type: ignore[method-assign]
            n += 1
    return n
