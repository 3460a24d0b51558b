"""Shared fixtures: tiny tokenizers and models built on the spot, and ../shared when present."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORAFORGE_SHARED", REPO.parent / "shared"))
PHI4_DIR = SHARED / "phi4"
HUANHUAN = SHARED / "data" / "huanhuan.json"
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
# A subprocess that trains or builds takes ~10 s on a quiet 2-core machine; on one loaded many
# times over it can take 20 times as long. The limit only catches a hang: generous on purpose.
SUBPROCESS_TIMEOUT = 1800

# Phi-4's sizes (../shared/phi4/config.json), for tests that plan for its shape without the file
PHI4_SIZES = dict(
    hidden_size=5120,
    num_hidden_layers=40,
    vocab_size=100352,
    intermediate_size=17920,
    num_attention_heads=40,
    num_key_value_heads=10,
)


def phi4_config():
    """A ``Phi3Config`` of Phi-4's sizes (no weights)."""
    from transformers import Phi3Config

    return Phi3Config(**PHI4_SIZES, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained on the shipped sample data, with Phi-4's special tokens."""
    from loraforge.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def phi4_tokenizer():
    """Phi-4's real tokenizer from ../shared/phi4 (skipped when absent)."""
    if not (PHI4_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{PHI4_DIR} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(PHI4_DIR))


@pytest.fixture(scope="session")
def huanhuan_path():
    if not HUANHUAN.is_file():
        pytest.skip(f"{HUANHUAN} not present")
    return HUANHUAN


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A 2-layer random Phi3ForCausalLM (fused qkv_proj / gate_up_proj), float32 on CPU."""
    from loraforge.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer)


# --------------------------------------------------------------------------- the second core
#
# Most of a fresh interpreter's time is importing torch, transformers and PEFT on one core, while
# this process runs its tests on the other. A test marked ``@background(job)`` only
# reads the result of a subprocess: ``job(folder)`` (called here, at the start of the session, in
# the main thread) prepares what the subprocess needs in its own empty ``folder`` and returns the
# keyword arguments of ``subprocess.run`` (``args``; ``cwd``, ``env`` default to this process's
# at the start). The subprocesses run one after another on a background thread while the other
# tests run; the marked tests run last, each taking its subprocess's result from the
# ``background_run`` fixture. Tests marked with the same ``job`` object share one run.


class BackgroundRun(NamedTuple):
    folder: Path
    proc: subprocess.CompletedProcess[str]


class _Lane:
    def __init__(self) -> None:
        self.root: Path | None = None
        self.jobs: dict[Callable[[Path], dict[str, Any]], dict[str, Any]] = {}
        self.done: dict[Callable[[Path], dict[str, Any]], BackgroundRun | BaseException] = {}
        self.ready = threading.Condition()
        self.child: subprocess.Popen[str] | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self, items: list[pytest.Item]) -> None:
        jobs = [m.args[0] for i in items for m in i.iter_markers("background")]
        if not jobs:
            return
        self.root = Path(tempfile.mkdtemp(prefix="loraforge-background-"))
        for n, job in enumerate(dict.fromkeys(jobs)):  # in the order the tests will read them
            folder = self.root / f"{n}-{getattr(job, '__name__', 'job')}"
            folder.mkdir()
            try:  # what the subprocess needs: made here, in the main thread, its output hidden
                with (
                    contextlib.redirect_stdout(io.StringIO()),
                    contextlib.redirect_stderr(io.StringIO()),
                ):
                    kw = {"cwd": os.getcwd(), "env": dict(os.environ), **job(folder)}
            except BaseException as exc:  # reported by the test that reads it
                self.done[job] = exc
                continue
            self.jobs[job] = {"folder": folder, **kw}
        self.thread = threading.Thread(target=self._run, name="background-subprocesses")
        self.thread.start()

    def _run(self) -> None:
        for job, spec in self.jobs.items():
            folder = spec.pop("folder")
            try:
                with self.ready:
                    if self.stopping:
                        return
                    self.child = subprocess.Popen(
                        **spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    )
                    if hasattr(os, "setpriority"):  # it yields the CPU to the tests run here
                        # (torch's threads, started later, inherit the priority)
                        os.setpriority(os.PRIO_PROCESS, self.child.pid, 19)
                out, err = self.child.communicate(timeout=SUBPROCESS_TIMEOUT)
                done: BackgroundRun | BaseException = BackgroundRun(
                    folder,
                    subprocess.CompletedProcess(spec["args"], self.child.returncode, out, err),
                )
            except BaseException as exc:
                if self.child is not None:
                    self.child.kill()
                done = exc
            with self.ready:
                self.done[job] = done
                self.ready.notify_all()

    def result(self, job: Callable[[Path], dict[str, Any]]) -> BackgroundRun:
        with self.ready:
            self.ready.wait_for(lambda: job in self.done)
            done = self.done[job]
        if isinstance(done, BaseException):
            raise done
        return done

    def stop(self) -> None:
        with self.ready:
            self.stopping = True
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
        if self.thread is not None:
            self.thread.join()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


_LANE = _Lane()


def background(job: Callable[[Path], dict[str, Any]]) -> pytest.MarkDecorator:
    """``@background(job)``: the test reads ``job``'s subprocess (``pytest.mark.background(f)``
    with one callable would mark ``f`` itself)."""
    return pytest.mark.background.with_args(job)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read a background subprocess run last (in their order), after the others."""
    last = [item for item in items if item.get_closest_marker("background")]
    items[:] = [item for item in items if not item.get_closest_marker("background")] + last


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    if not session.config.option.collectonly:
        _LANE.start(session.items)
    try:
        return (yield)
    finally:
        _LANE.stop()


@pytest.fixture
def background_run(request: pytest.FixtureRequest) -> BackgroundRun:
    """The finished subprocess of this test's ``@background(job)``."""
    marker = request.node.get_closest_marker("background")
    assert marker is not None, "background_run needs @background(job)"
    return _LANE.result(marker.args[0])
