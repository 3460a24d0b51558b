"""loraforge: LoRA supervised fine-tuning of chat LLMs, correct by construction."""

from __future__ import annotations

from .data import DataReport, DroppedRecord, SFTDatasetBuilder
from .errors import (
    DataError,
    LoraForgeError,
    ModelError,
    OutputDirError,
    RecipeError,
    TargetModulesError,
    TemplateError,
    TemplateMismatchError,
    UnknownTemplateError,
)
from .templates import (
    PromptTemplate,
    Segment,
    check_template,
    get_template,
    list_templates,
    register_template,
)
from .tokenize import SegmentTokenizer

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "DataReport",
    "DroppedRecord",
    "LoraForgeError",
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
    "UnknownTemplateError",
    "__version__",
    "check_template",
    "get_template",
    "list_templates",
    "register_template",
]
