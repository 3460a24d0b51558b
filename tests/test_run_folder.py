"""The run folder: loraforge writes and clears only its own folders, one run per folder, and a
finished run is never replaced by a resume; a merge writes only into a new or empty folder.

Each test is an attack an adversarial user made on the previous version (which deleted the
folder ``overwrite_output_dir`` pointed at, merged over the base model's weights, let two runs
share a folder and let a resume replace a finished run's adapter).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import _figures
import pytest

from loraforge import OutputDirError, load_for_inference, train
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path
from loraforge.training.output import (
    LOCK_FILE,
    MERGE_MARKER,
    RUN_FILE,
    RUN_MARKER,
    open_run_folder,
    prepare_merge_folder,
)

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    _figures.flush("test_run_folder")


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its contents."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A small world to attack: home, working directory, data, a base model, a user's folder."""
    root = tmp_path / "world"
    (root / "home").mkdir(parents=True)
    (root / "home" / "thesis.tex").write_text("years of work")
    (root / "cwd" / "sub").mkdir(parents=True)
    (root / "cwd" / "notes.txt").write_text("notes")
    (root / "data").mkdir()
    (root / "data" / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False))
    (root / "models" / "base").mkdir(parents=True)
    (root / "models" / "base" / "model.safetensors").write_bytes(b"base weights")
    (root / "models" / "base" / "config.json").write_text("{}")
    (root / "stuff").mkdir()
    (root / "stuff" / "mine.txt").write_text("not a run")
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / "cwd" / "sub")
    return root


def world_recipe(root: Path, output_dir: str | Path, **kw: object):
    values: dict[str, object] = {"data": str(root / "data" / "train.json")}
    values.update({"overwrite_output_dir": True, **kw})
    return demo_recipe(root / "models" / "base", output_dir, **values)


# ------------------------------------------------------------------ 1. what may never be cleared


ATTACKS = {
    "..": (lambda r: "..", r"is the current working directory or one of its parents"),
    ".": (lambda r: ".", r"is the current working directory or one of its parents"),
    "cwd parent": (lambda r: r / "cwd", r"is the current working directory or one of its"),
    "home": (lambda r: r / "home", r"is your home folder or one of its parents"),
    "world (holds home)": (lambda r: r, r"is the current working directory or one of its"),
    "data folder": (lambda r: r / "data", r"holds the training data file \(data: "),
    "base model": (lambda r: r / "models" / "base", r"is the base model's folder"),
    "base's parent": (lambda r: r / "models", r"holds the base model's folder"),
    "user folder": (
        lambda r: r / "stuff",
        r"holds files but no loraforge run \(mine.txt\): it was not created by loraforge "
        r"\(no \.loraforge-run marker\); choose an empty or new folder",
    ),
    "link to home": (lambda r: _link(r, r / "home"), r"is your home folder"),
    "link to user folder": (lambda r: _link(r, r / "stuff"), r"was not created by loraforge"),
    "file": (lambda r: r / "stuff" / "mine.txt", r"exists and is not a folder"),
    "broken link": (lambda r: _link(r, r / "gone"), r"is a broken symbolic link"),
}


def _link(root: Path, target: Path) -> Path:
    link = root / "cwd" / "sub" / "link"
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_overwrite_output_dir_never_deletes_what_loraforge_did_not_create(world, attack):
    where, message = ATTACKS[attack]
    output_dir = where(world)
    before = listing(world)
    with pytest.raises(OutputDirError, match=message):
        train(world_recipe(world, output_dir))
    assert listing(world) == before
    _figures.count("run_folder_attacks_refused", f"overwrite_output_dir into {attack}")


@pytest.mark.parametrize("resume", [False, True])
def test_the_filesystem_root_is_refused_without_touching_it(world, resume):
    with pytest.raises(OutputDirError, match="is the current working directory or one of its"):
        open_run_folder(world_recipe(world, "/"), resume=resume).__enter__()


