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
  applied by the rank-r product's own scale factor, and the base product is added onto the
  adapter's contribution by the base matrix product itself.
* :class:`LoraSwiGLUFunction` runs a whole ``gate_up_proj -> SiLU(gate) * up -> down_proj`` MLP
  with LoRA on both projections and keeps only its input, the ``gate_up`` output and the masks; the
  SwiGLU activation is recomputed in the backward pass (one element-wise kernel).
* :class:`RMSNormFunction` keeps a norm's output (which the next layer keeps as its input anyway)
  instead of its input.

They run only where they are proven to compute what the model computes.
:func:`apply_lean_functions` (called once after ``get_peft_model``) installs them on the modules
of one model instance that pass the allow-list of :mod:`loraforge.fast.fusion` and whose kind
passes the numeric check of :mod:`loraforge.fast.equivalence` (output and gradients against the
model's own forward, on the real model, before training); everything else keeps its own forward,
and the returned :class:`~loraforge.fast.fusion.FusionReport` (also logged) says which module took
which path and why. Nothing process-wide changes: the functions are set as ``forward`` of module
instances, and :func:`remove_lean_functions` takes them off again.

With ``lora_dropout=0`` the result equals PEFT's to rounding; with dropout the masks come from a
different random stream than PEFT's ``nn.Dropout``, with the same distribution (on the GPU, ``p``
rounded to 1/65,536). The element-wise kernels are in :mod:`loraforge.fast.kernels`, the rank-r
products' in :mod:`loraforge.fast.lowrank`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from loraforge.fast import lowrank
from loraforge.fast.batched import pooled_seed
from loraforge.fast.kernels import (
    drop,
    dropout_mask,
    effective_p,
    keep,
    rms_norm,
    rms_norm_backward_from_output,
    swiglu,
    swiglu_backward,
    swiglu_keep,
)
from loraforge.fast.quant import frozen_weight

if TYPE_CHECKING:
    from torch import nn

    from loraforge.fast.fusion import FusionReport

__all__ = [
    "LoraLinearFunction",
    "LoraSwiGLUFunction",
    "RMSNormFunction",
    "apply_lean_functions",
    "dropout_mask",
    "fuse_lora_forward",
    "keep",
    "lean_norm_candidates",
    "lean_norms",
    "remove_lean_functions",
    "swiglu",
]


_DEVICE_SEEDS = threading.local()


@contextlib.contextmanager
def device_seeds() -> Iterator[None]:
    """Within this context (on this thread), :func:`new_seed` draws on the CUDA device even
    outside a capture: a CUDA graph's warm-up then compiles and loads the dropout kernel's
    tensor-seed variant before the capture, where loading a kernel module is not allowed."""
    before = getattr(_DEVICE_SEEDS, "on", False)
    _DEVICE_SEEDS.on = True
    try:
        yield
    finally:
        _DEVICE_SEEDS.on = before


def new_seed(device: torch.device | None = None) -> int | torch.Tensor:
    """A dropout seed: from torch's CPU generator (no device synchronisation), or, while a CUDA
    graph is being captured on ``device`` (or within :func:`device_seeds`), one drawn by torch's
    CUDA generator into a one-element tensor that the dropout kernel reads. A graph replays the
    kernels it captured with the arguments of the capture; torch's generator draws afresh on
    every replay, so each replay gets new masks (an int drawn at capture would give every replay
    the same ones). Within a pass of a graphed stack of layers the seed is an element of the
    pass's single draw (:func:`loraforge.fast.batched.pooled_seed`)."""
    if (
        device is not None
        and device.type == "cuda"
        and (getattr(_DEVICE_SEEDS, "on", False) or torch.cuda.is_current_stream_capturing())
    ):
        pooled = pooled_seed(device)
        if pooled is not None:
            return pooled
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


# --------------------------------------------------------------------------- autograd


