"""The numeric check: a lean function is used only after it matched the model's own forward.

Before :func:`~loraforge.fast.lora_ops.apply_lean_functions` installs anything, one module of each
kind (each distinct shape, dtypes, dropout and autocast of a LoRA linear layer, of a SwiGLU MLP, of
a norm) is run through the lean function and through the model's own forward (PEFT's, or the
norm's class), on the real model:

* **inputs**: a small random batch (2 x 8 tokens) on the module's device, in its weight's dtype,
  under the autocast training will run under; random adapter weights (through
  ``torch.func.functional_call``: the model's own weights are not touched), ``B`` sized so that
  the adapter adds about as much to the output as the base layer (PEFT's zero-initialised
  ``lora_B`` would hide the adapter's path, and so would a tiny one);
* **compared**: the output and the gradients of the input and of every adapter weight, for one
  random output gradient, by relative error ``|got - want| / |want|`` over the whole tensor,
  within :data:`TOLERANCES` for the dtype computed in (also: the same shape and dtype, finite);
* **dropout** (``lora_dropout > 0``): the model's dropout module is swapped, for the check only,
  for one that applies the very mask the lean function draws from the same seed, scaled by
  ``1 / (1 - p)``: so the masking, its scaling and its reuse in the backward pass are compared
  exactly. Separately, the lean dropout's keep rate over 65,536 draws must be within six standard
  deviations of ``1 - p`` (``p`` as the GPU kernel rounds it), and another seed must give another
  mask.

The check draws from its own generators (the global random state, and so the training run, is
untouched) and costs one small batch per kind. A failed kind keeps the model's forward, with a
warning naming the module and the error (:class:`CheckResult`).

:func:`rms_norm_refusal` identifies a Llama-style RMSNorm by the same means: by structure and by
its value on a probe input, not by its class's name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.fast import lora_ops
from loraforge.fast.lora_ops import _dense, lean_norm, lora_linear, lora_mlp, norm_eps
from loraforge.fast.quant import dense_dtype, frozen_weight

__all__ = [
    "TOLERANCES",
    "CheckResult",
    "check_linear",
    "check_mlp",
    "check_norm",
    "compare",
    "relative_error",
    "rms_norm_refusal",
]

TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}
"""The largest relative error (of a whole tensor) a lean function may show against the model's
own forward, by the dtype it computes in. Measured on the tiny CPU model: about 1e-7 in float32,
4e-3 (a layer) to 8e-3 (an MLP) in bfloat16. Float32 on a GPU whose matrix products may use TF32
gets 5e-3."""

_SIGMAS = 6.0  # the dropout keep rate's allowed deviation, in standard deviations
_SEED = 20_240_601  # the dropout seed of the check (the lean function's seeds are drawn anew)


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The tolerance for a computation in ``dtype`` on ``device`` (:data:`TOLERANCES`)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    tf32 = tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and device.type == "cuda" and tf32:
        return 5e-3
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """``|got - want| / |want|`` (norms over the whole tensor, in float32); ``inf`` if the
    shapes or dtypes differ, or ``got`` is not finite."""
    if got is None or want is None:
        return 0.0 if got is want else math.inf
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf
    g, w = got.detach().float(), want.detach().float()
    if not bool(torch.isfinite(g).all()):
        return math.inf
    diff, size = (g - w).norm().item(), w.norm().item()
    return diff / size if size > 0 else (0.0 if diff == 0 else math.inf)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One numeric check of a lean function against the model's own forward.

    Attributes:
        kind: what was checked, e.g. ``"LoRA linear 64->192 base float32 adapter float32, no
            autocast"``.
        module: the module it ran on (one per kind).
        errors: what was compared (``"output"``, ``"grad input"``, ``"grad lora_A"``, ...) ->
            relative error (:func:`relative_error`).
        tolerance: the largest relative error accepted.
        dropout_sigmas: how far the lean dropout's keep rate is from ``1 - p``, in standard
            deviations (``None`` without dropout; ``inf`` if two seeds gave one mask).
        failure: the exception the check raised, if any.
    """

    kind: str
    module: str
    errors: dict[str, float]
    tolerance: float
    dropout_sigmas: float | None = None
    failure: str = ""

    @property
    def passed(self) -> bool:
        """Whether every error is within the tolerance (and nothing raised)."""
        rate_ok = self.dropout_sigmas is None or self.dropout_sigmas <= _SIGMAS
        errors_ok = all(e <= self.tolerance for e in self.errors.values())
        return not self.failure and rate_ok and errors_ok

    @property
    def worst(self) -> float:
        """The largest relative error (``inf`` if the check raised)."""
        return math.inf if self.failure else max(self.errors.values(), default=0.0)

    def describe(self) -> str:
        """What failed, e.g. ``"grad lora_A: relative error 1.2e-02 > 1.0e-04"``, or the largest
        error when it passed."""
        if self.failure:
            return self.failure
        bad = [
            f"{k}: relative error {e:.1e} > {self.tolerance:.1e}"
            for k, e in self.errors.items()
            if not e <= self.tolerance
        ]
        if self.dropout_sigmas is not None and not self.dropout_sigmas <= _SIGMAS:
            bad.append(f"dropout keep rate {self.dropout_sigmas:.1f} standard deviations off")
        return "; ".join(bad) or f"passed (largest relative error {self.worst:.1e})"


