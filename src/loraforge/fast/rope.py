"""A fused rotary embedding for Phi-3-family attention, on one model instance.

transformers' Phi-3 attention applies RoPE with ``modeling_phi3.apply_rotary_pos_emb``: slices,
``rotate_half``, products and concatenations, about a dozen kernels for ``q`` and ``k`` in each
direction of each layer. Liger-Kernel has one fused kernel for it, but reaches Phi-3 only by
replacing that module function for the whole process. Here the same kernel is used without that:
:func:`install_fused_rope` gives each ``Phi3Attention`` *instance* of the model a forward that
does what the class's forward does on the training path (no cache) with the fused rotary
embedding, and hands every other call (a cache, positional extras) to the class's forward.
It also splits the fused ``qkv_proj`` output with one ``split`` instead of three slices, so the
backward pass assembles the three gradients with one concatenation instead of zero-filling three
full-size gradients and adding them (same values).

Before any is installed, one layer is run both ways on a small random batch, as the training
path calls it (the model's own rotary embedding, its attention implementation and keyword
arguments): output and input gradient must agree within the dtype's tolerance, else nothing is
installed and a warning says why. That check is what keeps a transformers release that changes
the attention's forward from silently training a different function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from loraforge.fast.kernels import current_device_of, on_device_of

__all__ = ["install_fused_rope", "remove_fused_rope"]

logger = logging.getLogger(__name__)

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "cache_position")
_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _attention_classes() -> tuple[type, ...]:
    """The attention classes whose forward :class:`_FusedRopeAttention` reproduces."""
    from transformers.models.phi3 import modeling_phi3

    return (modeling_phi3.Phi3Attention,)


def _liger_rope() -> Callable[..., Any] | None:
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    return liger_rotary_pos_emb


class _FusedRopeAttention:
    """``forward`` of one attention instance: the class's forward, with ``rope``."""

    def __init__(self, module: Any, rope: Callable[..., Any]) -> None:
        self.module, self.rope = module, rope

    def __call__(
        self, hidden_states: Any, position_embeddings: Any, attention_mask: Any = None, *args: Any,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        m = self.module
        if args or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
            return type(m).forward(
                m, hidden_states, position_embeddings, attention_mask, *args, **kwargs
            )
        for k in _CACHE_KWARGS:
            kwargs.pop(k, None)
        with current_device_of(hidden_states):  # Liger's Triton kernel: the current device
            return self._attend(hidden_states, position_embeddings, attention_mask, kwargs)

    def _attend(
        self, hidden_states: Any, position_embeddings: Any, attention_mask: Any,
        kwargs: dict[str, Any],
    ) -> Any:  # fmt: skip
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.phi3 import modeling_phi3

        m = self.module
        shape = (*hidden_states.shape[:-1], -1, m.head_dim)
        qkv = m.qkv_proj(hidden_states)
        nq = m.config.num_attention_heads * m.head_dim
        nkv = m.num_key_value_heads * m.head_dim
        # one split instead of three slices: its backward pass writes the three gradients into
        # one tensor (a concatenation) where three slices' would zero-fill three full-size
        # tensors and add them; the values are the same
        q, k, v = (t.view(shape).transpose(1, 2) for t in qkv.split([nq, nkv, nkv], dim=-1))
        cos, sin = position_embeddings
        q, k = self.rope(q, k, cos, sin)
        name = m.config._attn_implementation
        attend: Callable[..., Any] = (
            modeling_phi3.eager_attention_forward
            if name == "eager"
            else ALL_ATTENTION_FUNCTIONS[name]
        )
        out, weights = attend(
            m,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not m.training else m.attention_dropout,
            scaling=m.scaling,
            sliding_window=getattr(m.config, "sliding_window", None),
            **kwargs,
        )
        out = out.reshape(*shape[:-2], -1).contiguous()
        return m.o_proj(out), weights


def _modules(model: Any) -> list[Any]:
    classes = _attention_classes()
    return [m for m in model.modules() if type(m) in classes]


def remove_fused_rope(model: Any) -> int:
    """Give every attention instance its class's forward back; returns how many changed."""
    n = 0
    for m in model.modules():
        if isinstance(vars(m).get("forward"), _FusedRopeAttention):
            del m.forward
            n += 1
    return n


def _check(
    model: Any,
    module: Any,
    rope: Callable[..., Any],
    extra: dict[str, Any],
    autocast_dtype: Any = None,
) -> str | None:
    """Run ``module`` with its class's forward and with the fused RoPE on one random batch
    (under ``autocast_dtype``'s autocast, if given); None if output and input gradient agree,
    else why not."""
    import contextlib

    import torch

    p = next(module.parameters())
    dtype = model.get_input_embeddings().weight.dtype  # not a 4-bit (uint8) projection weight's
    tokens = 16
    gen = torch.Generator(device=p.device).manual_seed(0)
    hidden = torch.randn(
        1, tokens, model.config.hidden_size, device=p.device, dtype=dtype, generator=gen
    )
    positions = torch.arange(tokens, device=p.device).unsqueeze(0)
    rotary = model.get_decoder().rotary_emb
    kwargs = {"position_ids": positions, **extra}
    results = []
    mixed = torch.autocast(p.device.type, dtype=autocast_dtype) if autocast_dtype else None
    was_training = module.training
    module.eval()  # attention dropout off: the two runs see the same function
    try:
        for forward in (type(module).forward.__get__(module), _FusedRopeAttention(module, rope)):
            x = hidden.clone().requires_grad_()
            with torch.no_grad():
                cos_sin = rotary(x, positions)
            with mixed or contextlib.nullcontext():
                out = forward(x, cos_sin, None, **dict(kwargs))[0]
            (grad,) = torch.autograd.grad(out.float().square().sum(), x)
            results.append((out.detach().float(), grad.float()))
    finally:
        module.train(was_training)
    tol = _TOLERANCE.get(str(p.dtype).removeprefix("torch."), 3e-2)
    (out_ref, grad_ref), (out_new, grad_new) = results
    for what, a, b in (("output", out_new, out_ref), ("grad", grad_new, grad_ref)):
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not err <= tol:
            return f"{what} differs from the class's forward by {err:.2e} (tolerance {tol:g})"
    return None


def install_fused_rope(
    model: Any, rope: Callable[..., Any] | None = None, *, autocast_dtype: Any = None
) -> tuple[int, str]:
    """Give each Phi-3 attention instance of ``model`` a forward with a fused rotary embedding
    (Liger-Kernel's by default), after checking it against the class's forward.

    Args:
        model: the model (PEFT-wrapped or not), on its training device and dtype, with its
            attention implementation set.
        rope: ``rope(q, k, cos, sin) -> (q, k)``; default Liger-Kernel's
            ``liger_rotary_pos_emb``.
        autocast_dtype: the mixed precision training runs under (``torch.bfloat16``, ...), or
            ``None``; the check runs under it, as the attention layers will.

    Returns:
        How many attention instances got it, and a line for the log saying why (or why not).
    """
    rope = rope or _liger_rope()
    if rope is None:
        return 0, "transformers' RoPE (liger-kernel is not installed)"
    modules = _modules(model)
    if not modules:
        return 0, "transformers' RoPE (no Phi-3 attention layer)"
    taken = [m for m in modules if "forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks]
    if taken:
        return 0, "transformers' RoPE (an attention layer already has a forward or hooks)"
    extra: dict[str, Any] = {}
    if model.config._attn_implementation not in ("eager", "sdpa"):  # e.g. varlen: one row
        import torch

        cu = torch.tensor([0, 16], dtype=torch.int32, device=next(model.parameters()).device)
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 16, "max_length_k": 16}
    try:
        with on_device_of(modules[0]):  # Triton launches on the current device
            problem = _check(model, modules[0], rope, extra, autocast_dtype)
    except Exception as exc:  # the forward cannot run this way on this transformers
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        logger.warning("fused RoPE not used, transformers' RoPE kept: %s", problem)
        return 0, f"transformers' RoPE (the check failed: {problem})"
    for m in modules:
        m.forward = _FusedRopeAttention(m, rope)
    return len(modules), f"fused RoPE on {len(modules)} attention layers (checked)"
