"""Variable-length flash attention for packed rows, and switching a model's attention.

``varlen`` is PyTorch's own flash-attention kernel for packed rows
(``torch.nn.attention.varlen.varlen_attn``), told where each example starts through
``cu_seq_lens``. It is added to transformers under the name :data:`VARLEN_ATTENTION` through
``AttentionInterface.register``, transformers' documented way to add an attention function (a new
name; no existing one is replaced).

The planner ([`plan_fast_path`][loraforge.fast.plan.plan_fast_path]) only *names* the attention
(``"varlen"``, ``"sdpa"``, ...); :func:`attention_implementation` turns that name into the one a
model is switched to with :func:`set_attention`, registering the varlen function on first use.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

__all__ = [
    "VARLEN_ATTENTION",
    "attention_implementation",
    "register_varlen_attention",
    "set_attention",
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


@functools.cache
def _causal_kwargs() -> dict[str, Any]:
    """How this torch's ``varlen_attn`` is asked for causal attention, and whether it takes
    grouped key/value heads: ``{"is_causal": True}`` or ``{"window_size": (-1, 0)}``, plus the
    private flags ``_gqa`` (an ``enable_gqa`` argument) and ``_native_gqa`` (fewer key/value heads
    accepted as they are). Probed once per process, on the GPU."""
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
    """transformers attention function over a packed row: (1, H, T, D) -> (1, T, H, D).

    Keeps, for the backward pass, contiguous copies of q, k and v, the output (which ``o_proj``
    then reads as its input, without a copy) and the log-sum-exp: what the planner counts."""
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
    kw = dict(_causal_kwargs())
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


def register_varlen_attention() -> str:
    """Add the varlen attention function to transformers' ``AttentionInterface`` under
    :data:`VARLEN_ATTENTION` and return that name.

    Idempotent: a second call finds the function registered and changes nothing. The first call
    probes, on the GPU, how this torch's kernel is called (cached for the process).

    Raises:
        RuntimeError: another function is registered under :data:`VARLEN_ATTENTION` (it is not
            replaced).
    """
    from transformers import AttentionInterface

    _causal_kwargs()
    registered = AttentionInterface().get(VARLEN_ATTENTION)
    if registered is None:
        AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    elif registered is not _varlen_attention:
        raise RuntimeError(
            f"transformers' AttentionInterface already has another function named "
            f"{VARLEN_ATTENTION!r}; loraforge does not replace it"
        )
    return VARLEN_ATTENTION


def attention_implementation(attention: str) -> str:
    """The transformers attention implementation for a plan's ``attention``
    ([`FastPlan.attention`][loraforge.fast.plan.FastPlan]): ``"varlen"`` registers loraforge's
    varlen function (see :func:`register_varlen_attention`) and returns its name; ``"sdpa"``,
    ``"eager"`` and ``"flex_attention"`` are transformers' own and returned as they are."""
    return register_varlen_attention() if attention == "varlen" else attention


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