# --------------------------------------------------------------------------- RMSNorm identity


def _llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama/Phi-3 RMSNorm written out: ``weight * (x / rms(x)).to(x.dtype)``, statistics
    in float32."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_refusal(module: nn.Module) -> str | None:
    """Why ``module`` is not a Llama-style RMSNorm, or ``None`` if it is.

    By structure and by value, not by class name: no submodules, one parameter, a 1-D
    floating-point ``weight`` (not on the meta device), a numeric ``variance_epsilon`` or ``eps``,
    and its class's forward equals ``weight * (x / rms(x)).to(x.dtype)`` with float32 statistics
    (the Llama/Phi-3/Mistral/Qwen norm, Liger's with offset 0) on a probe input, within the dtype's
    tolerance. A Gemma-style ``(1 + weight)`` norm, a LayerNorm or a norm without weight fails.
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not w.dtype.is_floating_point:
        return "no 1-D floating-point weight"
    if w.is_meta:
        return "weight on the meta device"
    eps = norm_eps(module)
    if eps is None:
        return "no variance_epsilon/eps"
    if module._modules or len(list(module.parameters())) != 1:
        return "more than a weight"
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = (torch.randn(4, w.shape[0], generator=gen, device=w.device) * 3).to(w.dtype)
    try:
        with torch.no_grad():
            got = type(module).forward(module, x)
            want = _llama_rms_norm(x, w, eps)
    except Exception as exc:  # a forward that wants other arguments is not this norm
        return f"its forward raised {type(exc).__name__} on a probe"
    err = relative_error(got, want)
    if not err <= tolerance(w.dtype, w.device):
        return f"not the Llama RMSNorm (relative error {err:.1e} on a probe)"
    return None


# --------------------------------------------------------------------------- the checks


class _SeededDropout(nn.Module):
    """The model's dropout during the check: the mask the lean functions draw from ``seed``,
    scaled by ``1 / (1 - p)`` as they scale it."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        kept = x2 * lora_ops.dropout_mask(x2, self.p, self.seed)
        return (kept / (1.0 - lora_ops.effective_p(self.p, x2))).view(x.shape)


@contextlib.contextmanager
def _seeded_dropout(layer: Any, adapter: str, p: float, seed: int) -> Iterator[None]:
    """The layer's dropout swapped for :class:`_SeededDropout` inside the block only."""
    if p <= 0.0:
        yield
        return
    original = layer.lora_dropout[adapter]
    layer.lora_dropout[adapter] = _SeededDropout(p, seed)
    try:
        yield
    finally:
        layer.lora_dropout[adapter] = original


