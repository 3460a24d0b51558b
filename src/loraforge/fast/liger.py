"""Liger-Kernel's fused RMSNorm, SwiGLU and RoPE on a loaded model (``liger_kernels``)."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["apply_liger", "liger_available"]


def liger_available() -> bool:
    """Whether Liger-Kernel can be used here (installed, and a CUDA device)."""
    import importlib.util

    import torch

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def apply_liger(model: Any) -> None:
    """Patch a loaded model instance with Liger-Kernel's fused RMSNorm, SwiGLU and RoPE (the loss
    stays loraforge's, which computes logits only at supervised positions). With ``fused_lora``
    the lean LoRA functions and norms of :mod:`loraforge.lora_ops` then take over the MLPs and norms
    they apply to."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    params = inspect.signature(_apply_liger_kernel_to_instance).parameters
    kwargs = {k: False for k in ("cross_entropy", "fused_linear_cross_entropy") if k in params}
    _apply_liger_kernel_to_instance(model=model, **kwargs)
