"""Memory-lean LoRA: autograd functions that keep fewer activations than PEFT's forward.

PEFT computes ``base(x) + B(A(dropout(x))) * s`` with ordinary modules, so autograd keeps, for
every adapted linear layer, the dropped copy of its input and the dropout mask; in a SwiGLU MLP it
also keeps the activation that feeds ``down_proj``. For Phi-4 that is most of the activation memory
of a decoder layer, and it is what forces gradient checkpointing (a second forward pass) on a
48 GB card. The functions here compute the same thing and keep less:

* :class:`LoraLinearFunction` keeps only the layer input and the rank-r product. The dropout mask
  is drawn from a seed and drawn again in the backward pass (the seed comes from torch's CPU
  generator, so ``torch.manual_seed`` makes runs repeatable and checkpoint recomputation sees the
  same masks). Dropout's ``1/(1-p)`` and the LoRA scale are applied to the rank-r product, and the
  adapter's contribution is added inside the up-projection's matrix product.
* :class:`LoraSwiGLUFunction` runs a whole ``gate_up_proj -> SiLU(gate) * up -> down_proj`` MLP
  with LoRA on both projections and keeps only its input and the ``gate_up`` output; the SwiGLU
  activation is recomputed in the backward pass (one element-wise kernel).

:func:`fuse_lora_forward` installs them on a PEFT model; anything outside plain single-adapter LoRA
on ``nn.Linear`` (merged or disabled adapters, DoRA and other variants, mixed dtypes without
autocast) falls back to PEFT's own forward. With ``lora_dropout=0`` the result equals PEFT's to
rounding; with dropout the masks come from a different random stream than PEFT's ``nn.Dropout``,
with the same distribution.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LoraLinearFunction",
    "LoraSwiGLUFunction",
    "dropout_mask",
    "fuse_lora_forward",
    "keep",
    "swiglu",
]

_GENERATORS: dict[torch.device, torch.Generator] = {}


def _new_seed() -> int:
    """A dropout seed from torch's CPU generator (no device synchronisation)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (``True`` = kept, with probability ``1 - p``) for ``like``; a function of
    ``seed`` (on a CUDA device with Triton, element ``4g + j`` is kept when the ``j``-th uniform
    number of Philox's draw ``(seed, g)`` is ``>= p``; elsewhere torch's generator draws it)."""
    if like.is_cuda and _triton() is not None:
        return _triton_keep(torch.ones(like.shape, dtype=torch.int8, device=like.device), p, seed)
    gen = _GENERATORS.get(like.device)
    if gen is None:
        gen = _GENERATORS[like.device] = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    return mask.bernoulli_(1.0 - p, generator=gen)


def keep(x: torch.Tensor, p: float, seed: int, *, inplace: bool = False) -> torch.Tensor:
    """``x`` times its keep-mask :func:`dropout_mask` (unscaled), in one pass on a GPU."""
    if x.is_cuda and _triton() is not None and x.is_contiguous():
        return _triton_keep(x if inplace else torch.empty_like(x), p, seed, src=x)
    mask = dropout_mask(x, p, seed)
    return x.mul_(mask) if inplace else x * mask


# --------------------------------------------------------------------------- SwiGLU


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    if gate_up.is_cuda and _triton() is not None:
        return _triton_swiglu_forward(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``gate_up`` of ``swiglu(gate_up)``, given ``grad``."""
    if gate_up.is_cuda and _triton() is not None:
        return _triton_swiglu_backward(gate_up, grad)
    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * silu], dim=-1).to(gate_up.dtype)


_TRITON: Any = False  # False = not looked up yet; None = unavailable


def _triton() -> Any:
    """The Triton kernels, built and tried once on a tiny tensor of the current CUDA device;
    None (torch's own operations are used) when Triton is missing or cannot compile them."""
    global _TRITON
    if _TRITON is False:
        try:
            _TRITON = _build_triton_kernels()
            probe = torch.ones(8, 2 * 64, device="cuda", dtype=torch.bfloat16)
            _triton_swiglu_backward(probe, _triton_swiglu_forward(probe))
            _triton_keep(probe.clone(), 0.5, 1, src=probe)
        except Exception as exc:  # no triton, or it cannot compile here
            import logging

            logging.getLogger(__name__).warning(
                "Triton kernels unavailable (%s: %s); using torch's operations",
                type(exc).__name__,
                exc,
            )
            _TRITON = None
    return _TRITON


