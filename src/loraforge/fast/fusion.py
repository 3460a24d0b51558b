"""Where the lean functions of :mod:`loraforge.fast.lora_ops` run: an allow-list, a numeric
check, and a report of the path each module takes.

A PEFT LoRA layer runs :class:`~loraforge.fast.lora_ops.LoraLinearFunction` only if everything
about it is on this allow-list (anything else, including whatever PEFT adds later, keeps PEFT's
own forward):

* the class is exactly PEFT's ``peft.tuners.lora.layer.Linear`` wrapping exactly
  ``torch.nn.Linear``, or exactly PEFT's ``peft.tuners.lora.bnb.Linear4bit`` wrapping exactly
  bitsandbytes' ``Linear4bit`` (QLoRA: the weight is dequantized inside the function, see
  :mod:`loraforge.fast.quant`; a weight bitsandbytes repacked for its CPU inference kernel, or whose
  compute dtype differs from the dtype it dequantizes to, is refused); its ``forward`` is
  ``(self, x, *args, **kwargs)``. An int8 base (``Linear8bitLt``) keeps PEFT's forward;
* every public attribute it holds is one PEFT 0.17-0.21 defines (:data:`_PEFT_ATTRIBUTES`), and
  it has no parameters or buffers of its own;
* one active adapter, adapters enabled, nothing merged; no DoRA (``use_dora``,
  ``lora_magnitude_vector``), no other variant (``lora_variant``, or any attribute whose name holds
  ``variant``), no ``lora_bias``, no embedding adapter; ``fan_in_fan_out``,
  ``is_target_conv_1d_layer`` and ``ephemeral_gpu_offload`` off, input casting on;
* ``lora_A``/``lora_B`` exactly ``nn.Linear`` without bias, of the layer's shapes; the dropout
  exactly ``nn.Dropout`` (``0 <= p < 1``) or ``nn.Identity``; the scaling a finite number; the base
  weight and bias frozen;
* no hooks on the layer, and none (nor a ``forward`` replaced on the instance, as accelerate's
  hooks do) on the modules whose calls the function replaces: base layer, ``lora_A``, ``lora_B``,
  dropout;
* dtypes (``autocast_dtype`` is the mixed precision training runs under): without autocast, input,
  base weight and adapter weights all of one dtype, float32, bfloat16 or float16; under autocast to
  bfloat16 or float16, each of them that dtype or float32 (PEFT's float32 adapters on a bfloat16
  base, for one). Anything else, e.g. float32 adapters on a bfloat16 base without autocast (where
  PEFT computes the adapter in float32), keeps PEFT's forward.

A ``gate_up_proj``/``down_proj`` MLP runs :class:`~loraforge.fast.lora_ops.LoraSwiGLUFunction`
when both projections qualify (same autocast, no bias, ``gate_up`` twice ``down``'s input), its
config's ``hidden_act`` is SiLU, it holds nothing but the two projections and one activation
module, and it has no hooks. A norm at a decoder layer's norm sites or the final norm runs
:class:`~loraforge.fast.lora_ops.RMSNormFunction` when it is a Llama-style RMSNorm
(:func:`~loraforge.fast.equivalence.rms_norm_refusal`) with no zero weight element.

Then one module of each kind is checked numerically (:mod:`loraforge.fast.equivalence`); a failed
kind keeps the model's forward. At each call an installed forward re-reads what can change later
(adapters disabled or merged, another active adapter, an unfrozen base, the input's dtype, the
autocast state, the dropout module, hooks, extra arguments such as PEFT's ``adapter_names``) and
hands that call to the class's forward if anything differs, counting it in
:attr:`FusionReport.fallback_calls`.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from loraforge.fast import lora_ops
from loraforge.fast.batched import adapter_weight
from loraforge.fast.equivalence import (
    CheckResult,
    check_linear,
    check_mlp,
    check_norm,
    rms_norm_refusal,
)
from loraforge.fast.kernels import current_device_of, on_device_of
from loraforge.fast.quant import base_refusal, dense_dtype

__all__ = ["FUSED", "FusionReport", "install", "norm_sites", "uninstall"]

logger = logging.getLogger(__name__)

FUSED = "fused"
"""The path :class:`FusionReport` gives a module that runs a lean function."""


@dataclass(slots=True)
class FusionReport:
    """What :func:`~loraforge.fast.lora_ops.apply_lean_functions` did, module by module.

    Attributes:
        layers: every PEFT LoRA layer's name -> ``"fused"`` or why it keeps PEFT's forward.
        mlps: every ``gate_up_proj``/``down_proj`` MLP -> ``"fused"`` (the whole MLP as one
            function) or why it keeps the model's forward.
        norms: every norm at a decoder layer's norm sites and the final norm -> ``"fused"`` (the
            lean norm) or why it keeps its own forward.
        checks: the numeric checks that ran, one per kind of module.
        fallback_calls: calls an installed function handed to the module's own forward because
            something changed after installation, by ``"<module's last name>: <reason>"``;
            counted while the model runs.
    """

    layers: dict[str, str] = field(default_factory=dict)
    mlps: dict[str, str] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    fallback_calls: Counter[str] = field(default_factory=Counter)

    @property
    def fused_layers(self) -> int:
        """How many LoRA layers run the lean function (alone or inside a fused MLP)."""
        return sum(v == FUSED for v in self.layers.values())

    @property
    def fused_mlps(self) -> int:
        """How many MLPs run as one function."""
        return sum(v == FUSED for v in self.mlps.values())

    @property
    def lean_norms(self) -> int:
        """How many norms run the lean norm."""
        return sum(v == FUSED for v in self.norms.values())

    def summary(self) -> list[str]:
        """The lines logged, e.g. ``"fused 157 of 160 LoRA layers; PEFT forward for 3: o_proj
        x3 (DoRA)"``."""
        lines = []
        if self.layers:
            lines.append(_summarise(self.layers, "LoRA layers", "PEFT forward"))
        if self.mlps:
            lines.append(_summarise(self.mlps, "SwiGLU MLPs as one function", "model's forward"))
        if self.norms:
            lines.append(_summarise(self.norms, "decoder norms as lean norms", "own forward"))
        if self.checks:
            passed = [c for c in self.checks if c.passed]
            worst = max((c.worst for c in passed), default=0.0)
            lines.append(
                f"numeric check against the model's own forward: {len(passed)} of "
                f"{len(self.checks)} kinds passed (largest relative error {worst:.1e})"
            )
        return lines


