"""Figures of the reliability tests (cases generated, faults injected, runs recovered).

Each test module adds to ``FIGURES``; a module fixture prints them when the module ends (shown
with ``pytest -s``) and, when ``LORAFORGE_FIGURES`` names a file, merges them into that JSON file
(``docs/reliability.md`` quotes it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

FIGURES: dict[str, Any] = {}


def add(key: str, n: int = 1) -> None:
    FIGURES[key] = FIGURES.get(key, 0) + n


def count(key: str, item: str) -> None:
    FIGURES.setdefault(key, Counter())[item] += 1


def put(key: str, value: Any) -> None:
    FIGURES[key] = value


def flush(module: str) -> None:
    mine = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in FIGURES.items()}
    print(f"\n[{module} figures] " + json.dumps(mine, sort_keys=True))
    target = os.environ.get("LORAFORGE_FIGURES")
    if target:
        path = Path(target)
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        old[module] = mine
        path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    FIGURES.clear()