def test_a_folder_holding_the_eval_data_or_the_cache_is_refused(world):
    (world / "stuff" / "eval.json").write_text(json.dumps(RECORDS[:2], ensure_ascii=False))
    recipe = world_recipe(world, world / "stuff", eval_data=str(world / "stuff" / "eval.json"))
    with pytest.raises(OutputDirError, match=r"holds the evaluation data file"):
        open_run_folder(recipe).__enter__()
    (world / "cache" / "models").mkdir(parents=True)
    recipe = world_recipe(world, world / "cache", cache_dir=str(world / "cache" / "models"))
    with pytest.raises(OutputDirError, match=r"holds the model cache \(cache_dir: "):
        open_run_folder(recipe).__enter__()
    assert (world / "stuff" / "mine.txt").is_file() and not (world / "cache" / RUN_MARKER).exists()


def test_resume_never_removes_checkpoints_from_a_folder_loraforge_did_not_create(world):
    """The previous version deleted an unmarked folder's incomplete checkpoints on resume."""
    ckpt = world / "stuff" / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.bin").write_bytes(b"someone's")
    (world / "stuff" / "mine.txt").unlink()
    before = listing(world)
    with pytest.raises(OutputDirError, match="was not created by loraforge"):
        train(world_recipe(world, world / "stuff", overwrite_output_dir=False), resume=True)
    assert listing(world) == before


def test_a_new_or_empty_folder_becomes_a_marked_run_folder(world):
    (world / "empty").mkdir()
    for out in (world / "new" / "run", world / "empty"):
        with open_run_folder(world_recipe(world, out)) as run:
            assert run.path == out and run.checkpoint is None and run.finished is None
            marker = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
            assert marker["format"] == "loraforge-run/1" and marker["adopted"] is False
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, RUN_MARKER]


def test_overwrite_clears_only_loraforges_files_and_never_follows_links(world, caplog):
    out = world / "run"
    with open_run_folder(world_recipe(world, out)):
        pass
    ckpt = out / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"ckpt")
    for name in ("adapter_model.safetensors", "recipe.yaml", "skipped.jsonl", RUN_FILE):
        (out / name).write_text("loraforge's")
    (out / ".staging-123").mkdir()
    (out / ".staging-123" / "tokenizer.json").write_text("half a save")
    (out / "skipped.jsonl.tmp-77").write_text("a cut-short atomic write")
    (out / "tokenizer.json").write_text("recorded below as saved")
    marker = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    (out / RUN_MARKER).write_text(json.dumps({**marker, "saved": ["tokenizer.json"]}))
    (out / "my_notes.txt").write_text("mine")
    (out / "eval_set").mkdir()
    (out / "eval_set" / "x.json").write_text("mine too")
    (world / "precious.png").write_bytes(b"precious")
    (out / "loss_curve.png").symlink_to(world / "precious.png")
    with caplog.at_level(logging.WARNING), open_run_folder(world_recipe(world, out)):
        names = sorted(p.name for p in out.iterdir())
    assert names == [LOCK_FILE, RUN_MARKER, "eval_set", "my_notes.txt"]
    assert (out / "eval_set" / "x.json").is_file()
    assert (world / "precious.png").read_bytes() == b"precious"
    assert "did not write: eval_set, my_notes.txt" in caplog.text
    # without overwrite_output_dir, the leftovers make it occupied
    with pytest.raises(OutputDirError, match="already holds files"):
        open_run_folder(world_recipe(world, out, overwrite_output_dir=False)).__enter__()


# ------------------------------------------------------------------ 3. one run per folder


