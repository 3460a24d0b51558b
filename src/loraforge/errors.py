"""The loraforge error hierarchy.

Every error a user can cause is a [`LoraForgeError`][loraforge.LoraForgeError]. Subclasses also
inherit the matching built-in (`ValueError`, `KeyError`, `FileNotFoundError`) so callers that
catch those keep working.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

__all__ = [
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
]


class LoraForgeError(Exception):
    """Base class of every error loraforge raises for bad input or settings."""


class TemplateError(LoraForgeError, ValueError):
    """A prompt template is malformed, registered twice, or cannot render a conversation."""


class UnknownTemplateError(LoraForgeError, KeyError):
    """No template is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TemplateMismatchError(TemplateError):
    """A template renders differently from a tokenizer's own ``chat_template``."""


class DataError(LoraForgeError, ValueError):
    """A data source or one of its records is invalid.

    Attributes:
        source: the file (or ``"<list>"``, ``"<Dataset>"``) the record came from.
        index: the 0-based record index, when known.
        line: the 1-based line number in the file, when known.
        field: the offending field, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        index: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.source = source
        self.index = index
        self.line = line
        self.field = field
        self.reason = message
        where = []
        if source is not None:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class RecipeError(LoraForgeError, ValueError):
    """A recipe has one or more invalid settings; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe{f' {source}' if source else ''}"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n{body}")


class TargetModulesError(LoraForgeError, ValueError):
    """LoRA ``target_modules`` name modules the model does not have."""


class ModelError(LoraForgeError, ValueError):
    """A model or tokenizer cannot be found, loaded or used as asked."""


class OutputDirError(LoraForgeError, ValueError):
    """The output folder holds something that must not be overwritten, or no run to resume."""


class TrainingDivergedError(LoraForgeError, RuntimeError):
    """A training step produced a non-finite loss or gradient; the run stopped before the
    optimizer applied it.

    Attributes:
        step: the optimizer step (1-based, as in the logs) that went non-finite.
        kind: ``"loss"``, ``"gradient"`` or ``"parameter"``.
        record_indices: the 0-based indices, in the training data, of the offending batch's
            records (empty when they could not be told).
        batch_file: the JSON file listing the offending batch, when written.
        checkpoint: the last complete checkpoint (all of whose weights are finite), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        kind: str,
        record_indices: Sequence[int] = (),
        batch_file: str | None = None,
        checkpoint: str | None = None,
    ) -> None:
        self.step = step
        self.kind = kind
        self.record_indices = list(record_indices)
        self.batch_file = batch_file
        self.checkpoint = checkpoint
        super().__init__(message)


class DiskFullError(LoraForgeError, OSError):
    """A save ran out of disk space (``ENOSPC``/``EDQUOT``); what was saved before is intact.

    Attributes:
        folder: the folder being written.
    """

    def __init__(self, message: str, *, folder: str) -> None:
        super().__init__(errno.ENOSPC, message, folder)
        self.folder = folder
        self.message = message

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]" and append the file name
        return self.message
