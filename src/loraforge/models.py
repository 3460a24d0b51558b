"""Model and tokenizer loading, and LoRA target-module resolution.

The self-llm tutorial lists ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``
as LoRA targets. Phi-4 fuses its attention into ``qkv_proj`` and its MLP into ``gate_up_proj``,
so five of those seven names match nothing and PEFT silently adapts only ``o_proj`` and
``down_proj``. [`resolve_target_modules`][loraforge.models.resolve_target_modules] makes that
impossible: ``"all-linear"`` resolves to the model's real linear layers, and any explicit name that
matches no module is an error listing the model's linear modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .errors import TargetModulesError

__all__ = ["linear_module_names", "resolve_target_modules"]

logger = logging.getLogger(__name__)


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # GPT-2 style Conv1D and quantized linears (bitsandbytes, ...) are also adapted by PEFT
    name = type(module).__name__
    return name in ("Conv1D", "Linear8bitLt", "Linear4bit")


def linear_module_names(model: Any) -> list[str]:
    """Sorted leaf names of the model's linear layers, the output head excluded
    (e.g. ``['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']`` for Phi-3/Phi-4)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        full.rsplit(".", 1)[-1]
        for full, module in model.named_modules()
        if _is_linear(module) and module is not head
    }
    return sorted(names)


def resolve_target_modules(model: Any, target_modules: str | Sequence[str]) -> list[str]:
    """Turn a recipe's ``target_modules`` into module names that all exist in ``model``.

    Args:
        model: a ``torch.nn.Module`` (before LoRA is applied).
        target_modules: ``"all-linear"``, or module names (leaf names such as ``"qkv_proj"``,
            or dotted suffixes such as ``"self_attn.qkv_proj"``).

    Returns:
        The sorted module names to hand to ``peft.LoraConfig(target_modules=...)``.

    Raises:
        TargetModulesError: any name matches no module (all unmatched names are listed with the
            model's linear module names), or a name matches only non-linear modules.
    """
    linear = linear_module_names(model)
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            target_modules = [target_modules]
        else:
            if not linear:
                raise TargetModulesError(f"{type(model).__name__} has no linear layer to adapt")
            return linear
    requested = list(dict.fromkeys(target_modules))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = list(model.named_modules())
    unmatched, not_linear = [], []
    for key in requested:
        hits = [m for full, m in modules if full == key or full.endswith("." + key)]
        if not hits:
            unmatched.append(key)
        elif not any(_is_linear(m) or m is head for m in hits):
            not_linear.append(f"{key} ({type(hits[0]).__name__})")
    if unmatched or not_linear:
        parts = []
        if unmatched:
            parts.append(f"these target_modules match no module of {type(model).__name__}: "
                         f"{', '.join(unmatched)}")
        if not_linear:
            parts.append(f"these are not linear layers: {', '.join(not_linear)}")
        raise TargetModulesError(
            "; ".join(parts) + f". The model's linear modules are: {', '.join(linear)} "
            "(or use target_modules: all-linear)."
        )
    return sorted(requested)