def _build_triton_kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        a = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=keep, other=0).to(tl.float32)
        b = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=keep, other=0).to(tl.float32)
        c = a * tl.sigmoid(a) * b
        tl.store(out_ptr + row * n_cols + cols, c.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def bwd(gu_ptr, g_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        a = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=keep, other=0).to(tl.float32)
        b = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=keep, other=0).to(tl.float32)
        g = tl.load(g_ptr + row * n_cols + cols, mask=keep, other=0).to(tl.float32)
        sig = tl.sigmoid(a)
        da = g * b * sig * (1 + a * (1 - sig))
        db = g * a * sig
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * 2 * n_cols + cols, da.to(dt), mask=keep)
        tl.store(out_ptr + row * 2 * n_cols + n_cols + cols, db.to(dt), mask=keep)

    @triton.jit
    def keep_kernel(src_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        # one Philox draw gives four uniform numbers: element 4g + j uses number j of draw g
        groups = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        u0, u1, u2, u3 = tl.rand4x(seed, groups)
        j = tl.arange(0, 4)[None, :]
        u = tl.where(
            j == 0,
            u0[:, None],
            tl.where(j == 1, u1[:, None], tl.where(j == 2, u2[:, None], u3[:, None])),
        )
        offs = groups[:, None] * 4 + j
        inside = offs < n
        x = tl.load(src_ptr + offs, mask=inside, other=0)
        tl.store(out_ptr + offs, tl.where(u >= p, x, tl.zeros_like(x)), mask=inside)

    return types.SimpleNamespace(fwd=fwd, bwd=bwd, keep=keep_kernel, cdiv=triton.cdiv)


_BLOCK = 1024


def _triton_keep(
    out: torch.Tensor, p: float, seed: int, src: torch.Tensor | None = None
) -> torch.Tensor:
    k = _TRITON
    n = out.numel()
    if n >= 2**31:
        raise ValueError(f"dropout on {n} elements: more than the kernel's 2**31 offsets")
    block = 4096
    k.keep[(k.cdiv(n, block),)](
        out if src is None else src, out, n, float(p), int(seed) & (2**63 - 1), BLOCK=block
    )
    return out.bool() if out.dtype == torch.int8 else out


def _triton_swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    k = _TRITON
    gu = gate_up.contiguous()
    n = gu.shape[-1] // 2
    rows = gu.numel() // (2 * n)
    out = torch.empty((*gu.shape[:-1], n), dtype=gu.dtype, device=gu.device)
    k.fwd[(rows, k.cdiv(n, _BLOCK))](gu, out, n, BLOCK=_BLOCK)
    return out


def _triton_swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    k = _TRITON
    gu, g = gate_up.contiguous(), grad.contiguous()
    n = gu.shape[-1] // 2
    rows = gu.numel() // (2 * n)
    out = torch.empty_like(gu)
    k.bwd[(rows, k.cdiv(n, _BLOCK))](gu, g, out, n, BLOCK=_BLOCK)
    return out


# --------------------------------------------------------------------------- autograd


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` times its keep-mask (unscaled); ``x`` itself when ``p == 0``."""
    return x if p <= 0.0 else keep(x, p, seed)


def _lora_up(base: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``base + z @ B^T`` written into ``base`` (a fresh product nobody else holds)."""
    return base.addmm_(z, lora_b.t())


def _lora_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    zs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: float,
    p: float,
    seed: int,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x W^T + ((x * mask) A^T * coef) B^T`` for x, A and B (2-D tensors)."""
    need_x, need_a, need_b = need
    grad_b = grad.t().mm(zs) if need_b else None
    grad_x = grad_a = None
    if need_x or need_a:
        gz = grad.mm(lora_b).mul_(coef)
        if need_a:
            grad_a = gz.t().mm(_dropped(x, p, seed))
        if need_x:
            back = gz.mm(lora_a)
            if p > 0.0:
                keep(back, p, seed, inplace=True)
            grad_x = back.addmm_(grad, weight)
    return grad_x, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``F.linear(x, W, bias) + B(A(dropout(x))) * scale``, keeping only ``x`` and ``A x``."""

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
        coef = scale / (1.0 - p)
        zs = _dropped(x2, p, seed).mm(lora_a.t()).mul_(coef)
        out = _lora_up(F.linear(x2, weight, bias), zs, lora_b)
        ctx.save_for_backward(x2, zs, weight, lora_a, lora_b)
        ctx.meta = (coef, p, seed, shape, bias is not None)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, zs, weight, lora_a, lora_b = ctx.saved_tensors
        coef, p, seed, shape, has_bias = ctx.meta
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = _lora_backward(
            grad, x2, zs, weight, lora_a, lora_b, coef, p, seed, (need[0], need[3], need[4])
        )
        grad_bias = grad.sum(0) if has_bias and need[2] else None
        if grad_x is not None:
            grad_x = grad_x.view(shape)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LoraSwiGLUFunction(torch.autograd.Function):
    """``down(swiglu(gate_up(x)))`` with LoRA on both projections, keeping ``x`` and the
    ``gate_up`` output; the SwiGLU activation and the dropout masks are recomputed."""

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
        c1, c2 = s1 / (1.0 - p1), s2 / (1.0 - p2)
        z1 = _dropped(x2, p1, seed1).mm(a1.t()).mul_(c1)
        gate_up = _lora_up(F.linear(x2, w1), z1, b1)
        act = swiglu(gate_up)
        z2 = _dropped(act, p2, seed2).mm(a2.t()).mul_(c2)
        out = _lora_up(F.linear(act, w2), z2, b2)
        ctx.save_for_backward(x2, gate_up, z1, z2, w1, a1, b1, w2, a2, b2)
        ctx.meta = (c1, p1, seed1, c2, p2, seed2, shape)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, gate_up, z1, z2, w1, a1, b1, w2, a2, b2 = ctx.saved_tensors
        c1, p1, seed1, c2, p2, seed2, shape = ctx.meta
        need = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        act = swiglu(gate_up)
        d_act, grad_a2, grad_b2 = _lora_backward(
            grad, act, z2, w2, a2, b2, c2, p2, seed2, (True, need[5], need[6])
        )
        del act
        assert d_act is not None
        d_gate_up = _swiglu_backward(gate_up, d_act)
        del d_act
        grad_x, grad_a1, grad_b1 = _lora_backward(
            d_gate_up, x2, z1, w1, a1, b1, c1, p1, seed1, (need[0], need[2], need[3])
        )
        if grad_x is not None:
            grad_x = grad_x.view(shape)
        return grad_x, None, grad_a1, grad_b1, None, grad_a2, grad_b2, None, None


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
