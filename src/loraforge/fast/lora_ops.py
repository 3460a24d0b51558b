"""Memory-lean LoRA: autograd functions that keep fewer activations than PEFT's forward.

PEFT computes ``base(x) + B(A(dropout(x))) * s`` with ordinary modules, so autograd keeps, for
every adapted linear layer, the dropped copy of its input and the dropout mask; in a SwiGLU MLP it
also keeps the activation that feeds ``down_proj``. For Phi-4 that is most of the activation memory
of a decoder layer, and it is what forces gradient checkpointing (a second forward pass) on a
48 GB card. The functions here compute the same thing and keep less:

* :class:`LoraLinearFunction` keeps the layer input, the rank-r product and the dropout mask: as
  bits on the GPU (1/16 of a bf16 copy), elsewhere as its seed, drawn again in the backward pass.
  The seed comes from torch's CPU generator, so ``torch.manual_seed`` makes runs repeatable and
  checkpoint recomputation sees the same masks. Dropout's ``1/(1-p)`` and the LoRA scale are
  applied to the rank-r product, and the adapter's contribution is added inside the
  up-projection's matrix product.
* :class:`LoraSwiGLUFunction` runs a whole ``gate_up_proj -> SiLU(gate) * up -> down_proj`` MLP
  with LoRA on both projections and keeps only its input, the ``gate_up`` output and the masks; the
  SwiGLU activation is recomputed in the backward pass (one element-wise kernel).
* :class:`RMSNormFunction` keeps a norm's output (which the next layer keeps as its input anyway)
  instead of its input.

:func:`fuse_lora_forward` installs the LoRA functions on a PEFT model; anything outside plain
single-adapter LoRA on ``nn.Linear`` (merged or disabled adapters, DoRA and other variants, mixed
dtypes without autocast) falls back to PEFT's own forward. :func:`lean_norms` installs the norm.
With ``lora_dropout=0`` the result equals PEFT's to rounding; with dropout the masks come from a
different random stream than PEFT's ``nn.Dropout``, with the same distribution (on the GPU, ``p``
rounded to 1/65,536). The kernels are in :mod:`loraforge.kernels`.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.fast.kernels import (
    drop,
    dropout_mask,
    effective_p,
    keep,
    rms_norm,
    rms_norm_backward_from_output,
    swiglu,
    swiglu_backward,
)

__all__ = [
    "LoraLinearFunction",
    "LoraSwiGLUFunction",
    "RMSNormFunction",
    "dropout_mask",
    "fuse_lora_forward",
    "keep",
    "lean_norm_candidates",
    "lean_norms",
    "swiglu",
]


def _new_seed() -> int:
    """A dropout seed from torch's CPU generator (no device synchronisation)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


# --------------------------------------------------------------------------- autograd