def _summarise(paths: dict[str, str], what: str, other: str) -> str:
    n = sum(v == FUSED for v in paths.values())
    line = f"fused {n} of {len(paths)} {what}"
    rest = Counter(
        (name.rsplit(".", 1)[-1], reason) for name, reason in paths.items() if reason != FUSED
    )
    if rest:
        parts = [f"{leaf} x{count} ({reason})" for (leaf, reason), count in sorted(rest.items())]
        line += f"; {other} for {len(paths) - n}: " + ", ".join(parts)
    return line


# --------------------------------------------------------------------------- the allow-list

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_AUTOCAST = (torch.bfloat16, torch.float16)

# The public attributes of PEFT's lora.Linear, 0.17 to 0.21. r, lora_alpha and use_rslora are
# folded into scaling, read at each call; the features that change the computation are checked to
# be off for the active adapter; the rest is bookkeeping.
# fmt: off
_PEFT_ATTRIBUTES = frozenset((
    "base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "r", "lora_alpha", "use_rslora",
    "use_dora", "lora_magnitude_vector", "lora_variant", "lora_bias", "lora_embedding_A",
    "lora_embedding_B", "fan_in_fan_out", "is_target_conv_1d_layer", "cast_input_dtype_enabled",
    "ephemeral_gpu_offload", "merged_adapters", "in_features", "out_features", "kwargs", "training",
    "adapter_layer_names", "other_param_names",  # class attributes PEFT sets on DoRA instances
))
# fmt: on


@dataclass(frozen=True, slots=True)
class _LinearPlan:
    """A LoRA layer admitted to the lean function: its adapter, and the autocast dtype (or
    None) it was admitted and checked for."""

    adapter: str
    regime: torch.dtype | None