def _dense(weight: Any) -> torch.Tensor:
    """A base weight for one matrix product: the tensor itself, or a 4-bit weight
    (:class:`~loraforge.fast.quant.FrozenNF4`) dequantized for this product only."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense()


def _kept(weight: Any) -> tuple[torch.Tensor | None, Any]:
    """What a function keeps of a base weight for its backward pass: ``(tensor, None)`` for a
    dense weight (saved as a tensor), ``(None, weight)`` for a 4-bit one (its packed data and
    scales; it is dequantized again in the backward pass)."""
    return (weight, None) if isinstance(weight, torch.Tensor) else (None, weight)


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    lora_b: torch.Tensor,
) -> torch.Tensor:
    """``x W^T + bias + z B^T``: the rank-r term first, then the base product added onto it by
    the product's epilogue (``beta=1``), which reads it once instead of writing the base product
    and then reading and rewriting it to add the small term (measured on an H200 with Phi-4's
    shapes: 3-8% less time for ``qkv_proj`` and ``gate_up_proj``)."""
    lora = lowrank.up(z, lora_b.t()) if bias is None else torch.addmm(bias, z, lora_b.t())
    return lora.addmm_(x, weight.t())


def _lora_down(
    x: torch.Tensor, lora_a: torch.Tensor, scale: float, p: float, seed: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(dropout(x) @ A^T) * coef`` with ``coef = scale / (1 - effective_p(p))`` (``p`` rounded
    to 1/65,536 on the GPU kernel), the dropout mask's bits (GPU) and ``coef``; the dropped copy of
    ``x`` is freed on return."""
    coef = scale / (1.0 - effective_p(p, x))
    dropped, bits = drop(x, p, seed)
    return lowrank.scaled_mm(dropped, lora_a.t(), coef), bits, coef


