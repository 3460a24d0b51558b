"""The trackers of ``report_to``: transformers' integrations, checked before a run starts.

transformers' Trainer reports to them (``report_to`` is its setting); loraforge only checks,
before anything is loaded, that each name is one transformers knows and that its package is
installed, so a typo or a missing ``pip install tensorboard`` is an error at once instead of after
the data and the model are loaded. The answers to ``eval_prompts`` go to the same trackers
([`EvalSamples`][loraforge.training.evaluation.EvalSamples]).
"""

from __future__ import annotations

import difflib
from typing import Any

from loraforge.errors import RecipeError

__all__ = ["check_trackers"]

#: The package to install for a tracker, where its name is not the tracker's.
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "swanlab": "swanlab"}


def check_trackers(recipe: Any) -> None:
    """Refuse ``report_to`` names transformers does not know, or whose package is missing.

    Raises:
        RecipeError: naming ``report_to``, the tracker, and what to install or the known names.
    """
    names = [n for n in recipe.report_to if n not in ("none",)]
    if not names:
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = sorted(INTEGRATION_TO_CALLBACK)
    available = set(get_available_reporting_integrations())
    problems = []
    for name in names:
        if name == "all":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(
                f"report_to: unknown tracker {name!r}{hint} (transformers knows {', '.join(known)})"
            )
        elif name not in available:
            problems.append(
                f"report_to: {name!r} needs its package: pip install {_PACKAGES.get(name, name)}"
            )
    if problems:
        raise RecipeError(problems)