def _name(dtype: torch.dtype | None) -> str:
    return "no autocast" if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_refusal(
    x: torch.dtype, w: torch.dtype, a: torch.dtype, b: torch.dtype, regime: torch.dtype | None
) -> str | None:
    """Why the lean function would not compute what PEFT computes for these dtypes of input, base
    weight and adapter weights under ``regime`` (an autocast dtype, or None), or None."""
    if regime is None and x == w == a == b and w in _FLOATS:
        return None
    if regime in _AUTOCAST and all(d in (regime, torch.float32) for d in (x, w, a, b)):
        return None
    under = "without autocast" if regime is None else f"under autocast to {_name(regime)}"
    return f"input {_name(x)}, base {_name(w)}, adapter {_name(a)}/{_name(b)} {under}"


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has hooks, or a ``forward`` set on the instance (a patch, accelerate's
    hook), that a fused function, which does not call ``m``, would skip."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in vars(m)
        or hasattr(m, "_hf_hook")
    )


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < float("inf")


def _replaced(m: nn.Module) -> bool:
    """Whether ``forward`` is set on the instance by someone other than loraforge."""
    return "forward" in vars(m) and not isinstance(vars(m)["forward"], _Installed)


def _signature_ok(lora_linear: Any) -> bool:
    """Whether PEFT's ``Linear.forward`` is ``(self, x, *args, **kwargs)``, as written for."""
    params = list(inspect.signature(lora_linear.forward).parameters.values())
    kinds = [p.kind for p in params[2:]]
    var = [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    return [p.name for p in params[:2]] == ["self", "x"] and kinds == var


def _plan_linear(
    layer: Any, lora_classes: dict[type, bool], regime: torch.dtype | None
) -> _LinearPlan | str:
    """A plan if every property of the PEFT layer is on the allow-list, else the first that is
    not (a short reason for the report). ``lora_classes``: the PEFT classes admitted, each with
    whether its forward's signature is as written for."""
    base = layer.base_layer
    if type(layer) not in lora_classes:
        if type(base).__name__ == "Linear8bitLt":
            return base_refusal(base) or "int8 base layer"
        return f"{type(layer).__name__} layer"
    if not lora_classes[type(layer)]:
        return "PEFT's forward signature changed"
    reason = base_refusal(base)
    if reason:
        return reason
    if (type(base) is nn.Linear) != (type(layer).__module__ == "peft.tuners.lora.layer"):
        return f"{type(layer).__name__} on a base layer {type(base).__name__}"
    names = sorted(k for k in (*vars(layer), *layer._modules) if not k.startswith("_"))
    unknown = [k for k in names if k not in _PEFT_ATTRIBUTES]
    if unknown:
        return f"unknown PEFT attribute {unknown[0]!r}"
    if layer._parameters or layer._buffers:
        return "parameters outside the adapters"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    if name not in layer.lora_A or name not in layer.lora_B:
        return "no adapter weights"
    if layer.use_dora.get(name) or name in layer.lora_magnitude_vector:
        return "DoRA"
    if name in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[name]).__name__}"
    variants = [k for k, v in vars(layer).items() if "variant" in k and k != "lora_variant" and v]
    if variants:
        return f"variant attribute {variants[0]!r}"
    if name in layer.lora_embedding_A or name in layer.lora_embedding_B:
        return "embedding adapter"
    if layer.lora_bias.get(name):
        return "lora_bias"
    for flag, wanted in (
        ("fan_in_fan_out", False),
        ("is_target_conv_1d_layer", False),
        ("ephemeral_gpu_offload", False),
        ("cast_input_dtype_enabled", True),
    ):
        if getattr(layer, flag, wanted) is not wanted:
            return f"{flag}={not wanted}"
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if {type(a), type(b)} != {nn.Linear} or a.bias is not None or b.bias is not None:
        return "lora_A/lora_B not bias-free nn.Linear"
    shapes = (a.in_features, b.out_features, b.in_features)
    if shapes != (base.in_features, base.out_features, a.out_features):
        return "adapter shapes"
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout {type(dropout).__name__}"
    if type(dropout) is nn.Dropout and not 0.0 <= dropout.p < 1.0:
        return f"dropout p={dropout.p}"
    if not _is_number(layer.scaling.get(name)):
        return f"scaling {layer.scaling.get(name)!r}"
    if any(p.requires_grad for p in base.parameters()):
        return "trained base weight"
    w = dense_dtype(base)
    if base.bias is not None and base.bias.dtype != w:
        return "base bias dtype"
    reason = _dtype_refusal(w, w, a.weight.dtype, b.weight.dtype, regime)
    if reason:
        return reason
    if _replaced(layer):
        return "forward replaced on the instance"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return "hooks on the layer"
    for label, m in (("base layer", base), ("lora_A", a), ("lora_B", b), ("dropout", dropout)):
        if _hooked(m):
            return f"hooks on {label}"
    return _LinearPlan(name, regime)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _call_refusal(layer: Any, plan: _LinearPlan, x: torch.Tensor) -> str | None:
    """Why this call of an installed layer must run PEFT's forward (what may have changed since
    installation), or None."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged_adapters:
        return "adapter merged"
    if layer.active_adapters != [plan.adapter]:
        return "active adapter changed"
    base = layer.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "trained base weight"
    regime = _autocast_dtype(x)
    if regime != plan.regime:
        return f"{_name(regime)} (installed for {_name(plan.regime)})"
    if type(base) is not nn.Linear:  # 4-bit: e.g. repacked by bitsandbytes' CPU inference kernel
        reason = base_refusal(base)
        if reason:
            return reason
    name = plan.adapter
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    reason = _dtype_refusal(x.dtype, dense_dtype(base), a.weight.dtype, b.weight.dtype, regime)
    if reason:
        return reason
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout {type(dropout).__name__}"
    if not _is_number(layer.scaling.get(name)):
        return "scaling"
    if any(_hooked(m) for m in (base, a, b, dropout)):
        return "hooks added"
    return None


def _dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if type(dropout) is nn.Dropout and dropout.training else 0.0


_MLP_PARTS = ("gate_up_proj", "down_proj")


def _plan_mlp(mlp: nn.Module, plans: dict[int, _LinearPlan]) -> tuple[_LinearPlan, ...] | str:
    """The plans of an MLP's two projections if the whole MLP may run as one function, else why
    not."""
    gate_up, down = (mlp._modules[k] for k in _MLP_PARTS)
    pair = [plans.get(id(m)) for m in (gate_up, down)]
    if pair[0] is None or pair[1] is None:
        return "a projection keeps PEFT's forward"
    if pair[0].regime != pair[1].regime:
        return "projections admitted for different autocast"
    g: Any = gate_up.base_layer  # type: ignore[union-attr]
    d: Any = down.base_layer  # type: ignore[union-attr]
    if g.bias is not None or d.bias is not None:
        return "projection bias"
    if g.out_features != 2 * d.in_features or dense_dtype(g) != dense_dtype(d):
        return "shapes are not gate_up -> down"
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"activation {act!r}"
    others = [m for k, m in mlp._modules.items() if k not in _MLP_PARTS]
    if len(others) > 1 or mlp._parameters or mlp._buffers:
        return "more than gate_up_proj, down_proj and the activation"
    if _replaced(mlp):
        return "forward replaced on the instance"
    hooked = mlp._forward_hooks or mlp._forward_pre_hooks
    if hooked or any(m is not None and _hooked(m) for m in others):
        return "hooks"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (gate_up, down) if m is not None):
        return "hooks on a projection"
    return (pair[0], pair[1])


# --------------------------------------------------------------------------- norms

# Where a norm's output is kept anyway by the layer that reads it: the decoder layer's two norms
# (read by the adapted qkv projection and the MLP) and the final norm (read by lm_head). Not, for
# example, Qwen3's q_norm/k_norm, whose output RoPE may overwrite in place.
_LEAN_NORM_SITES = frozenset({"input_layernorm", "post_attention_layernorm", "norm"})


def norm_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(name, module, why not lean or None)`` for each module at a lean norm site (or
    ``model`` itself, if it has a weight: a lone norm)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _LEAN_NORM_SITES or (not name and hasattr(module, "weight")):
            yield name or type(module).__name__, module, _lean_norm_refusal(module)


def _lean_norm_refusal(module: nn.Module) -> str | None:
    reason = rms_norm_refusal(module)
    if reason:
        return reason
    w: Any = module.weight
    if bool((w == 0).any()):
        return "a zero weight element"  # output / weight recovers the input only where w != 0
    if _replaced(module) or module._forward_hooks or module._forward_pre_hooks:
        return "hooks or a forward replaced on the instance"
    return None


# --------------------------------------------------------------------------- installed forwards


class _Installed:
    """A forward installed as ``module.forward`` on one instance; a call outside what was
    admitted and checked runs the class's forward."""

    group: ClassVar[str] = ""

    def __init__(self, module: nn.Module, report: FusionReport, label: str) -> None:
        self.module, self.report, self.label = module, report, label

    def _own(self, reason: str, x: Any, args: Any, kwargs: Any) -> Any:
        key = f"{self.label}: {reason}"
        if key not in self.report.fallback_calls:
            logger.info("%s: its own forward for calls with %s", self.label, reason)
        self.report.fallback_calls[key] += 1
        return type(self.module).forward(self.module, x, *args, **kwargs)


