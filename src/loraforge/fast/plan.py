"""The GPU fast path: variable-length attention, a token budget, checkpointing by memory.

Each piece is chosen by measurement (see ``docs/benchmarks.md``) and can be turned off in the
recipe:

* ``attention``: ``"varlen"`` registers PyTorch's own flash-attention kernel for packed rows
  (``torch.nn.attention.varlen.varlen_attn``, told where each example starts through
  ``cu_seq_lens``) with transformers' ``AttentionInterface``; ``"sdpa"`` and ``"eager"`` use the
  block-diagonal mask transformers builds from restarting ``position_ids`` (the CPU path);
  ``"flex_attention"`` uses transformers' flex-attention block mask.
* the plan (:func:`plan_fast_path`): the packed row size (``pack_tokens``) and how many decoder
  layers to checkpoint, from the memory left after the weights under ``max_memory_gib`` — no
  checkpointing if a row of 2,048 tokens or more fits, else as few checkpointed layers as fit.
* ``gradient_checkpointing="selective"``: each decoder layer is checkpointed, but the outputs of
  its large matrix products and of attention are kept; only cheap element-wise work is
  recomputed (measured slower than whole layers here; never chosen by ``auto``).

The memory-lean LoRA functions are in :mod:`loraforge.lora_ops`, the chunked loss in
:mod:`loraforge.packing`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

from loraforge.fast.losses import CHUNK_BYTES as _CHUNK_BYTES

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
    kw["_native_gqa"] = not kw["_gqa"] and _grouped_heads_work(varlen_attn, kw)
    return kw


def _grouped_heads_work(varlen_attn: Any, causal: dict[str, Any]) -> bool:
    """Whether this ``varlen_attn`` takes fewer key/value heads than query heads as they are
    (flash attention's grouped-query attention): tried once on a tiny input against repeated
    heads, forward and backward. If not, the key/value heads are repeated."""
    import torch

    kw = {k: v for k, v in causal.items() if not k.startswith("_")}
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(12, h, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (4, 2, 2)
        )
        cu = torch.tensor([0, 5, 12], device="cuda", dtype=torch.int32)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, q, k, v)]
        grouped = varlen_attn(*leaves[:3], cu, cu, 7, 7, **kw)
        rep = [leaves[3], *(t.repeat_interleave(2, dim=1) for t in leaves[4:])]
        repeated = varlen_attn(*rep, cu, cu, 7, 7, **kw)
        g = torch.randn(grouped.shape, device="cuda", dtype=grouped.dtype, generator=gen)
        grads = torch.autograd.grad([grouped, repeated], leaves, [g, g])
    except Exception:  # the kernel refuses grouped heads
        return False
    close = [
        torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
        for a, b in [(grouped, repeated), *zip(grads[:3], grads[3:], strict=True)]
    ]
    return all(close)


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
    gqa, native_gqa = kw.pop("_gqa"), kw.pop("_native_gqa")
    # squeeze, not [0]: the gradient of a view, not a zero-filled copy of the whole batch
    q = query.squeeze(0).transpose(0, 1).contiguous()
    k = key.squeeze(0).transpose(0, 1).contiguous()
    v = value.squeeze(0).transpose(0, 1).contiguous()
    if k.shape[1] != q.shape[1]:
        if gqa:
            kw["enable_gqa"] = True
        elif not native_gqa:
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
            from loraforge.errors import RecipeError

            raise RecipeError(
                [
                    "attention: 'varlen' needs a CUDA GPU and torch >= 2.9 "
                    "(torch.nn.attention.varlen); use 'sdpa'"
                ]
            )
        if not packing:
            from loraforge.errors import RecipeError

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
    from loraforge.models import enable_checkpointing

    enable_checkpointing(model, context_fn=selective_checkpoint_context)


# --------------------------------------------------------------------------- the plan

# Activation bytes per token and decoder layer, in units of hidden_size (bf16, LoRA r=8 on every
# linear layer, varlen attention). PEFT's LoRA forward keeps ~72 x hidden (measured on an H100 with
# Phi-4's shape); the lean functions of ``lora_ops`` keep the qkv input (2, which is also the first
# norm's output, kept by the lean norm instead of its input), attention's q/k/v/output (5), the MLP
# input (2, the second norm's output), its gate_up output (14) and the dropout masks as bits (~0.8
# for Phi-4's shapes): ~24, counted as 25. A checkpointed layer keeps its input (2). The backward
# pass of one layer needs a working set (~40 x hidden), and the loss ~14 bytes per vocabulary entry
# of each supervised position, unless it is computed in chunks (``chunked_loss``).
_BYTES_PEFT = 72
_BYTES_LEAN = 25
_BYTES_LAYER_INPUT = 2
_BYTES_WORKING_SET = 40
_BYTES_LOGIT = 14
_CHUNKED_LOSS_BYTES = 3 * _CHUNK_BYTES  # one chunk's float32 logits, their bf16 copy, the grad
_RESERVE_GIB = 1.5
_BUDGETS = (8192, 6144, 4096, 3072, 2048)
_SMALLEST_FAST_ROW = 2048


@dataclass(frozen=True, slots=True)
class FastPlan:
    """What the fast path chose for a run (logged, and saved in ``loraforge.json``).

    ``gradient_checkpointing`` is ``"off"``, ``"full"``, ``"selective"`` or ``"partial"``; with
    ``"partial"``, ``checkpoint_layers`` of the decoder layers are checkpointed and the rest keep
    their activations.
    """

    packing: bool
    pack_tokens: int | None
    attention: str
    gradient_checkpointing: str
    liger_kernels: bool
    reason: str
    checkpoint_layers: int = 0

    def describe(self) -> str:
        pack = f"packing {self.pack_tokens} tokens/row" if self.packing else "no packing"
        ckpt = self.gradient_checkpointing
        if ckpt == "partial":
            ckpt = f"{self.checkpoint_layers} layers"
        return (
            f"{pack}; attention {self.attention}; checkpointing "
            f"{ckpt}; liger {'on' if self.liger_kernels else 'off'}"
            f" ({self.reason})"
        )


def liger_available() -> bool:
    """Whether Liger-Kernel can be used here (installed, and a CUDA device)."""
    import importlib.util

    import torch

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


@dataclass(frozen=True, slots=True)
class _Memory:
    """The planner's activation model: bytes for a micro-batch of ``tokens`` with ``k`` of the
    ``layers`` decoder layers checkpointed."""

    free: float
    hidden: int
    layers: int
    vocab: int
    per_layer: float
    supervised: float
    chunked_loss: bool = False

    def needed(self, tokens: int, k: int) -> float:
        h = self.hidden
        loss = 0.0 if self.chunked_loss else self.supervised * self.vocab * _BYTES_LOGIT
        per_token = (
            (self.layers - k) * self.per_layer * h
            + k * _BYTES_LAYER_INPUT * h
            + (self.per_layer * h if k else 0)  # the layer being recomputed
            + _BYTES_WORKING_SET * h
            + loss
        )
        return tokens * per_token + (_CHUNKED_LOSS_BYTES if self.chunked_loss else 0)

    def fewest_checkpointed(self, tokens: int) -> int | None:
        """The fewest layers to checkpoint for ``tokens`` to fit, or None if none does."""
        for k in range(self.layers + 1):
            if self.needed(tokens, k) <= self.free:
                return k
        return None


def _lean_bytes(model: Any) -> float:
    """Activation bytes a decoder layer keeps with the lean functions, per token and hidden unit:
    ``_BYTES_LEAN``, plus the norm inputs (2 each) of the decoder norms ``lean_norms`` will not
    take (another norm class, a zero weight, a dtype other than the model's)."""
    from loraforge.fast.lora_ops import lean_norm_candidates

    layers = getattr(model.config, "num_hidden_layers", 0) or 1
    dtype = getattr(model, "dtype", None)
    taken = sum(1 for m in lean_norm_candidates(model) if dtype is None or m.weight.dtype == dtype)
    missing = max(0, 2 * layers + 1 - taken)  # two a decoder layer and the final norm
    return _BYTES_LEAN + 2 * missing / layers


def plan_fast_path(
    recipe: Any,
    model: Any,
    max_example_tokens: int,
    supervised_fraction: float = 1.0,
    chunkable_head: bool = True,
) -> FastPlan:
    """Resolve the recipe's ``auto`` settings for this model and machine.

    On a GPU the planner sizes activations (``_Memory``) under ``max_memory_gib`` and prefers, in
    order: no recomputation at the largest packed row that fits; the fewest checkpointed layers
    (rows of 2,048 tokens, the smallest that keeps the matrix products efficient); full
    checkpointing. ``supervised_fraction`` (of the training tokens) sizes the loss when packing
    computes logits only at supervised positions; ``chunkable_head`` says whether the loss can
    apply ``lm_head`` in chunks (``chunked_loss``) for this model.
    """
    import torch

    from loraforge.errors import RecipeError

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
    layers_ckpt = 0
    reason = "as set in the recipe"
    if on_gpu and (ckpt == "auto" or (packing and budget is None)):
        cfg = model.config
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        card = torch.cuda.get_device_properties(0).total_memory
        cap = card if recipe.max_memory_gib is None else min(card, recipe.max_memory_gib * 2**30)
        mem = _Memory(
            free=cap - weights - _RESERVE_GIB * 2**30,
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            vocab=getattr(cfg, "vocab_size", 0),
            per_layer=_lean_bytes(model) if recipe.fused_lora else _BYTES_PEFT,
            # unpacked batches have logits at every position
            supervised=min(max(supervised_fraction, 0.0), 1.0) if packing else 1.0,
            chunked_loss=packing and chunkable_head and recipe.chunked_loss,
        )
        if not packing:  # the micro-batch is batch_size padded sequences
            candidates = [recipe.batch_size * max(recipe.max_length, max_example_tokens)]
        elif budget:
            candidates = [max(budget, max_example_tokens)]
        else:
            candidates = [b for b in _BUDGETS if b >= max_example_tokens] or [max_example_tokens]
        fits = {t: mem.fewest_checkpointed(t) for t in candidates}
        fitting = [t for t in candidates if fits[t] is not None]
        if ckpt == "auto":
            no_ckpt = [t for t in fitting if fits[t] == 0]
            if no_ckpt and (max(no_ckpt) >= _SMALLEST_FAST_ROW or not packing or budget):
                budget, layers_ckpt = max(no_ckpt), 0
            elif fitting:
                budget = min(fitting, key=lambda t: (fits[t], -t))
                layers_ckpt = fits[budget] or 0
            else:
                budget, layers_ckpt = min(candidates), mem.layers
        else:  # "off", "full" or "selective" were asked for: size the row for that
            k = 0 if ckpt == "off" else mem.layers
            ok = [t for t in candidates if mem.needed(t, k) <= mem.free]
            budget = max(ok) if ok else min(candidates)
            layers_ckpt = k
        if ckpt == "auto":
            ckpt = "off" if layers_ckpt == 0 else "full" if layers_ckpt >= mem.layers else "partial"
        reason = (
            f"{mem.free / 2**30:.1f} GiB for activations under a {cap / 2**30:.0f} GiB cap, "
            f"weights {weights / 2**30:.1f} GiB"
        )
    if ckpt == "auto":
        ckpt = "off"  # CPU: recomputation only costs time
    if packing and budget is None:
        budget = max(4096, max_example_tokens)
    attention = choose_attention(recipe.attention, packing)
    return FastPlan(
        packing, budget if packing else None, attention, ckpt, liger, reason, layers_ckpt
    )


def apply_liger(model: Any) -> None:
    """Patch a loaded model instance with Liger-Kernel's fused RMSNorm, SwiGLU and RoPE (the loss
    stays loraforge's, which computes logits only at supervised positions). With ``fused_lora``
    the lean LoRA functions and norms of :mod:`loraforge.lora_ops` then take over the MLPs and norms
    they apply to."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    params = inspect.signature(_apply_liger_kernel_to_instance).parameters
    kwargs = {k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in params}
    _apply_liger_kernel_to_instance(model=model, **kwargs)
