"""The documentation is tested: it builds strictly, documents every public name, and its
quickstart code runs.

Code blocks meant to run are marked in the Markdown with ``<!-- run -->`` on the line before
the opening fence; each runs in its own subprocess in an empty folder, against the tiny model.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import background

import loraforge

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
QUICKSTARTS = ("quickstart.md", "quickstart.zh.md")
RUN_BLOCK = re.compile(r"^<!-- run -->\n```python\n(.*?)^```$", re.M | re.S)
# every runnable quickstart block ends by printing the trained answer to the first sample question
TRAINED_ANSWER = "臣妾甄嬛，入宫不久，还请多多指教。"


def run_blocks(page: str) -> list[str]:
    return RUN_BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))


def _mkdocs_build(folder: Path) -> dict:
    return {
        "args": [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(folder / "site")],
        "cwd": REPO,
        "env": {**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    }


@pytest.mark.integration
@background(_mkdocs_build)
def test_mkdocs_build_strict(background_run):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    folder, done = background_run
    site = folder / "site"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # the generated reference tables are there, one row per field and one section per command
    recipe_page = (site / "reference" / "recipe" / "index.html").read_text(encoding="utf-8")
    for name in loraforge.LoraRecipe.field_help():
        assert f'id="{name}"' in recipe_page, name
    cli_page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for verb in ("demo", "train", "chat", "merge", "templates", "inspect-data", "validate"):
        assert f"usage: loraforge {verb}" in cli_page, verb
    assert "<!--" not in recipe_page.split("<article", 1)[1].split("</article>", 1)[0]


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in loraforge.__all__ if f"::: loraforge.{name}\n" not in api]
    assert not missing, f"add a '::: loraforge.NAME' entry to docs/reference/api.md for {missing}"


@pytest.mark.parametrize("page", QUICKSTARTS)
def test_quickstart_has_runnable_blocks(page):
    assert len(run_blocks(page)) >= 2


def _code_of(block: str) -> list[str]:
    """A block's code lines without its comments (which are translated)."""
    lines = [line.split("  # ", 1)[0].rstrip() for line in block.splitlines()]
    return [line for line in lines if line and not line.lstrip().startswith("#")]


def test_the_chinese_quickstart_runs_the_english_quickstart_s_code():
    english, chinese = (run_blocks(page) for page in QUICKSTARTS)
    assert [_code_of(b) for b in chinese] == [_code_of(b) for b in english]


def _block_job(page: str, index: int) -> Callable[[Path], dict]:
    def run_block(folder: Path) -> dict:
        """The block in its own interpreter, in an empty folder."""
        env = {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "0"}
        code = run_blocks(page)[index]
        return {"args": [sys.executable, "-c", code], "cwd": folder, "env": {**os.environ, **env}}

    return run_block


@pytest.mark.integration
@pytest.mark.parametrize(
    ("page", "index"),  # the Chinese page's blocks are the same code (checked above)
    [
        pytest.param(QUICKSTARTS[0], i, marks=background(_block_job(QUICKSTARTS[0], i)))
        for i in range(len(run_blocks(QUICKSTARTS[0])))
    ],
)
def test_quickstart_block_runs(page, index, background_run):
    _, done = background_run
    assert done.returncode == 0, f"{page} block {index} failed:\n{done.stderr[-4000:]}"
    assert TRAINED_ANSWER in done.stdout, done.stdout[-2000:]