class _FusedLinear(_Installed):
    group = "lora"

    def __init__(self, module: nn.Module, report: FusionReport, label: str, plan: _LinearPlan):
        super().__init__(module, report, label)
        self.plan = plan

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        m: Any = self.module
        reason = "extra arguments" if args or kwargs else _call_refusal(m, self.plan, x)
        if reason:
            return self._own(reason, x, args, kwargs)
        name = self.plan.adapter
        p = _dropout_p(m.lora_dropout[name])
        seed = lora_ops.new_seed(x.device) if p > 0.0 else 0
        a = adapter_weight(m.lora_A[name].weight)
        b = adapter_weight(m.lora_B[name].weight)
        with current_device_of(x):  # Triton launches on the current device
            return lora_ops.lora_linear(m, name, self.plan.regime, x, a, b, p, seed)


class _FusedMLP(_Installed):
    group = "lora"

    def __init__(
        self, module: nn.Module, report: FusionReport, label: str, plans: tuple[_LinearPlan, ...]
    ):
        super().__init__(module, report, label)
        self.plans = plans
        self.recompute = False  # set by recompute_mlps: gate_up's output recomputed, not kept

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mlp: Any = self.module
        parts = [mlp.gate_up_proj, mlp.down_proj]
        reason = "extra arguments" if args or kwargs else None
        for proj, plan in zip(parts, self.plans, strict=True):
            reason = reason or _call_refusal(proj, plan, x)
            if proj._forward_hooks or proj._forward_pre_hooks or _replaced(proj):
                reason = reason or "hooks on a projection"
        others = [m for k, m in mlp._modules.items() if k not in _MLP_PARTS and m is not None]
        if not reason and any(_hooked(m) for m in others):
            reason = "hooks added"
        if reason:
            return self._own(reason, x, args, kwargs)
        masks, weights = [], []
        for proj, plan in zip(parts, self.plans, strict=True):
            p = _dropout_p(proj.lora_dropout[plan.adapter])
            masks.append((p, lora_ops.new_seed(x.device) if p > 0.0 else 0))
            weights += [proj.lora_A[plan.adapter].weight, proj.lora_B[plan.adapter].weight]
        weights = [adapter_weight(w) for w in weights]
        adapters = (self.plans[0].adapter, self.plans[1].adapter)
        regime = self.plans[0].regime
        with current_device_of(x):  # Triton launches on the current device
            return lora_ops.lora_mlp(
                mlp, adapters, regime, x, tuple(weights), tuple(masks), self.recompute
            )


