"""Liger-Kernel on one model instance, without process-wide patches.

:func:`apply_liger` replaces *modules of the model instance it is given* with Liger-Kernel's
modules, and nothing else:

* each Llama-style RMSNorm (identified by structure and value,
  :func:`~loraforge.fast.equivalence.rms_norm_refusal`, not by class name) by a ``LigerRMSNorm``
  holding the same weight parameter (offset 0, Llama casting, not in place);
* each SwiGLU MLP of ``gate_up_proj``/``down_proj`` (Phi-3) or ``gate_proj``/``up_proj``/
  ``down_proj`` (Llama) by ``LigerPhi3SwiGLUMLP``/``LigerSwiGLUMLP`` holding the same projection
  modules.

Each kind of replacement is first checked against the module it replaces on a small random batch
(output and input gradient, :func:`~loraforge.fast.equivalence.compare`); one that differs, or
cannot be built or run, is not made, with a warning. With ``skip_lean=True`` (the path with
``fused_lora``), what loraforge's lean functions take is left to them, because they keep less
memory: the norms :func:`~loraforge.fast.lora_ops.lean_norm_candidates` finds and the Phi-3 MLPs
(run as one function when LoRA adapts both projections, as ``target_modules: all-linear`` does).

What is never done: assigning to an attribute of a transformers module or class (Liger's
``apply_liger_kernel_to_*`` functions replace ``modeling_phi3.Phi3RMSNorm``,
``modeling_phi3.apply_rotary_pos_emb`` and others for the whole process), calling Liger's private
``_apply_liger_kernel_to_instance``, Liger's losses (loraforge's loss computes logits only where
they are supervised).

**RoPE**: Liger's rotary embedding can reach Phi-3 only through
``modeling_phi3.apply_rotary_pos_emb``, a function of transformers' module that every model in the
process calls, so loraforge's fast path keeps transformers' RoPE; its cost is in the benchmarks.

**The default path**: on Phi-3/Phi-4 with ``fused_lora`` and LoRA on every linear layer, the lean
norms take every norm and the lean SwiGLU every MLP, so ``apply_liger(model, skip_lean=True)``
replaces nothing and ``liger_kernels: auto`` is a no-op there. Liger helps where the lean functions
do not apply: ``fused_lora: false``, Llama-layout MLPs, norms with a zero weight element.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loraforge.fast.equivalence import compare, rms_norm_refusal, tolerance
from loraforge.fast.lora_ops import lean_norm_candidates, norm_eps

__all__ = ["apply_liger", "liger_available"]

logger = logging.getLogger(__name__)

# the MLP layouts Liger has a module for: its children's names -> Liger's class
_SWIGLU_LAYOUTS = {
    ("gate_up_proj", "down_proj"): "LigerPhi3SwiGLUMLP",
    ("gate_proj", "up_proj", "down_proj"): "LigerSwiGLUMLP",
}
_PHI3_LAYOUT = ("gate_up_proj", "down_proj")


def liger_available() -> bool:
    """Whether Liger-Kernel can be used here (installed, and a CUDA device)."""
    import importlib.util

    import torch

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def apply_liger(model: nn.Module, *, skip_lean: bool = True) -> list[str]:
    """Replace this model instance's RMSNorm and SwiGLU MLP modules with Liger-Kernel's.

    Call on the base model before ``get_peft_model`` (the projections are moved into Liger's MLP
    modules under their own names, so PEFT's target modules still match).

    Args:
        model: the model; only its own modules are changed.
        skip_lean: leave to the lean functions of :mod:`loraforge.fast.lora_ops` what they will
            take (``True`` when the recipe's ``fused_lora`` is on).

    Returns:
        The names of the modules replaced (empty on the default Phi-3 path; see the module
        docstring).

    Raises:
        RecipeError: Liger-Kernel is not installed.
    """
    try:
        import liger_kernel.transformers as liger
    except ImportError as exc:
        from loraforge.errors import RecipeError

        raise RecipeError(
            [
                f"liger_kernels: Liger-Kernel cannot be imported ({exc}); "
                "pip install 'loraforge[gpu]', or set liger_kernels: off"
            ]
        ) from exc
    lean = {id(m) for m in lean_norm_candidates(model)} if skip_lean else set()
    config = getattr(model, "config", None)
    checked: dict[str, bool] = {}  # kind -> whether Liger's module matched on the probe
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            build = _replacement(liger, child, config, skip_lean, id(child) in lean)
            if build is None:
                continue
            kind, make = build
            new = _build(make, name)
            if new is None:
                continue
            if kind not in checked:
                checked[kind] = _same(child, new, kind, name)
            if checked[kind]:
                setattr(parent, child_name, new)  # this instance's child, nothing shared
                replaced.append(name)
    logger.info("Liger-Kernel: %d modules replaced%s", len(replaced), _examples(replaced))
    return replaced


def _replacement(
    liger: Any, module: nn.Module, config: Any, skip_lean: bool, lean: bool
) -> tuple[str, Callable[[], nn.Module]] | None:
    """``(kind, build)`` for the Liger module that would replace ``module``, or None."""
    parts = tuple(k for k in module._modules if k.endswith("_proj"))
    layout = _SWIGLU_LAYOUTS.get(parts)
    if layout is not None:
        if skip_lean and parts == _PHI3_LAYOUT:
            return None  # the lean SwiGLU function takes it
        others = [k for k in module._modules if k not in parts]
        if len(others) > 1 or module._parameters:
            return None
        cfg = getattr(module, "config", None) or config
        w: Any = getattr(module, parts[0]).weight
        kind = f"{layout} {tuple(w.shape)} {w.dtype}"
        return kind, lambda: _liger_mlp(getattr(liger, layout), module, parts, cfg)
    if lean or rms_norm_refusal(module) is not None:
        return None
    w = module.weight
    kind = f"LigerRMSNorm {w.shape[0]} {w.dtype} ({type(module).__name__})"
    return kind, lambda: _liger_norm(liger.LigerRMSNorm, module)


def _liger_norm(cls: Any, norm: nn.Module) -> nn.Module:
    w: Any = norm.weight
    with torch.device("meta"):  # no weight allocated: the norm's own parameter is moved in
        new: nn.Module = cls(
            w.shape[0], eps=norm_eps(norm), offset=0.0, casting_mode="llama", in_place=False
        )
    new.weight = w
    return new.train(norm.training)


def _liger_mlp(cls: Any, mlp: nn.Module, parts: tuple[str, ...], config: Any) -> nn.Module:
    with torch.device("meta"):  # no projection allocated: the MLP's own are moved in
        new: nn.Module = cls(config)
    for part in parts:
        setattr(new, part, getattr(mlp, part))
    if any(t.is_meta for t in (*new.parameters(), *new.buffers())):
        raise ValueError(f"{type(new).__name__} has parts besides {', '.join(parts)}")
    return new.train(mlp.training)


def _build(make: Callable[[], nn.Module], name: str) -> nn.Module | None:
    try:
        return make()
    except Exception as exc:  # this Liger version's module does not fit this one
        logger.warning("Liger-Kernel: %s kept (%s: %s)", name, type(exc).__name__, exc)
        return None


def _same(old: nn.Module, new: nn.Module, kind: str, name: str) -> bool:
    """Whether ``new`` computes what ``old`` computes (output and input gradient) on a small
    random batch; a warning names the module and the error if not."""
    w = next(old.parameters())
    hidden = w.shape[-1]
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, 8, hidden, generator=gen, device=w.device).to(w.dtype)
    result = compare(kind, name, [x], ("input",), old, new, tolerance(w.dtype, w.device))
    if not result.passed:
        logger.warning(
            "Liger-Kernel: %s differs from the module it would replace on %s (%s); kept",
            kind,
            name,
            result.describe(),
        )
    return result.passed


def _examples(names: list[str]) -> str:
    if not names:
        return ""
    return f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
