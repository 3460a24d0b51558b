"""LoRA variants through PEFT: DoRA, rsLoRA, PiSSA/OLoRA initialisation and LoRA+.

Each is PEFT's own: [`lora_config`][loraforge.variants.lora_config] turns the recipe's
``use_dora``, ``use_rslora`` and ``lora_init`` into PEFT's ``LoraConfig``;
[`loraplus_optimizer`][loraforge.variants.loraplus_optimizer] builds the optimizer with PEFT's
``create_loraplus_optimizer``. Nothing of PEFT is changed.

What each does to the GPU fast path is decided by the allow-list in
`loraforge.fast.fusion`, layer by layer, and logged: rsLoRA changes only
the scaling (``lora_alpha / sqrt(lora_r)``), which the lean functions read from the layer, so its
layers run them (checked numerically against PEFT's forward like any other); PiSSA and OLoRA change
only the starting values of A, B and the base weight, so their layers run them too; DoRA layers
keep PEFT's forward (``"DoRA"`` in the run log's ``PEFT forward for ...`` line).

PiSSA and OLoRA subtract the starting adapter from the base weight. A run saves that starting
adapter in [`INITIAL_ADAPTER`][loraforge.variants.INITIAL_ADAPTER] before the first step, and the
final adapter is saved with PEFT's ``path_initial_model_for_weight_conversion``: a plain LoRA
adapter of rank ``2 * lora_r`` that applies to the *original* base model (``ΔW = BA - B₀A₀``), so
[`load_for_inference`][loraforge.load_for_inference], a merge and plain PEFT use it as they use any
other. The Trainer's checkpoints keep the unconverted rank-``lora_r`` adapter (resume needs it);
PEFT reloads one onto the original base by running the same initialisation again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "INITIAL_ADAPTER",
    "describe_variant",
    "lora_config",
    "loraplus_optimizer",
    "mutates_base",
    "save_initial_adapter",
]

logger = logging.getLogger(__name__)

INITIAL_ADAPTER = "initial_adapter"
"""The folder of a PiSSA/OLoRA run that holds the adapter as initialised (before any step)."""


def mutates_base(recipe: Any) -> bool:
    """Whether ``recipe.lora_init`` changes the base weight (PiSSA, OLoRA)."""
    return recipe.lora_init in ("pissa", "olora")


def describe_variant(recipe: Any) -> str:
    """The variant in words, for the run log: e.g. ``"DoRA + rsLoRA, init pissa, LoRA+ x16"``."""
    parts = [
        name for name, on in (("DoRA", recipe.use_dora), ("rsLoRA", recipe.use_rslora)) if on
    ] or ["LoRA"]
    text = " + ".join(parts)
    if recipe.lora_init != "default":
        text += f", init {recipe.lora_init}"
    if recipe.loraplus_lr_ratio is not None:
        text += f", LoRA+ x{recipe.loraplus_lr_ratio:g}"
    return text


def lora_config(recipe: Any, targets: Sequence[str]) -> Any:
    """PEFT's ``LoraConfig`` for the recipe's rank, alpha, dropout, targets and variant."""
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=recipe.use_dora,
        use_rslora=recipe.use_rslora,
        init_lora_weights=True if recipe.lora_init == "default" else recipe.lora_init,
    )


def save_initial_adapter(model: Any, out: Path, recipe: Any) -> Path | None:
    """For PiSSA/OLoRA, save the adapter as initialised into ``out / INITIAL_ADAPTER`` (its
    config saying ``init_lora_weights: true``, as PEFT's conversion wants) and return the folder;
    ``None`` for the other initialisations. Call after ``get_peft_model`` and before training."""
    if not mutates_base(recipe):
        return None
    folder = out / INITIAL_ADAPTER
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
    logger.info(
        "lora_init %s: the starting adapter is in %s; the final adapter is saved converted to "
        "apply to the original base model (rank %d)",
        recipe.lora_init,
        folder,
        2 * recipe.lora_r,
    )
    return folder


def loraplus_optimizer(model: Any, args: Any, recipe: Any) -> Any | None:
    """LoRA+ (``recipe.loraplus_lr_ratio``): the optimizer ``args.optim`` names, built by PEFT's
    ``create_loraplus_optimizer`` with the B matrices (and DoRA's magnitudes) at ``learning_rate
    x loraplus_lr_ratio``; ``None`` when LoRA+ is off (the Trainer builds its own)."""
    if recipe.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    optimizer = create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=recipe.learning_rate,
        loraplus_lr_ratio=float(recipe.loraplus_lr_ratio),
        loraplus_weight_decay=recipe.weight_decay,
        **kwargs,
    )
    logger.info(
        "LoRA+: %s with the B matrices at learning rate %g (x%g)",
        optimizer_cls.__name__,
        recipe.learning_rate * recipe.loraplus_lr_ratio,
        recipe.loraplus_lr_ratio,
    )
    return optimizer