class _LeanNorm(_Installed):
    group = "norm"

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        w: Any = self.module.weight
        reason = None
        if args or kwargs:
            reason = "extra arguments"
        elif w.requires_grad:
            reason = "a trained weight"
        elif x.dtype != w.dtype:
            reason = f"input {_name(x.dtype)} on a {_name(w.dtype)} weight"
        if reason:
            return self._own(reason, x, args, kwargs)
        with current_device_of(x):  # Triton launches on the current device
            return lora_ops.lean_norm(self.module, x)


def uninstall(model: nn.Module, groups: tuple[str, ...]) -> int:
    """Remove the installed forwards of ``groups`` (``"lora"``, ``"norm"``) from ``model``'s
    modules; returns how many."""
    n = 0
    for module in model.modules():
        installed = vars(module).get("forward")
        if isinstance(installed, _Installed) and installed.group in groups:
            del module.forward
            n += 1
    return n


def recompute_mlps(model: nn.Module, count: int) -> int:
    """Have the first ``count`` fused SwiGLU MLPs of ``model`` (in module order) recompute their
    ``gate_up`` output in the backward pass instead of keeping it, and the others keep it
    (:class:`~loraforge.fast.lora_ops.LoraSwiGLUFunction`); returns how many recompute. Set it
    before any CUDA graph of the layers is captured: a graph replays what it captured.

    Raises:
        ValueError: ``count`` is negative.
    """
    if count < 0:
        raise ValueError(f"recompute_mlps: count must be >= 0, got {count}")
    fused = [f for m in model.modules() if isinstance(f := vars(m).get("forward"), _FusedMLP)]
    for i, forward in enumerate(fused):
        forward.recompute = i < count
    return min(count, len(fused))