def _lora_up(base: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``base + z @ B^T`` written into ``base`` (a fresh product nobody else holds)."""
    return base.addmm_(z, lora_b.t())


def _lora_down(
    x: torch.Tensor, lora_a: torch.Tensor, scale: float, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(dropout(x) @ A^T) * coef`` with ``coef = scale / (1 - effective_p(p))`` (``p`` rounded
    to 1/65,536 on the GPU kernel), the dropout mask's bits (GPU) and ``coef``; the dropped copy of
    ``x`` is freed on return."""
    coef = scale / (1.0 - effective_p(p, x))
    dropped, bits = drop(x, p, seed)
    return dropped.mm(lora_a.t()).mul_(coef), bits, coef


def _lora_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    zs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: float,
    mask: tuple[float, int, torch.Tensor | None],
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x W^T + ((x * mask) A^T * coef) B^T`` for x, A and B (2-D tensors); the
    mask is ``(p, seed, bits)``: read from ``bits`` or drawn again from ``seed``."""
    need_x, need_a, need_b = need
    p, seed, bits = mask
    grad_b = grad.t().mm(zs) if need_b else None
    grad_x = grad_a = None
    if need_x or need_a:
        gz = grad.mm(lora_b).mul_(coef)
        if need_a:
            grad_a = gz.t().mm(keep(x, p, seed, bits))
        if need_x:
            back = keep(gz.mm(lora_a), p, seed, bits, inplace=True)
            grad_x = back.addmm_(grad, weight)
    return grad_x, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``F.linear(x, W, bias) + B(A(dropout(x))) * scale``, keeping ``x``, ``A x`` and (on the
    GPU) the dropout mask as bits."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        p: float,
        seed: int,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        zs, bits, coef = _lora_down(x2, lora_a, scale, p, seed)
        out = _lora_up(F.linear(x2, weight, bias), zs, lora_b)
        ctx.save_for_backward(x2, zs, weight, lora_a, lora_b, bits)
        ctx.meta = (coef, p, seed, shape, bias is not None)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, zs, weight, lora_a, lora_b, bits = ctx.saved_tensors
        coef, p, seed, shape, has_bias = ctx.meta
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = _lora_backward(
            grad, x2, zs, weight, lora_a, lora_b, coef, (p, seed, bits), (need[0], need[3], need[4])
        )
        grad_bias = grad.sum(0) if has_bias and need[2] else None
        if grad_x is not None:
            grad_x = grad_x.view(shape)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LoraSwiGLUFunction(torch.autograd.Function):
    """``down(swiglu(gate_up(x)))`` with LoRA on both projections, keeping ``x``, the ``gate_up``
    output and (on the GPU) the dropout masks as bits; the SwiGLU activation is recomputed."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        a1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        lora1: tuple[float, float, int],
        lora2: tuple[float, float, int],
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        (s1, p1, seed1), (s2, p2, seed2) = lora1, lora2
        z1, bits1, c1 = _lora_down(x2, a1, s1, p1, seed1)
        gate_up = _lora_up(F.linear(x2, w1), z1, b1)
        act = swiglu(gate_up)
        z2, bits2, c2 = _lora_down(act, a2, s2, p2, seed2)
        out = _lora_up(F.linear(act, w2), z2, b2)
        ctx.save_for_backward(x2, gate_up, z1, z2, w1, a1, b1, w2, a2, b2, bits1, bits2)
        ctx.meta = (c1, p1, seed1, c2, p2, seed2, shape)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, gate_up, z1, z2, w1, a1, b1, w2, a2, b2, bits1, bits2 = ctx.saved_tensors
        c1, p1, seed1, c2, p2, seed2, shape = ctx.meta
        need = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        act = swiglu(gate_up)
        d_act, grad_a2, grad_b2 = _lora_backward(
            grad, act, z2, w2, a2, b2, c2, (p2, seed2, bits2), (True, need[5], need[6])
        )
        del act
        assert d_act is not None
        d_gate_up = swiglu_backward(gate_up, d_act)
        del d_act
        grad_x, grad_a1, grad_b1 = _lora_backward(
            d_gate_up, x2, z1, w1, a1, b1, c1, (p1, seed1, bits1), (need[0], need[2], need[3])
        )
        if grad_x is not None:
            grad_x = grad_x.view(shape)
        return grad_x, None, grad_a1, grad_b1, None, grad_a2, grad_b2, None, None


class RMSNormFunction(torch.autograd.Function):
    """The Llama/Phi-3 RMSNorm with a frozen weight, keeping its output and ``1/rms`` instead of
    its input: the backward pass recovers the normalised input as ``output / weight``. Where the
    layer that reads the output keeps it anyway (as its own input: a decoder layer's adapted
    projections), the norm's input is not kept at all (2 bytes per hidden unit and token saved,
    twice per decoder layer). The output must not be changed in place afterwards."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(y, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        y, weight, rstd = ctx.saved_tensors
        return rms_norm_backward_from_output(grad, y, weight, rstd), None, None


# --------------------------------------------------------------------------- installing


def _plain_lora(module: Any) -> str | None:
    """The active adapter's name if ``module`` is a plain single-adapter LoRA ``nn.Linear``."""
    active = module.active_adapters
    if (
        module.disable_adapters
        or module.merged
        or len(active) != 1
        or active[0] not in module.lora_A
        or active[0] in getattr(module, "lora_variant", {})
        or getattr(module, "lora_bias", {}).get(active[0])  # a bias on lora_B
        or type(module.base_layer) is not torch.nn.Linear
        or any(p.requires_grad for p in module.base_layer.parameters())  # trained base
    ):
        return None
    return str(active[0])


def _lora_args(module: Any, x: torch.Tensor) -> tuple[Any, ...] | None:
    """(x, W, bias, A, B, (scale, p, seed)) in the compute dtype, or None to defer to PEFT."""
    name = _plain_lora(module)
    if name is None:
        return None
    base = module.base_layer
    lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    elif x.dtype == lora_a.dtype == base.weight.dtype:
        dtype = x.dtype
    else:
        return None  # PEFT casts the input to the adapter's dtype: let it
    drop = module.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    if not isinstance(drop, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    seed = _new_seed() if p > 0.0 else 0
    bias = None if base.bias is None else base.bias.to(dtype)
    return (
        x.to(dtype),
        base.weight.to(dtype),
        bias,
        lora_a.to(dtype),
        lora_b.to(dtype),
        (float(module.scaling[name]), p, seed),
    )


def _linear_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    spec = None if (args or kwargs) else _lora_args(self, x)
    if spec is None:
        return type(self).forward(self, x, *args, **kwargs)
    xc, w, bias, a, b, (scale, p, seed) = spec
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinearFunction.apply(xc, w, bias, a, b, scale, p, seed)


def _swiglu_mlp_forward(self: Any, x: torch.Tensor) -> Any:
    s1 = _lora_args(self.gate_up_proj, x)
    s2 = None if s1 is None else _lora_args(self.down_proj, s1[0])
    if s1 is None or s2 is None or s1[2] is not None or s2[2] is not None:
        return self._loraforge_unfused_forward(x)
    xc, w1, _, a1, b1, lora1 = s1
    _, w2, _, a2, b2, lora2 = s2
    with torch.autocast(x.device.type, enabled=False):
        return LoraSwiGLUFunction.apply(xc, w1, a1, b1, w2, a2, b2, lora1, lora2)


def _is_swiglu_mlp(module: Any, lora_linear: Any) -> bool:
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    gate_up: Any = getattr(module, "gate_up_proj", None)
    down: Any = getattr(module, "down_proj", None)
    return (
        act in ("silu", "swish")
        and type(gate_up) is lora_linear
        and type(down) is lora_linear
        and 2 * down.in_features == gate_up.out_features
    )


def fuse_lora_forward(model: Any) -> int:
    """Install the lean LoRA functions on every PEFT ``lora.Linear`` of ``model`` (and fuse fused
    ``gate_up_proj``/``down_proj`` SwiGLU MLPs whole); returns how many layers were adapted."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if _is_swiglu_mlp(module, LoraLinear):
            # keep the forward in place (Liger may have patched it) for the cases we hand back
            if not hasattr(module, "_loraforge_unfused_forward"):
                module._loraforge_unfused_forward = module.forward
            module.forward = types.MethodType(_swiglu_mlp_forward, module)
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_linear_forward, module)  # type: ignore[method-assign]
            n += 1
    return n


# Norms computing ``weight * (x / rms(x)).to(x.dtype)`` (statistics in float32, no offset);
# Liger's norm computes that with offset 0 and the "llama" casting mode (its setting for these).
_LLAMA_NORMS = frozenset(
    {
        "Phi3RMSNorm",
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen3RMSNorm",
        "LigerRMSNorm",
    }
)


def _norm_forward(self: Any, x: torch.Tensor) -> Any:
    w = self.weight
    if w.requires_grad or x.dtype != w.dtype:
        return self._loraforge_plain_forward(x)
    with torch.autocast(x.device.type, enabled=False):
        return RMSNormFunction.apply(x, w, float(self.variance_epsilon))


# Where a norm's output is kept anyway by the layer that reads it: the decoder layer's two norms
# (read by the adapted qkv projection and the MLP) and the final norm (read by lm_head). Not, for
# example, Qwen3's q_norm/k_norm, whose output Liger's RoPE may overwrite in place.
_LEAN_NORM_SITES = frozenset({"input_layernorm", "post_attention_layernorm", "norm"})


def lean_norm_candidates(model: Any) -> list[Any]:
    """The norms of ``model`` that :func:`lean_norms` would take: Llama-style RMSNorms (Liger's
    too, with offset 0 and "llama" casting) at a decoder layer's two norm sites or the final norm,
    with a frozen, non-zero 1-D weight that is not on the meta device."""
    found = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (
            (name and name.rsplit(".", 1)[-1] not in _LEAN_NORM_SITES)
            or type(module).__name__ not in _LLAMA_NORMS
            or not isinstance(w, torch.Tensor)
            or w.dim() != 1
            or w.is_meta
            or getattr(module, "variance_epsilon", None) is None
            or getattr(module, "offset", 0.0) != 0.0
            or getattr(module, "casting_mode", "llama") != "llama"
            or bool((w == 0).any())  # output / weight recovers the input only where weight != 0
        ):
            continue
        found.append(module)
    return found


def lean_norms(model: Any) -> int:
    """Run the norms :func:`lean_norm_candidates` finds through :class:`RMSNormFunction`; returns
    how many. At each call, a norm whose weight is trained, or whose input's dtype differs from its
    weight's, uses its previous forward (Liger's, if patched). The zero check is made here, once:
    a weight edited to hold a zero afterwards is not seen."""
    n = 0
    for module in lean_norm_candidates(model):
        if not hasattr(module, "_loraforge_plain_forward"):
            module._loraforge_plain_forward = module.forward
        module.forward = types.MethodType(_norm_forward, module)
        n += 1
    return n