HOLDER = textwrap.dedent(
    """
    import sys, time
    from loraforge.recipe import LoraRecipe
    from loraforge.training.output import open_run_folder

    with open_run_folder(LoraRecipe.from_yaml(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(world, tmp_path):
    out = world / "run"
    recipe = world_recipe(world, out, overwrite_output_dir=False)
    recipe_file = tmp_path / "recipe.yaml"
    recipe.to_yaml(recipe_file)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(recipe_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == "locked\n", line + (holder.stderr.read() if holder.poll() else "")
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
        before = listing(world)
        with pytest.raises(
            OutputDirError, match=rf"is in use by another loraforge run \(pid {holder.pid} on "
        ):
            train(recipe)
        with pytest.raises(OutputDirError, match=rf"\(pid {holder.pid} on "):
            train(recipe, resume=True)
        with pytest.raises(OutputDirError, match=rf"\(pid {holder.pid} on "):
            train(recipe.replace(overwrite_output_dir=True))
        assert listing(world) == before
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the OS releases the lock
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with open_run_folder(recipe, resume=True) as run:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert run.checkpoint is None
    assert (out / LOCK_FILE).read_text() == ""  # released, pid removed
    _figures.count("run_folder_attacks_refused", "second run into a busy folder (3 ways)")


def test_the_lock_is_held_until_the_run_ends_and_released_on_errors(world):
    recipe = world_recipe(world, world / "run")
    busy = rf"in use by another loraforge run \(pid {os.getpid()} on "
    with open_run_folder(recipe), pytest.raises(OutputDirError, match=busy):
        open_run_folder(recipe).__enter__()
    with pytest.raises(RuntimeError, match="boom"), open_run_folder(recipe):
        raise RuntimeError("boom")
    with open_run_folder(recipe) as run:  # free again
        assert run.path == world / "run"


# ------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    prepare_tiny_base(root / "base", hidden_size=64)
    recipe = demo_recipe(
        root / "base",
        root / "run",
        data=str(root / "data.json"),
        max_steps=2,
        save_steps=1,
        batch_size=4,
        lora_r=4,
    )
    res = train(recipe)
    return recipe, res


def copy_run(finished, dest: Path):
    recipe, _ = finished
    shutil.copytree(recipe.output_dir, dest, symlinks=True)
    return recipe.replace(output_dir=str(dest))


@pytest.mark.integration
def test_a_finished_run_records_its_recipe_and_the_files_it_saved(finished):
    recipe, res = finished
    out = res.output_dir
    run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    assert run["recipe"] == recipe.to_dict()
    marker = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    assert {"adapter_model.safetensors", "tokenizer.json", RUN_FILE} <= set(marker["saved"])
    assert (out / LOCK_FILE).read_text() == ""


@pytest.mark.integration
def test_resuming_a_finished_run_with_its_recipe_does_nothing(finished, tmp_path, caplog):
    recipe = copy_run(finished, tmp_path / "run")
    before = listing(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        res = train(recipe, resume=True)
    assert "holds a finished run with the same settings; nothing to train" in caplog.text
    assert res.metrics == finished[1].metrics and res.output_dir == tmp_path / "run"
    assert res.data_report.built == finished[1].data_report.built
    assert listing(tmp_path / "run") == before


@pytest.mark.integration
def test_a_finished_run_is_never_replaced_by_a_resume(finished, tmp_path):
    """The reported attack: checkpoints deleted, recipe.yaml damaged, another recipe resumed."""
    out = tmp_path / "run"
    recipe = copy_run(finished, out)
    shutil.rmtree(out / "checkpoints")
    (out / "recipe.yaml").write_text("loraforge_version: 0.1.0\nmodel: [unclosed")
    before = listing(out)
    with pytest.raises(
        OutputDirError,
        match=r"holds a finished run with different settings \(lora_r\); a finished run is "
        r"never replaced by a resume",
    ):
        train(recipe.replace(lora_r=8), resume=True)
    with pytest.raises(OutputDirError, match=r"different settings \(max_steps\)"):
        train(recipe.replace(max_steps=3), resume=True)
    assert listing(out) == before
    # the recipe cannot be read anywhere: refused, not guessed
    run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    del run["recipe"]
    (out / RUN_FILE).write_text(json.dumps(run))
    before = listing(out)
    with pytest.raises(OutputDirError, match=r"finished run whose settings cannot be compared"):
        train(recipe, resume=True)
    assert listing(out) == before
    (out / RUN_FILE).write_text("{broken")
    before = listing(out)
    with pytest.raises(OutputDirError, match=r"loraforge.json is unreadable"):
        train(recipe, resume=True)
    assert listing(out) == before
    _figures.count("run_folder_attacks_refused", "resume replacing a finished run (4 ways)")


@pytest.mark.integration
def test_a_run_folder_of_an_earlier_version_is_adopted(finished, tmp_path, caplog):
    out = tmp_path / "run"
    recipe = copy_run(finished, out)
    (out / RUN_MARKER).unlink()
    (out / LOCK_FILE).unlink()
    with pytest.raises(OutputDirError, match="already holds files"):  # refused, still unmarked
        train(recipe)
    assert not (out / RUN_MARKER).exists()
    res = train(recipe, resume=True)  # finished, same settings: nothing to do
    assert res.metrics == finished[1].metrics
    marker = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    assert marker["adopted"] is True
    (out / RUN_MARKER).unlink()
    (out / "mine.txt").write_text("mine")
    overwrite = recipe.replace(overwrite_output_dir=True)
    with caplog.at_level(logging.WARNING), open_run_folder(overwrite):
        left = sorted(p.name for p in out.iterdir())
    # the tokenizer files an earlier version wrote were not recorded: left in place, named
    assert "mine.txt" in left and "tokenizer.json" in left and "did not write" in caplog.text
    assert "adapter_model.safetensors" not in left and "checkpoints" not in left


# ------------------------------------------------------------------ 2. merge


@pytest.mark.integration
def test_merge_never_writes_into_the_base_the_run_or_a_folder_holding_files(finished, tmp_path):
    recipe, res = finished
    base = Path(recipe.model)
    chat = load_for_inference(res.output_dir, device="cpu")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"someone's model")
    attacks = {
        base: r"is the base model's folder",
        base.parent: r"holds the base model's folder",
        res.output_dir: r"is the adapter's run folder",
        tmp_path / "full": r"holds other files \(model.safetensors\); a merge writes only into",
    }
    for where, message in attacks.items():
        before = listing(where)
        with pytest.raises(OutputDirError, match=message):
            chat.merge_and_save(where)
        assert listing(where) == before
        _figures.count("run_folder_attacks_refused", f"merge into {message.split(' ')[0]}...")
    merged = chat.merge_and_save(tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and (merged / MERGE_MARKER).is_file()
    assert chat.merge_and_save(tmp_path / "merged") == merged  # its own merge: replaced
    (tmp_path / "empty").mkdir()
    assert (chat.merge_and_save(tmp_path / "empty") / "model.safetensors").is_file()


@pytest.mark.integration
def test_merge_never_overwrites_a_merged_base_it_was_loaded_on(finished, tmp_path):
    """A merged folder is the merge's own, but not while it is the base being merged onto."""
    _, res = finished
    first = load_for_inference(res.output_dir, device="cpu").merge_and_save(tmp_path / "m1")
    weights = (first / "model.safetensors").read_bytes()
    chat = load_for_inference(res.output_dir, base_model=str(first), device="cpu")
    with pytest.raises(OutputDirError, match=r"is the base model's folder"):
        chat.merge_and_save(first)
    assert (first / "model.safetensors").read_bytes() == weights


def test_prepare_merge_folder_refuses_protected_and_run_folders(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_MARKER).write_text("{}")
    with pytest.raises(OutputDirError, match="is a loraforge run folder"):
        prepare_merge_folder(tmp_path / "run")
    with pytest.raises(OutputDirError, match="is a protected folder"):
        prepare_merge_folder(tmp_path / "p", protected=[tmp_path / "p"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        prepare_merge_folder(tmp_path / "file")
    out = prepare_merge_folder(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and (out / MERGE_MARKER).is_file()