def fused_adapter_weights(module: nn.Module) -> list[torch.Tensor]:
    """The LoRA weights (A and B of the admitted adapter) of the layers under ``module`` whose
    forward is a fused LoRA function, in module order, each once."""
    found: dict[int, torch.Tensor] = {}
    for m in module.modules():
        installed = vars(m).get("forward")
        if isinstance(installed, _FusedLinear):
            pairs: list[tuple[Any, _LinearPlan]] = [(m, installed.plan)]
        elif isinstance(installed, _FusedMLP):
            parts: Any = m
            pairs = list(zip((parts.gate_up_proj, parts.down_proj), installed.plans, strict=True))
        else:
            continue
        for layer, plan in pairs:
            for w in (layer.lora_A[plan.adapter].weight, layer.lora_B[plan.adapter].weight):
                found.setdefault(id(w), w)
    return list(found.values())


# --------------------------------------------------------------------------- installing


def install(
    model: nn.Module,
    *,
    lora: bool,
    norms: bool,
    verify: bool,
    autocast_dtype: torch.dtype | None,
) -> FusionReport:
    """What :func:`~loraforge.fast.lora_ops.apply_lean_functions` does (``lora``: LoRA layers
    and MLPs; ``norms``: the norms)."""
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST:
        raise ValueError(
            f"autocast_dtype={autocast_dtype}: use None, torch.bfloat16 or torch.float16"
        )
    uninstall(model, (("lora",) if lora else ()) + (("norm",) if norms else ()))
    report = FusionReport()
    named = dict(model.named_modules())
    installs: list[tuple[nn.Module, _Installed]] = []
    if lora:
        installs += _plan_lora(named, report, verify, autocast_dtype)
    if norms:
        installs += _plan_norms(model, report, verify)
    for module, installed in installs:
        module.forward = installed  # type: ignore[assignment]
    for line in report.summary():
        logger.info("lean functions: %s", line)
    return report


def _verify(
    report: FusionReport,
    paths: dict[str, str],
    kinds: dict[str, list[str]],
    check: Callable[[str, str], CheckResult],
    own: str,
    module_of: Callable[[str], nn.Module],
) -> None:
    """Check each kind on its first module (with that module's CUDA device current, where the
    lean functions' Triton kernels launch); a failed kind's modules get the path ``"numeric
    check failed"`` and a warning names the module and the error."""
    for kind, names in kinds.items():
        with on_device_of(module_of(names[0])):
            result = check(kind, names[0])
        report.checks.append(result)
        if result.passed:
            continue
        logger.warning(
            "lean function for %s differs from the model's own forward on %s: %s; %d module(s) "
            "of this kind keep %s",
            kind,
            names[0],
            result.describe(),
            len(names),
            own,
        )
        for name in names:
            paths[name] = "numeric check failed"


def _plan_lora(
    named: dict[str, nn.Module],
    report: FusionReport,
    verify: bool,
    regime: torch.dtype | None,
) -> list[tuple[nn.Module, _Installed]]:
    from peft.tuners.lora.layer import LoraLayer

    lora_classes = {cls: _signature_ok(cls) for cls in _lora_classes()}
    plans: dict[str, _LinearPlan] = {}
    for name, module in named.items():
        if isinstance(module, LoraLayer):
            plan = _plan_linear(module, lora_classes, regime)
            report.layers[name] = FUSED if isinstance(plan, _LinearPlan) else plan
            if isinstance(plan, _LinearPlan):
                plans[name] = plan
    if verify:
        kinds: dict[str, list[str]] = {}
        for name, plan in plans.items():
            kinds.setdefault(_linear_kind(named[name], plan), []).append(name)
        _verify(
            report,
            report.layers,
            kinds,
            lambda kind, n: check_linear(kind, n, named[n], plans[n].adapter, plans[n].regime),
            "PEFT's forward",
            named.__getitem__,
        )
    admitted = {id(named[n]): p for n, p in plans.items() if report.layers[n] == FUSED}
    mlps: dict[str, tuple[_LinearPlan, ...]] = {}
    for name, module in named.items():
        if all(isinstance(module._modules.get(k), LoraLayer) for k in _MLP_PARTS):
            pair = _plan_mlp(module, admitted)
            report.mlps[name] = pair if isinstance(pair, str) else FUSED
            if not isinstance(pair, str):
                mlps[name] = pair
    if verify:
        kinds = {}
        for name, pair in mlps.items():
            kinds.setdefault(_mlp_kind(named[name], pair), []).append(name)
        _verify(
            report,
            report.mlps,
            kinds,
            lambda kind, n: check_mlp(
                kind, n, named[n], (mlps[n][0].adapter, mlps[n][1].adapter), mlps[n][0].regime
            ),
            "the model's forward",
            named.__getitem__,
        )
    installs: list[tuple[nn.Module, _Installed]] = []
    for name, plan in plans.items():
        if report.layers[name] == FUSED:
            leaf = name.rsplit(".", 1)[-1]
            installs.append((named[name], _FusedLinear(named[name], report, leaf, plan)))
    for name, pair in mlps.items():
        if report.mlps[name] == FUSED:
            installs.append((named[name], _FusedMLP(named[name], report, "mlp", pair)))
    return installs


