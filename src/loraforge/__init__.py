"""loraforge: LoRA supervised fine-tuning of chat LLMs, correct by construction."""

from __future__ import annotations

from .data import DataReport, DroppedRecord, SFTDatasetBuilder
from .errors import (
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
from .inference import ChatModel, load_for_inference
from .recipe import LoraRecipe
from .templates import (
    PromptTemplate,
    Segment,
    check_template,
    get_template,
    list_templates,
    register_template,
)
from .tokenize import SegmentTokenizer
from .training import TrainResult, train

__version__ = "0.1.0"

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
]