def _precision(device: torch.device, regime: torch.dtype | None) -> Any:
    if regime is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=regime)


def _configured_p(dropout: nn.Module) -> float:
    """The dropout probability training will use (whatever the module's mode now)."""
    return float(dropout.p) if type(dropout) is nn.Dropout else 0.0


def _probe_adapter(layer: Any, adapter: str, gen: torch.Generator) -> list[torch.Tensor]:
    """Random ``[A, B]`` for a LoRA layer, ``B`` sized so that on a random input the adapter adds
    about as much as the base layer."""
    device, dtype = layer.base_layer.weight.device, dense_dtype(layer.base_layer)
    a_w, b_w = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    r, n_in = a_w.shape
    a = torch.randn(r, n_in, generator=gen, device=device) / math.sqrt(n_in)
    b = torch.randn(b_w.shape[0], r, generator=gen, device=device) / math.sqrt(r)
    z = torch.randn(16, n_in, generator=gen, device=device)
    with torch.no_grad():
        w = _dense(frozen_weight(layer.base_layer, dtype))
        base = F.linear(z.to(dtype), w).float().norm()
        added = (z @ a.t() @ b.t()).norm() * abs(float(layer.scaling[adapter]))
        if base > 0 and added > 0:
            b *= base / added
    return [a.to(a_w.dtype), b.to(b_w.dtype)]


def compare(
    kind: str,
    name: str,
    inputs: list[torch.Tensor],
    labels: tuple[str, ...],
    want_fn: Callable[..., torch.Tensor],
    got_fn: Callable[..., torch.Tensor],
    tol: float,
    dropout: tuple[float, torch.Tensor] | None = None,
) -> CheckResult:
    """Run ``want_fn`` (the model's own computation) and ``got_fn`` (its replacement) on
    separate copies of ``inputs`` (leaves requiring gradients) and compare the outputs and, for
    one random output gradient, the gradients of every input (named by ``labels``), within
    ``tol``; ``dropout=(p, like)`` adds the keep-rate check of the lean dropout."""
    try:
        want_in = [t.detach().clone().requires_grad_() for t in inputs]
        got_in = [t.detach().clone().requires_grad_() for t in inputs]
        want, got = want_fn(*want_in), got_fn(*got_in)
        errors = {"output": relative_error(got, want)}
        if got.shape == want.shape:
            gen = torch.Generator(device=want.device).manual_seed(1)
            g = torch.randn(want.shape, generator=gen, device=want.device).to(want.dtype)
            # clones: a backward pass may write into the gradient it is given
            want_grads = torch.autograd.grad(want, want_in, g.clone(), allow_unused=True)
            got_grads = torch.autograd.grad(got, got_in, g.clone(), allow_unused=True)
            for label, a, b in zip(labels, got_grads, want_grads, strict=True):
                errors[f"grad {label}"] = relative_error(a, b)
        sigmas = None if dropout is None else _dropout_sigmas(*dropout)
    except Exception as exc:  # the lean function (or the reference) cannot run here
        return CheckResult(kind, name, {}, tol, failure=f"{type(exc).__name__}: {exc}")
    return CheckResult(kind, name, errors, tol, sigmas)


def _dropout_sigmas(p: float, like: torch.Tensor) -> float:
    """How far the lean dropout's keep rate on 65,536 elements is from ``1 - effective_p(p)``,
    in standard deviations (``inf`` if another seed draws the same mask)."""
    ones = torch.ones(256, 256, device=like.device, dtype=like.dtype)
    dropped, _ = lora_ops.drop(ones, p, _SEED)  # the drop the lean functions call
    other, _ = lora_ops.drop(ones, p, _SEED + 1)
    if torch.equal(dropped, other):
        return math.inf
    q = lora_ops.effective_p(p, ones)
    sigma = math.sqrt(q * (1 - q) / ones.numel())
    return abs(dropped.float().mean().item() - (1 - q)) / sigma