def _lora_classes() -> list[type]:
    """PEFT's LoRA layer classes the lean functions take: ``lora.Linear``, and with bitsandbytes
    installed ``lora.bnb.Linear4bit``."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from loraforge.fast.quant import bitsandbytes_available

    classes: list[type] = [LoraLinear]
    if bitsandbytes_available():
        try:
            from peft.tuners.lora.bnb import Linear4bit
        except ImportError:  # a PEFT without bitsandbytes support
            return classes
        classes.append(Linear4bit)
    return classes


def _base_name(base: Any) -> str:
    """``"float32"``, or ``"nf4->bfloat16"`` for a 4-bit weight dequantized to bfloat16."""
    dtype = _name(dense_dtype(base))
    if type(base) is nn.Linear:
        return dtype
    return f"{getattr(base.weight, 'quant_type', '4-bit')}->{dtype}"


def _configured_p(dropout: nn.Module) -> float:
    return float(dropout.p) if type(dropout) is nn.Dropout else 0.0


def _linear_kind(layer: Any, plan: _LinearPlan) -> str:
    w, a = layer.base_layer.weight, layer.lora_A[plan.adapter].weight
    bias = " with bias" if layer.base_layer.bias is not None else ""
    dropout = " dropout" if _configured_p(layer.lora_dropout[plan.adapter]) > 0 else ""
    return (
        f"LoRA linear {layer.in_features}->{layer.out_features}{bias} base "
        f"{_base_name(layer.base_layer)} "
        f"adapter {_name(a.dtype)}{dropout}, {_name(plan.regime)}, on {w.device.type}"
    )


def _mlp_kind(mlp: Any, pair: tuple[_LinearPlan, ...]) -> str:
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    w, a = gate_up.base_layer.weight, gate_up.lora_A[pair[0].adapter].weight
    drops = [
        _configured_p(proj.lora_dropout[plan.adapter]) > 0
        for proj, plan in zip((gate_up, down), pair, strict=True)
    ]
    return (
        f"SwiGLU MLP {gate_up.in_features}->{down.in_features}->{down.out_features} base "
        f"{_base_name(gate_up.base_layer)} adapter {_name(a.dtype)}"
        f"{' dropout' if any(drops) else ''}, "
        f"{_name(pair[0].regime)}, on {w.device.type}"
    )


def _plan_norms(
    model: nn.Module, report: FusionReport, verify: bool
) -> list[tuple[nn.Module, _Installed]]:
    sites = {}
    for name, module, reason in norm_sites(model):
        sites[name] = module
        report.norms[name] = reason or FUSED
    if verify:
        kinds: dict[str, list[str]] = {}
        for name, path in report.norms.items():
            if path == FUSED:
                norm: Any = sites[name]
                w = norm.weight
                kind = (
                    f"RMSNorm {w.shape[0]} {_name(w.dtype)} ({type(norm).__name__}), "
                    f"on {w.device.type}"
                )
                kinds.setdefault(kind, []).append(name)
        _verify(
            report,
            report.norms,
            kinds,
            lambda kind, n: check_norm(kind, n, sites[n]),
            "their own forward",
            sites.__getitem__,
        )
    return [
        (sites[n], _LeanNorm(sites[n], report, n.rsplit(".", 1)[-1]))
        for n, path in report.norms.items()
        if path == FUSED
    ]
