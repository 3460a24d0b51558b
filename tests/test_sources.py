"""Data from where users keep it: what a ``data:`` string means, a folder saved by ``datasets``,
the hubs' loaders (faked or offline: no network in tests), column mapping, the resume fingerprint
of each kind, and JSONL read one line at a time."""

from __future__ import annotations

import json
import tracemalloc

import datasets
import pytest

from loraforge import DataError, LoraRecipe, RecipeError, train
from loraforge.data.records import check_records, load_records
from loraforge.data.sources import data_kind, is_hub_id, open_data, source_fingerprint
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path
from loraforge.training.resume import data_fingerprint

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]
# the same records under other names, as many hub datasets have them
RENAMED = [{"question": r["instruction"], "answer": r["output"]} for r in RECORDS]
COLUMNS = {"instruction": "question", "output": "answer"}


def _recipe(data: str, **changes) -> LoraRecipe:
    return LoraRecipe(model="m", data=data, **changes)


def test_what_a_data_string_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "saved").mkdir()
    assert data_kind("d.jsonl") == "file"
    assert data_kind("missing.jsonl") == "file"  # read as a file: "no such file"
    assert data_kind("owner/saved") == "folder"  # an existing path is always local
    assert data_kind("AI-ModelScope/alpaca-gpt4-data-zh") == "modelscope"  # auto: as for models
    assert data_kind("tatsu-lab/alpaca", "huggingface") == "huggingface"
    assert data_kind("tatsu-lab/alpaca", "local") == "file"
    # a local eval file beside a hub data id under data_source: huggingface / modelscope
    assert data_kind("d.jsonl", "huggingface") == "file"
    assert data_kind("owner/saved", "modelscope") == "folder"
    assert is_hub_id("a/b") and not is_hub_id("a/b.jsonl") and not is_hub_id("./a/b")
    assert not is_hub_id("/abs/a") and not is_hub_id("a/b/c")


