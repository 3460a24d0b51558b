"""Resume trains exactly what was asked: never past the last step, never on other data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge import OutputDirError, train
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path

pytestmark = pytest.mark.integration

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]
# 8 records in batches of 3: 3 steps an epoch, so max_steps=10 ends inside the 4th epoch; a
# constant learning rate makes any extra step change the adapter
BASE = dict(
    max_steps=10,
    batch_size=3,
    save_steps=2,
    save_total_limit=None,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    lora_r=4,
    logging_steps=1,
    lora_dropout=0.1,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    prepare_tiny_base(root / "base", hidden_size=32)
    return root


def recipe(workdir: Path, out: str, **changes):
    values = {**BASE, "data": str(workdir / "data.json"), **changes}
    return demo_recipe(workdir / "base", workdir / out, **values)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(workdir):
    """A run of 10 steps whose checkpoints 2..10 are all kept."""
    result = train(recipe(workdir, "finished"))
    assert result.metrics["steps"] == 10
    return result.output_dir


def _interrupted_copy(finished: Path, to: Path, keep: set[int] | None = None) -> Path:
    """The finished run as a kill during its final save leaves it: checkpoints (those in
    ``keep``, all by default), no run file."""
    shutil.copytree(finished, to)
    (to / "loraforge.json").unlink()
    (to / "adapter_model.safetensors").unlink()
    for ckpt in (to / "checkpoints").iterdir():
        if keep is not None and int(ckpt.name.rsplit("-", 1)[1]) not in keep:
            shutil.rmtree(ckpt)
    return to


def test_resume_from_the_last_step_trains_nothing_and_saves_it(workdir, finished, caplog):
    out = _interrupted_copy(finished, workdir / "cut-final-save")
    with caplog.at_level("INFO", logger="loraforge"):
        result = train(recipe(workdir, "cut-final-save"), resume=True)
    assert result.metrics["steps"] == 10  # transformers alone would train step 11
    assert same(adapter(out), adapter(finished))
    assert "nothing left to train" in caplog.text
    assert not (out / "checkpoints" / "checkpoint-11").exists()


def test_resume_mid_run_stops_exactly_at_max_steps(workdir, finished):
    out = _interrupted_copy(finished, workdir / "cut-at-4", keep={2, 4})
    result = train(recipe(workdir, "cut-at-4"), resume=True)
    assert result.metrics["steps"] == 10
    assert same(adapter(out), adapter(finished))
    assert not (out / "checkpoints" / "checkpoint-11").exists()


def test_a_run_resumes_across_the_two_forms_of_adamw_and_goes_on_in_its_own(workdir, finished):
    """The recipe's default optimizer was ``adamw_torch`` before it became
    ``adamw_torch_fused``: a run interrupted under one resumes under the other, both ways, going
    on in its checkpoint's form (the same adapter as the uninterrupted run); any other optimizer
    is still a changed setting."""
    assert recipe(workdir, "x").optimizer == "adamw_torch_fused"
    out = _interrupted_copy(finished, workdir / "cut-other-adamw", keep={2, 4})
    with pytest.raises(OutputDirError, match=r"different settings \(optimizer\)"):
        train(recipe(workdir, "cut-other-adamw", optimizer="sgd"), resume=True)
    result = train(recipe(workdir, "cut-other-adamw", optimizer="adamw_torch"), resume=True)
    assert result.metrics["steps"] == 10
    assert same(adapter(out), adapter(finished))
    # the other way, as a run begun under the earlier default meets the current one
    old = train(recipe(workdir, "old-default", optimizer="adamw_torch", max_steps=4)).output_dir
    cut = _interrupted_copy(old, workdir / "old-default-cut", keep={2})
    resumed = train(recipe(workdir, "old-default-cut", max_steps=4), resume=True)
    assert resumed.metrics["steps"] == 4
    assert same(adapter(cut), adapter(old))


def test_lowered_max_steps_resumes_from_the_checkpoint_at_that_step(workdir, finished):
    out = _interrupted_copy(finished, workdir / "lowered")
    result = train(recipe(workdir, "lowered", max_steps=4), resume=True)
    assert result.metrics["steps"] == 4
    assert same(adapter(out), adapter(out / "checkpoints" / "checkpoint-4"))
    assert (out / "checkpoints" / "checkpoint-6").is_dir()  # kept, not deleted


def test_lowered_max_steps_below_every_checkpoint_is_refused(workdir, finished):
    _interrupted_copy(finished, workdir / "lowered-none", keep={6})
    with pytest.raises(OutputDirError, match=r"step 6, past the 4 steps .* max_steps >= 6"):
        train(recipe(workdir, "lowered-none", max_steps=4), resume=True)


def test_resume_on_changed_data_is_refused_naming_the_file_unless_allowed(workdir):
    data = workdir / "changed-data.json"
    shutil.copyfile(workdir / "data.json", data)
    out = train(recipe(workdir, "changed", data=str(data), max_steps=4)).output_dir
    (out / "loraforge.json").unlink()  # as if killed before its final save
    changed = [*RECORDS[:7], {**RECORDS[7], "output": RECORDS[7]["output"] + "!"}]
    data.write_text(json.dumps(changed, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(OutputDirError, match=r"data \(.*changed-data\.json\) changed since"):
        train(recipe(workdir, "changed", data=str(data), max_steps=6), resume=True)
    assert not (out / "loraforge.json").exists()  # nothing trained or saved
    result = train(
        recipe(workdir, "changed", data=str(data), max_steps=6),
        resume=True,
        allow_changed_data=True,
    )
    assert result.metrics["steps"] == 6


def test_each_checkpoint_records_the_data_it_was_trained_on(finished, workdir):
    saved = json.loads(
        (finished / "checkpoints" / "checkpoint-4" / "loraforge_data.json").read_text("utf-8")
    )
    import hashlib

    digest = hashlib.sha256((workdir / "data.json").read_bytes()).hexdigest()
    assert saved["data"]["sha256"] == digest
    assert saved["data"]["path"] == str(workdir / "data.json")


def test_resume_whose_plan_packs_other_rows_is_refused_naming_the_setting(
    workdir, finished, monkeypatch
):
    """Each checkpoint records the size of the packed rows it was trained on. With the same
    recipe, the planner may size rows otherwise (another card, max_memory_gib, loraforge
    version): such a resume is refused before anything trains, and says which setting resumes."""
    saved = json.loads(
        (finished / "checkpoints" / "checkpoint-4" / "loraforge_data.json").read_text("utf-8")
    )
    assert saved["rows"] == {"pack_tokens": None}  # padded batches of batch_size
    packed = dict(packing="on", batch_size=None, max_steps=4)
    out = train(recipe(workdir, "other-rows", **packed)).output_dir  # CPU rows: 4,096 tokens
    (out / "loraforge.json").unlink()  # as if killed before its final save
    monkeypatch.setattr("loraforge.fast.plan._CPU_ROW", 2048)  # the planner now sizes otherwise
    with pytest.raises(OutputDirError, match=r"saved by a run of packed rows of 4096 tokens, and "
                       r"this run plans packed rows of 2048 tokens.*"
                       r"--set pack_tokens=4096"):  # fmt: skip
        train(recipe(workdir, "other-rows", **{**packed, "max_steps": 6}), resume=True)
    assert not (out / "loraforge.json").exists()  # nothing trained or saved
    result = train(
        recipe(workdir, "other-rows", **{**packed, "max_steps": 6, "pack_tokens": 4096}),
        resume=True,
    )
    assert result.metrics["steps"] == 6
    (out / "loraforge.json").unlink()
    # the saved recipe now names 4,096-token rows: another size is another recipe
    with pytest.raises(OutputDirError, match=r"different settings \(pack_tokens\)"):
        train(
            recipe(workdir, "other-rows", **{**packed, "max_steps": 8, "pack_tokens": 1024}),
            resume=True,
        )


def test_the_rows_check_names_the_row_size_to_set_and_lets_older_checkpoints_pass(tmp_path):
    from loraforge.training.resume import _check_rows, rows_fingerprint

    ckpt = tmp_path / "checkpoint-4"
    _check_rows(ckpt, {}, rows_fingerprint(1024))  # saved by an older loraforge: a warning
    _check_rows(ckpt, rows_fingerprint(2048), rows_fingerprint(2048))
    with pytest.raises(OutputDirError, match=r"packed rows of 4096 tokens, and this run plans "
                       r"packed rows of 1024 tokens.*--set pack_tokens=4096"):  # fmt: skip
        _check_rows(ckpt, rows_fingerprint(4096), rows_fingerprint(1024))