def check_linear(
    kind: str, name: str, layer: Any, adapter: str, regime: torch.dtype | None
) -> CheckResult:
    """:class:`~loraforge.fast.lora_ops.LoraLinearFunction` against PEFT's forward of the
    ``lora.Linear`` (or, on a 4-bit base, ``lora.bnb.Linear4bit``) ``layer`` (see the module
    docstring)."""
    w = _Base(layer.base_layer)
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, 8, w.in_features, generator=gen, device=w.device).to(w.dtype)
    p = _configured_p(layer.lora_dropout[adapter])

    def want(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        params = {f"lora_A.{adapter}.weight": a, f"lora_B.{adapter}.weight": b}
        with _precision(w.device, regime), _seeded_dropout(layer, adapter, p, _SEED):
            out: torch.Tensor = torch.func.functional_call(layer, params, (x,))
        return out

    def got(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with _precision(w.device, regime):
            out: torch.Tensor = lora_linear(layer, adapter, regime, x, a, b, p, _SEED)
        return out

    inputs = [x, *_probe_adapter(layer, adapter, gen)]
    tol = tolerance(regime or w.dtype, w.device)
    rate = (p, x) if p > 0.0 else None
    return compare(kind, name, inputs, ("input", "lora_A", "lora_B"), want, got, tol, rate)


_MLP_PARTS = ("gate_up_proj", "down_proj")


class _Base:
    """What a check needs of a base layer: device, the dtype it computes in (a 4-bit weight's
    dequantized dtype), ``in_features``."""

    def __init__(self, base: Any) -> None:
        self.device = base.weight.device
        self.dtype = dense_dtype(base)
        self.in_features = int(base.in_features)


def check_mlp(
    kind: str, name: str, mlp: Any, adapters: tuple[str, str], regime: torch.dtype | None
) -> CheckResult:
    """:class:`~loraforge.fast.lora_ops.LoraSwiGLUFunction` against the MLP's own forward (which
    calls PEFT's forward of its two projections)."""
    layers = [getattr(mlp, part) for part in _MLP_PARTS]
    w = _Base(layers[0].base_layer)
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, 8, w.in_features, generator=gen, device=w.device).to(w.dtype)
    masks = tuple(
        (_configured_p(layer.lora_dropout[adapter]), _SEED + 2 * i)
        for i, (layer, adapter) in enumerate(zip(layers, adapters, strict=True))
    )
    keys = [
        f"{part}.lora_{ab}.{adapter}.weight"
        for part, adapter in zip(_MLP_PARTS, adapters, strict=True)
        for ab in "AB"
    ]

    def want(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        with (
            _precision(w.device, regime),
            _seeded_dropout(layers[0], adapters[0], *masks[0]),
            _seeded_dropout(layers[1], adapters[1], *masks[1]),
        ):
            out: torch.Tensor = torch.func.functional_call(
                mlp, dict(zip(keys, weights, strict=True)), (x,)
            )
        return out

    def got(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        with _precision(w.device, regime):
            out: torch.Tensor = lora_mlp(mlp, adapters, regime, x, weights, masks)
        return out

    inputs = [x]
    for layer, adapter in zip(layers, adapters, strict=True):
        inputs += _probe_adapter(layer, adapter, gen)
    labels = ("input", "gate_up lora_A", "gate_up lora_B", "down lora_A", "down lora_B")
    return compare(kind, name, inputs, labels, want, got, tolerance(regime or w.dtype, w.device))


def check_norm(kind: str, name: str, norm: Any) -> CheckResult:
    """:class:`~loraforge.fast.lora_ops.RMSNormFunction` against the norm's class's forward,
    input gradient included."""
    w = norm.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = (torch.randn(2, 8, w.shape[0], generator=gen, device=w.device) * 3).to(w.dtype)

    def want(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = type(norm).forward(norm, x)
        return out

    def got(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = lean_norm(norm, x)
        return out

    return compare(kind, name, [x], ("input",), want, got, tolerance(w.dtype, w.device))
