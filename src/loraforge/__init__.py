"""loraforge: LoRA supervised fine-tuning of chat LLMs, correct by construction.

The public names below load their module on first use (PEP 562), so ``import loraforge``, the
``loraforge --help`` and ``loraforge templates`` commands do not wait for torch, transformers and
PEFT to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ChatModel": "loraforge.inference",
    "load_for_inference": "loraforge.inference",
    "DataReport": "loraforge.data.builder",
    "DroppedRecord": "loraforge.data.builder",
    "SFTDatasetBuilder": "loraforge.data.builder",
    "PromptTemplate": "loraforge.data.templates",
    "Segment": "loraforge.data.templates",
    "check_template": "loraforge.data.templates",
    "get_template": "loraforge.data.templates",
    "list_templates": "loraforge.data.templates",
    "register_template": "loraforge.data.templates",
    "SegmentTokenizer": "loraforge.data.tokenize",
    "LoraRecipe": "loraforge.recipe",
    "TrainResult": "loraforge.training.trainer",
    "train": "loraforge.training.trainer",
    **{
        name: "loraforge.errors"
        for name in (
            "DataError",
            "DiskFullError",
            "LoraForgeError",
            "ModelError",
            "OutputDirError",
            "RecipeError",
            "TargetModulesError",
            "TemplateError",
            "TemplateMismatchError",
            "TrainingDivergedError",
            "UnknownTemplateError",
        )
    },
}

__all__ = [
    "ChatModel",
    "DataError",
    "DataReport",
    "DiskFullError",
    "DroppedRecord",
    "LoraForgeError",
    "LoraRecipe",
    "ModelError",
    "OutputDirError",
    "PromptTemplate",
    "RecipeError",
    "SFTDatasetBuilder",
    "Segment",
    "SegmentTokenizer",
    "TargetModulesError",
    "TemplateError",
    "TemplateMismatchError",
    "TrainResult",
    "TrainingDivergedError",
    "UnknownTemplateError",
    "__version__",
    "check_template",
    "get_template",
    "list_templates",
    "load_for_inference",
    "register_template",
    "train",
]  # a test checks it lists exactly _EXPORTS and __version__


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from loraforge.data.builder import DataReport, DroppedRecord, SFTDatasetBuilder
    from loraforge.data.templates import (
        PromptTemplate,
        Segment,
        check_template,
        get_template,
        list_templates,
        register_template,
    )
    from loraforge.data.tokenize import SegmentTokenizer
    from loraforge.errors import (
        DataError,
        DiskFullError,
        LoraForgeError,
        ModelError,
        OutputDirError,
        RecipeError,
        TargetModulesError,
        TemplateError,
        TemplateMismatchError,
        TrainingDivergedError,
        UnknownTemplateError,
    )
    from loraforge.inference import ChatModel, load_for_inference
    from loraforge.recipe import LoraRecipe
    from loraforge.training.trainer import TrainResult, train