def _lora_backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    zs: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: float,
    mask: tuple[float, int, torch.Tensor | None],
    need: tuple[bool, bool, bool],
    *,
    masked: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x W^T + ((x * mask) A^T * coef) B^T`` for x, A and B (2-D tensors); the
    mask is ``(p, seed, bits)``: read from ``bits`` or drawn again from ``seed``. With
    ``masked``, ``x`` is given already times the mask (and is read only for A's gradient; it
    may be ``None`` where that is not asked for)."""
    need_x, need_a, need_b = need
    p, seed, bits = mask
    grad_b = grad.t().mm(zs) if need_b else None
    grad_x = grad_a = None
    if need_x or need_a:
        gz = lowrank.scaled_mm(grad, lora_b, coef)
        if need_a:
            assert x is not None
            grad_a = gz.t().mm(x if masked else keep(x, p, seed, bits))
        if need_x:
            if p > 0.0 and bits is None:  # no bits (no GPU kernel): the mask drawn again
                back = keep(gz.mm(lora_a), p, seed, bits, inplace=True)
            else:  # the product written once, with the mask's bits applied (one GPU kernel)
                back = lowrank.up(gz, lora_a, bits)  # no bits without dropout
            grad_x = back.addmm_(grad, weight)
    return grad_x, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """``F.linear(x, W, bias) + B(A(dropout(x))) * scale``, keeping ``x``, ``A x`` and (on the
    GPU) the dropout mask as bits. ``W`` is a tensor or a 4-bit
    :class:`~loraforge.fast.quant.FrozenNF4`, dequantized in the forward pass and again in the
    backward pass (the dequantized copy is not kept)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: Any,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        p: float,
        seed: int | torch.Tensor,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        zs, bits, coef = _lora_down(x2, lora_a, scale, p, seed)
        out = _project(x2, _dense(weight), bias, zs, lora_b)
        dense, quantized = _kept(weight)
        ctx.save_for_backward(x2, zs, dense, lora_a, lora_b, bits)
        ctx.meta = (coef, p, seed, shape, bias is not None, quantized)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, zs, weight, lora_a, lora_b, bits = ctx.saved_tensors
        coef, p, seed, shape, has_bias, quantized = ctx.meta
        if quantized is not None and ctx.needs_input_grad[0]:
            weight = quantized.dense()
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
    output and (on the GPU) the dropout masks as bits; the SwiGLU activation is recomputed. The
    base weights are tensors or 4-bit, as for :class:`LoraLinearFunction`.

    With ``recompute``, the ``gate_up`` output (2 x ``intermediate_size`` per token, most of
    what a decoder layer keeps) is not kept: the backward pass computes it again from ``x``,
    the kept rank-r product and ``W1`` (on a 4-bit base ``W1`` is dequantized there anyway), with
    the forward's own kernels, so the gradients are bit for bit those without it. It costs one
    ``gate_up`` product per backward pass; the planner chooses it where the memory buys a longer
    row (``FastPlan.recompute_mlps``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: Any,
        a1: torch.Tensor,
        b1: torch.Tensor,
        w2: Any,
        a2: torch.Tensor,
        b2: torch.Tensor,
        lora1: tuple[float, float, int | torch.Tensor],
        lora2: tuple[float, float, int | torch.Tensor],
        recompute: bool = False,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        (s1, p1, seed1), (s2, p2, seed2) = lora1, lora2
        z1, bits1, c1 = _lora_down(x2, a1, s1, p1, seed1)
        gate_up = _project(x2, _dense(w1), None, z1, b1)
        act = swiglu(gate_up)
        z2, bits2, c2 = _lora_down(act, a2, s2, p2, seed2)
        out = _project(act, _dense(w2), None, z2, b2)
        (d1, q1), (d2, q2) = _kept(w1), _kept(w2)
        kept = None if recompute else gate_up  # recomputed from x, z1 and W1 in the backward
        ctx.save_for_backward(x2, kept, z1, z2, d1, a1, b1, d2, a2, b2, bits1, bits2)
        ctx.meta = (c1, p1, seed1, c2, p2, seed2, shape, q1, q2)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x2, gate_up, z1, z2, w1, a1, b1, w2, a2, b2, bits1, bits2 = ctx.saved_tensors
        c1, p1, seed1, c2, p2, seed2, shape, q1, q2 = ctx.meta
        need = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        if q2 is not None:
            w2 = q2.dense()
        if gate_up is None:  # recomputed: W2's products first, so one dense weight at a time
            d_act, _, grad_b2 = _lora_backward(
                grad, gate_up, z2, w2, a2, b2, c2, (p2, seed2, bits2), (True, False, need[6]),
                masked=True,
            )  # fmt: skip
            del w2
            if q1 is not None:
                w1 = q1.dense()
            gate_up = _project(x2, w1, None, z1, b1)  # the forward's product, bit for bit
            grad_a2 = None
            if need[5]:  # as _lora_backward computes it, on the masked SwiGLU output
                gz2 = lowrank.scaled_mm(grad, b2, c2)
                grad_a2 = gz2.t().mm(swiglu_keep(gate_up, p2, seed2, bits2))
                del gz2
        else:
            # the SwiGLU output times its mask, for A2's gradient (one kernel on the GPU)
            kept = swiglu_keep(gate_up, p2, seed2, bits2) if need[5] else gate_up
            d_act, grad_a2, grad_b2 = _lora_backward(
                grad, kept, z2, w2, a2, b2, c2, (p2, seed2, bits2), (True, need[5], need[6]),
                masked=True,
            )  # fmt: skip
            del kept, w2
            if q1 is not None and need[0]:
                w1 = q1.dense()
        assert d_act is not None
        d_gate_up = swiglu_backward(gate_up, d_act)
        del d_act, gate_up
        grad_x, grad_a1, grad_b1 = _lora_backward(
            d_gate_up, x2, z1, w1, a1, b1, c1, (p1, seed1, bits1), (need[0], need[2], need[3])
        )
        if grad_x is not None:
            grad_x = grad_x.view(shape)
        return grad_x, None, grad_a1, grad_b1, None, grad_a2, grad_b2, None, None, None


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


# --------------------------------------------------------------------------- on PEFT's modules


def lora_linear(
    module: Any,
    adapter: str,
    regime: torch.dtype | None,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    p: float,
    seed: int | torch.Tensor,
) -> Any:
    """PEFT's ``module(x)`` (a ``lora.Linear``) through :class:`LoraLinearFunction`, with these
    adapter weights, in ``regime`` (the autocast dtype) or, without autocast, ``x``'s dtype."""
    base = module.base_layer
    dtype = regime or x.dtype
    bias = None if base.bias is None else base.bias.to(dtype)
    scale = float(module.scaling[adapter])
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinearFunction.apply(
            x.to(dtype),
            frozen_weight(base, dtype),
            bias,
            lora_a.to(dtype),
            lora_b.to(dtype),
            scale,
            p,
            seed,
        )


def lora_mlp(
    mlp: Any,
    adapters: tuple[str, str],
    regime: torch.dtype | None,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    masks: tuple[tuple[float, int | torch.Tensor], ...],
    recompute: bool = False,
) -> Any:
    """The MLP's ``mlp(x)`` through :class:`LoraSwiGLUFunction`, with adapter weights
    ``(A1, B1, A2, B2)`` of ``gate_up_proj`` and ``down_proj`` and dropout
    ``((p1, seed1), (p2, seed2))``; with ``recompute``, its ``gate_up`` output is computed again
    in the backward pass instead of kept."""
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    dtype = regime or x.dtype
    a1, b1, a2, b2 = (w.to(dtype) for w in weights)
    (p1, seed1), (p2, seed2) = masks
    lora1 = (float(gate_up.scaling[adapters[0]]), p1, seed1)
    lora2 = (float(down.scaling[adapters[1]]), p2, seed2)
    w1, w2 = frozen_weight(gate_up.base_layer, dtype), frozen_weight(down.base_layer, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LoraSwiGLUFunction.apply(
            x.to(dtype), w1, a1, b1, w2, a2, b2, lora1, lora2, recompute
        )


def norm_eps(module: Any) -> float | None:
    """A norm's epsilon: its ``variance_epsilon`` or ``eps``, if a finite number."""
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, int | float) and not isinstance(eps, bool) and abs(eps) < float("inf"):
            return float(eps)
    return None


def lean_norm(module: Any, x: torch.Tensor) -> Any:
    """The norm's ``module(x)`` through :class:`RMSNormFunction`."""
    with torch.autocast(x.device.type, enabled=False):
        return RMSNormFunction.apply(x, module.weight, norm_eps(module))


# --------------------------------------------------------------------------- entry points


def apply_lean_functions(
    model: nn.Module, *, verify: bool = True, autocast_dtype: torch.dtype | None = None
) -> FusionReport:
    """Install the lean LoRA functions and norms on ``model`` where they are proven equal to the
    model's own forward, and log which modules took which path and why.

    Call once after ``get_peft_model`` (and again after any change to the adapters), before
    training; a second call first removes what the first installed. Each PEFT LoRA layer on the
    allow-list (:mod:`loraforge.fast.fusion`) runs :class:`LoraLinearFunction`; each
    ``gate_up_proj``/``down_proj`` SwiGLU MLP whose two projections qualify runs
    :class:`LoraSwiGLUFunction`; each Llama-style RMSNorm at a decoder layer's two norm sites or
    the final norm (:func:`lean_norm_candidates`) runs :class:`RMSNormFunction`. With ``verify``,
    one module of each kind is first checked numerically against the model's own forward
    (:mod:`loraforge.fast.equivalence`); a kind that fails keeps the model's forward, with a
    warning naming the module and the error.

    Args:
        model: a PEFT model, or any module holding PEFT LoRA layers.
        verify: run the numeric check before installing; ``False`` only for benchmarks and tests
            of the installation itself.
        autocast_dtype: the mixed precision training runs under (``torch.bfloat16`` for the
            Trainer's ``bf16=True``, ``torch.float16`` for ``fp16=True``), ``None`` for none.
            The layers are admitted and checked for it, and a call under another autocast state
            runs PEFT's forward.

    Returns:
        A :class:`~loraforge.fast.fusion.FusionReport`: per module, ``"fused"`` or why not; the
        checks; the calls handed back to PEFT later on.

    Raises:
        ValueError: ``autocast_dtype`` is not ``None``, ``torch.bfloat16`` or ``torch.float16``.
    """
    from loraforge.fast.fusion import install

    return install(model, lora=True, norms=True, verify=verify, autocast_dtype=autocast_dtype)


def fuse_lora_forward(
    model: nn.Module, *, verify: bool = True, autocast_dtype: torch.dtype | None = None
) -> FusionReport:
    """The LoRA half of :func:`apply_lean_functions` (LoRA layers and SwiGLU MLPs; norms are
    left as they are); same arguments, and the report's ``norms`` is empty."""
    from loraforge.fast.fusion import install

    return install(model, lora=True, norms=False, verify=verify, autocast_dtype=autocast_dtype)


def lean_norms(model: nn.Module, *, verify: bool = True) -> FusionReport:
    """The norm half of :func:`apply_lean_functions`: the norms :func:`lean_norm_candidates`
    finds run through :class:`RMSNormFunction` (each kind checked first when ``verify``); the
    report's ``layers`` and ``mlps`` are empty. At each call, a norm whose weight is trained, or
    whose input's dtype differs from its weight's, runs its own forward. The zero check is made
    here, once: a weight edited to hold a zero afterwards is not seen."""
    from loraforge.fast.fusion import install

    return install(model, lora=False, norms=True, verify=verify, autocast_dtype=None)


def lean_norm_candidates(model: nn.Module) -> list[nn.Module]:
    """The norms of ``model`` that :func:`lean_norms` would take (before its numeric check): at
    a decoder layer's two norm sites (``input_layernorm``, ``post_attention_layernorm``) or the
    final ``norm``, identified as Llama-style RMSNorms by structure and by value
    (:func:`loraforge.fast.equivalence.rms_norm_refusal`, no class names), with no zero weight
    element and no ``forward`` replaced on the instance."""
    from loraforge.fast.fusion import norm_sites

    return [module for _, module, reason in norm_sites(model) if reason is None]


def remove_lean_functions(model: nn.Module) -> int:
    """Take the functions :func:`apply_lean_functions` installed off ``model``'s modules (each
    runs its class's forward again); returns how many modules were changed."""
    from loraforge.fast.fusion import uninstall

    return uninstall(model, ("lora", "norm"))