def test_recipe_file_keeps_hub_ids_and_resolves_paths(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: m\ndata: tatsu-lab/alpaca\ndata_source: huggingface\n", "utf-8")
    assert LoraRecipe.from_yaml(f).data == "tatsu-lab/alpaca"
    f.write_text("model: m\ndata: owner/name\n", "utf-8")  # auto, no such folder: an id
    assert LoraRecipe.from_yaml(f).data == "owner/name"
    (tmp_path / "owner" / "name").mkdir(parents=True)  # the folder exists beside the recipe
    assert LoraRecipe.from_yaml(f).data == str(tmp_path / "owner" / "name")
    f.write_text("model: m\ndata: data/train.jsonl\neval_data: owner/x\ndata_source: local\n")
    r = LoraRecipe.from_yaml(f)
    assert (r.data, r.eval_data) == (str(tmp_path / "data/train.jsonl"), str(tmp_path / "owner/x"))


def test_column_mapping_is_checked():
    _recipe("d", data_columns={"instruction": "q"})
    with pytest.raises(RecipeError, match="data_columns: unknown field 'question'"):
        _recipe("d", data_columns={"question": "instruction"})
    with pytest.raises(RecipeError, match="data_columns: must be a mapping"):
        _recipe("d", data_columns={"instruction": ""})


def test_a_saved_folder_with_other_column_names(tmp_path):
    datasets.Dataset.from_list(RENAMED).save_to_disk(str(tmp_path / "saved"))
    recipe = _recipe(str(tmp_path / "saved"), data_columns=COLUMNS)
    records = [v for _, _, v in load_records(open_data(recipe))]
    assert records == [{"instruction": r["instruction"], "output": r["output"]} for r in RECORDS]
    with pytest.raises(DataError, match=r"record 0: cannot tell the record format.*data_columns"):
        check_records(open_data(_recipe(str(tmp_path / "saved"))))  # unmapped: not alpaca


def test_a_saved_dataset_dict_takes_its_split(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(RECORDS[:6]), test=datasets.Dataset.from_list(RECORDS[6:])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    r = _recipe(str(tmp_path / "dd"), eval_data=str(tmp_path / "dd"))
    assert len(list(load_records(open_data(r, "data")))) == 6
    assert len(list(load_records(open_data(r, "eval_data")))) == 2
    with pytest.raises(DataError, match="has no split 'validation'; its splits: train, test"):
        open_data(r.replace(data_split="validation"))


def test_hugging_face_ids_go_to_load_dataset(monkeypatch):
    calls = []

    def fake(path, **kw):
        calls.append((path, kw))
        return datasets.Dataset.from_list(RENAMED)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    r = _recipe("owner/name", data_source="huggingface", data_revision="v1", data_columns=COLUMNS)
    src = open_data(r)
    assert calls == [("owner/name", {"split": "train", "revision": "v1", "cache_dir": None})]
    assert src.name == "huggingface:owner/name[train]"
    assert [v["output"] for _, _, v in load_records(src)] == [x["output"] for x in RECORDS]
    fp = source_fingerprint(r)
    assert fp["kind"] == "huggingface" and fp["path"] == "owner/name" and fp["records"] == 8
    assert (fp["split"], fp["revision"]) == ("train", "v1")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda p, **kw: datasets.Dataset.from_list(RENAMED[:7])
    )
    assert source_fingerprint(r)["sha256"] != fp["sha256"]  # the id's content moved on


def test_a_hub_id_that_does_not_load_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    r = _recipe("nobody-here/no-such-set", data_source="huggingface")
    with pytest.raises(DataError, match=r"could not load the Hugging Face dataset 'nobody-here/no"):
        open_data(r)


def test_modelscope_ids_go_to_its_download_then_datasets_loaders(tmp_path, monkeypatch):
    import importlib

    msd = importlib.import_module(
        "modelscope.hub.snapshot_download"
    )  # the module, not the function

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in RENAMED), "utf-8"
    )
    calls = []

    def fake(dataset_id, **kw):
        calls.append((dataset_id, kw))
        return str(repo)

    monkeypatch.setattr(msd, "dataset_snapshot_download", fake)
    r = _recipe("owner/name", data_columns=COLUMNS)  # auto: ModelScope
    assert [v["output"] for _, _, v in load_records(open_data(r))] == [x["output"] for x in RECORDS]
    assert calls == [("owner/name", {"revision": None, "cache_dir": None})]

    def offline(dataset_id, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(msd, "dataset_snapshot_download", offline)
    with pytest.raises(
        DataError, match=r"could not load the ModelScope dataset 'owner/name'.*Offline"
    ):
        open_data(r)


def test_folder_fingerprint_follows_its_content(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "a"))
    r = _recipe(str(tmp_path / "a"))
    fp = data_fingerprint(r)["data"]
    assert fp["kind"] == "folder" and fp == data_fingerprint(r)["data"]
    datasets.Dataset.from_list(RECORDS[:7]).save_to_disk(str(tmp_path / "a"))
    assert data_fingerprint(r)["data"]["sha256"] != fp["sha256"]


def test_jsonl_is_read_one_line_at_a_time(tmp_path):
    line = json.dumps({"instruction": "x" * 900, "output": "y"}) + "\n"
    f = tmp_path / "big.jsonl"
    f.write_text(line * 8000, encoding="utf-8")  # about 7 MB
    tracemalloc.start()
    try:
        n = sum(1 for _ in load_records(f))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 8000
    assert peak < f.stat().st_size / 10, peak  # never the whole file, let alone twice


@pytest.mark.integration
def test_train_from_a_saved_folder_with_mapped_columns(tmp_path):
    prepare_tiny_base(tmp_path / "base", hidden_size=64)
    datasets.Dataset.from_list([*RENAMED, {"question": "no answer"}]).save_to_disk(
        str(tmp_path / "saved")
    )
    recipe = demo_recipe(
        tmp_path / "base",
        tmp_path / "run",
        data=str(tmp_path / "saved"),
        data_columns=COLUMNS,
        on_bad_record="skip",
        max_steps=3,
        save_steps=2,
    )
    result = train(recipe)
    report = result.data_report
    assert (report.records_read, report.built, len(report.dropped)) == (9, 8, 1)  # every record
    assert report.source == str(tmp_path / "saved")
    run = json.loads((result.output_dir / "loraforge.json").read_text(encoding="utf-8"))
    assert run["recipe"]["data_columns"] == COLUMNS
    saved = json.loads(
        (result.output_dir / "checkpoints" / "checkpoint-2" / "loraforge_data.json").read_text()
    )
    assert saved["data"]["kind"] == "folder" and saved["data"]["path"] == str(tmp_path / "saved")
