"""What ``loraforge validate`` checks without downloading, the model/model_source rules it shares
with ``train``, tokenizer-only downloads, and where relative paths in a recipe point."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml

from loraforge.cli import main
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.errors import DataError, ModelError
from loraforge.models import TOKENIZER_FILES, check_model_source, resolve_model_path
from loraforge.recipe import LoraRecipe
from loraforge.tiny import build_tiny_tokenizer, sample_data_path

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:4]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Phi-3 model folder: config.json, model.safetensors, a tokenizer with Phi-4's
    chat_template."""
    return prepare_tiny_base(tmp_path_factory.mktemp("validate") / "base", hidden_size=32)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current folder holding data.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def write_recipe(path: Path, **values: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


def model_folder(folder: Path, *files: str) -> Path:
    """A model folder whose files are empty (only their presence is checked)."""
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}" if name.endswith(".json") else "", encoding="utf-8")
    return folder


def problems(model: str, source: str = "auto", **more: object) -> list[str]:
    return check_model_source(
        LoraRecipe(model=model, model_source=source, data="d.json", **more)  # type: ignore[arg-type]
    )


@pytest.fixture
def downloads(monkeypatch, tmp_path) -> list[tuple[str, str, object]]:
    """Stand-ins for ModelScope's and huggingface_hub's snapshot_download: each call is recorded
    as (hub, model, allow_patterns) and writes a tokenizer folder; nothing goes to a network."""
    calls: list[tuple[str, str, object]] = []

    def fake(hub: str):
        def snapshot_download(model_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
            calls.append((hub, model_id, allow_patterns))
            folder = tmp_path / "hub-cache" / hub / model_id
            if not (folder / "tokenizer.json").is_file():
                build_tiny_tokenizer().save_pretrained(str(folder))
            return str(folder)

        return snapshot_download

    modelscope = types.ModuleType("modelscope")
    modelscope.snapshot_download = fake("modelscope")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modelscope", modelscope)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake("huggingface"))
    return calls


# --------------------------------------------------------------------------- model / model_source


def test_auto_missing_path_like_folder_is_an_error(workdir):
    for model in ("./phi4", "../phi4", "~/no-such-loraforge-model", "a/b/c", "phi4", "my model"):
        found = problems(model)
        assert len(found) == 1 and found[0].startswith(
            f"model: local folder {model!r} does not exist"
        ), found
    assert f"(relative to the current folder {workdir})" in problems("./phi4")[0]
    # ModelScope ids are always owner/name: a bare name can only be a folder
    assert "a hub id is written owner/name" in problems("phi4")[0]


def test_auto_owner_name_is_a_hub_id_unless_its_first_part_is_a_folder(workdir):
    assert problems("LLM-Research/phi-4") == []
    (workdir / "models").mkdir()
    (found,) = problems("models/phi4")
    assert re.match(
        r"model: local folder 'models/phi4' does not exist \(relative to the current folder .*\), "
        r"but 'models' does: with model_source: auto, 'models/phi4' would be downloaded from "
        r"ModelScope as a hub id",
        found,
    )


def test_hub_source_with_a_local_folder_names_both_settings(workdir):
    model_folder(workdir / "shared" / "phi4", "config.json", "model.safetensors")
    (found,) = problems("./shared/phi4", "modelscope")
    assert found == (
        f"model: './shared/phi4' is a local folder (relative to the current folder {workdir}), "
        "but model_source: modelscope downloads hub ids (owner/name) from ModelScope; set "
        "model_source: local (or auto) to use the folder"
    )
    (found,) = problems(str(workdir / "shared" / "phi4"), "huggingface")
    assert (
        "but model_source: huggingface downloads hub ids (owner/name) from the Hugging Face hub"
        in found
    )
    assert found.startswith(f"model: {str(workdir / 'shared' / 'phi4')!r} is a local folder, but")
    (found,) = problems("../nowhere/phi4", "modelscope")
    assert found.startswith(
        "model: '../nowhere/phi4' is not a hub id (owner/name) that model_source: modelscope can "
        "download, and no such local folder exists (relative to the current folder"
    )
    # the same folder with model_source auto or local is fine
    assert problems("./shared/phi4") == problems("shared/phi4", "local") == []


def test_hub_id_with_a_hub_source_is_downloaded_even_beside_a_same_named_folder(workdir):
    # a ModelScope cache_dir is laid out owner/name: running from it must keep working
    model_folder(workdir / "LLM-Research" / "phi-4", "config.json")
    assert problems("LLM-Research/phi-4", "modelscope") == []
    assert problems("gpt2", "huggingface") == []  # the Hugging Face hub knows bare names


def test_local_folder_needs_config_and_safetensors(workdir):
    assert problems(str(model_folder(workdir / "ok", "config.json", "model.safetensors"))) == []
    (found,) = problems(str(model_folder(workdir / "noconf", "model.safetensors")), "local")
    assert found.endswith("has no config.json; is it a Hugging Face model folder?")
    (found,) = problems(str(model_folder(workdir / "empty", "config.json")))
    assert found.endswith("holds no weights (*.safetensors)")
    (found,) = problems(str(model_folder(workdir / "bin", "config.json", "pytorch_model.bin")))
    assert "holds no weights (*.safetensors); it has pytorch_model.bin: loraforge loads" in found
    shards = model_folder(workdir / "sharded", "config.json", "model-00001-of-00002.safetensors")
    (shards / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        ),
        encoding="utf-8",
    )
    (found,) = problems(str(shards))
    assert found.endswith(
        "lacks 1 of the 2 weight files its model.safetensors.index.json names (an unfinished "
        "download?): model-00002-of-00002.safetensors"
    )


def test_local_file_and_revision_are_errors(workdir):
    (workdir / "weights.safetensors").write_text("", encoding="utf-8")
    assert problems("weights.safetensors") == [
        "model: 'weights.safetensors' is a file, not a model folder"
    ]
    ok = model_folder(workdir / "ok", "config.json", "model.safetensors")
    assert problems(str(ok), model_revision="v1") == [
        f"model_revision: 'v1' selects a hub revision, but model {str(ok)!r} is a local folder; "
        "remove model_revision"
    ]


def test_resolve_refuses_a_folder_for_a_hub_source_before_any_download(workdir, downloads):
    model_folder(workdir / "phi4", "config.json", "model.safetensors")
    with pytest.raises(ModelError, match=r"'\./phi4' is a local folder .*model_source: modelscope"):
        resolve_model_path("./phi4", "modelscope")
    with pytest.raises(ModelError, match=r"local folder 'models/x' does not exist"):
        (workdir / "models").mkdir()
        resolve_model_path("models/x", "auto")
    assert downloads == []  # the network was never asked


# --------------------------------------------------------------------------- tokenizer-only fetch


def test_tokenizer_patterns_take_tokenizer_files_and_leave_weights():
    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES)

    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "config.json",
        "added_tokens.json",
    ):
        assert fetched(name), name
    for name in (
        "model-00001-of-00006.safetensors",
        "model.safetensors",
        "pytorch_model.bin",
        "consolidated.pth",
        "model.gguf",
        "onnx/model.onnx",
    ):
        assert not fetched(name), name


@pytest.mark.parametrize("source", ["modelscope", "huggingface", "auto"])
def test_resolve_tokenizer_only_asks_for_tokenizer_files(workdir, downloads, source):
    hub = "huggingface" if source == "huggingface" else "modelscope"
    folder = resolve_model_path("LLM-Research/phi-4", source, files="tokenizer")
    assert downloads == [(hub, "LLM-Research/phi-4", list(TOKENIZER_FILES))]
    assert (Path(folder) / "tokenizer.json").is_file()
    resolve_model_path("LLM-Research/phi-4", source)
    assert downloads[-1] == (hub, "LLM-Research/phi-4", None)  # the whole model for training


def test_inspect_data_with_a_hub_model_downloads_only_the_tokenizer(workdir, downloads, capsys):
    recipe = write_recipe(
        workdir / "recipe.yaml",
        model="LLM-Research/phi-4",
        model_source="modelscope",
        data="data.json",
        max_length=128,
    )
    assert main(["-q", "inspect-data", str(recipe)]) == 0
    assert downloads == [("modelscope", "LLM-Research/phi-4", list(TOKENIZER_FILES))]
    assert f"records read       {len(RECORDS)}" in capsys.readouterr().out
    assert main(["-q", "inspect-data", "--data", "data.json", "--tokenizer", "owner/tok"]) == 0
    assert downloads[-1] == ("modelscope", "owner/tok", list(TOKENIZER_FILES))


# --------------------------------------------------------------------------- loraforge validate


def test_validate_local_model_loads_tokenizer_and_checks_template(workdir, base, capsys):
    recipe = write_recipe(workdir / "recipe.yaml", model=str(base), data="data.json")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{recipe}: OK\n")
    assert "tokenizer: loaded; template 'phi-4' renders exactly like its chat_template" in out
    assert f"{workdir / 'data.json'}: {len(RECORDS)} records" in out
    assert main(["validate", str(recipe), "--set", "template=chatml"]) == 2
    err = capsys.readouterr().err
    assert "template 'chatml' renders differently from the tokenizer's chat_template" in err
    assert "templates that match this tokenizer: phi-4" in err


def test_validate_refuses_a_missing_relative_model_folder(workdir, capsys):
    recipe = write_recipe(workdir / "recipe.yaml", model="./models/phi4", data="data.json")
    assert main(["validate", str(recipe)]) == 2
    assert "model: local folder './models/phi4' does not exist (relative to the current folder" in (
        capsys.readouterr().err
    )
    (workdir / "models").mkdir()
    assert main(["validate", str(recipe), "--set", "model=models/phi4"]) == 2
    assert "but 'models' does: with model_source: auto" in capsys.readouterr().err


def test_validate_folder_with_a_hub_source_names_both(workdir, base, capsys):
    recipe = write_recipe(
        workdir / "recipe.yaml", model=str(base), model_source="modelscope", data="data.json"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"model: {str(base)!r} is a local folder, but model_source: modelscope" in err


def test_validate_local_folder_without_weights(workdir, base, capsys):
    """Like ../shared/phi4 before its weights are fetched: the tokenizer is still checked."""
    folder = workdir / "half"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = write_recipe(workdir / "recipe.yaml", model=str(folder), data="data.json")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "(1 problem(s))" in err and "holds no weights (*.safetensors)" in err
    assert main(["validate", str(recipe), "--set", "template=chatml"]) == 2
    err = capsys.readouterr().err
    assert "(2 problem(s))" in err and "templates that match this tokenizer: phi-4" in err


def test_validate_hub_model_downloads_nothing_and_says_what_it_skipped(workdir, downloads, capsys):
    recipe = write_recipe(workdir / "recipe.yaml", model="LLM-Research/phi-4", data="data.json")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "model:     hub id LLM-Research/phi-4, downloaded from ModelScope by train" in out
    assert "tokenizer: not checked; `loraforge inspect-data" in out
    assert downloads == []


def test_validate_reports_every_problem_at_once(workdir, capsys):
    recipe = write_recipe(
        workdir / "recipe.yaml", model="./nowhere", data="missing.json", template="phi4"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "(3 problem(s))" in err
    assert "template: unknown template 'phi4'. Did you mean 'phi-4'?" in err
    assert "model: local folder './nowhere' does not exist" in err
    assert "data: file" in err


# --------------------------------------------------------------------------- relative data paths


def test_data_paths_in_a_recipe_file_are_relative_to_its_folder(workdir, monkeypatch):
    recipe = write_recipe(
        workdir / "recipes" / "r.yaml",
        model="LLM-Research/phi-4",
        data="train.jsonl",
        eval_data="../held-out.jsonl",
    )
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = LoraRecipe.from_yaml(Path("..") / "recipes" / "r.yaml")
    assert r.data == str(workdir / "recipes" / "train.jsonl")
    assert r.eval_data == str(workdir / "held-out.jsonl")
    assert LoraRecipe.from_yaml(recipe).data == r.data  # however the recipe file is named
    # on the command line (--set), relative to the current folder
    r = LoraRecipe.from_yaml(recipe, {"data": "mine.jsonl", "eval_data": str(workdir / "e.json")})
    assert (r.data, r.eval_data) == (str(elsewhere / "mine.jsonl"), str(workdir / "e.json"))
    home = LoraRecipe.from_yaml(recipe, {"data": "~/d.jsonl"}).data
    assert home == str(Path("~/d.jsonl").expanduser())


def test_saved_recipe_keeps_pointing_at_the_same_data(workdir, monkeypatch):
    """A recipe built in Python reads data relative to the current folder; written to a file
    elsewhere (as train() does in the output folder) it must still name the same file."""
    r = LoraRecipe(model="LLM-Research/phi-4", data="data.json")
    (workdir / "run").mkdir()
    text = r.to_yaml(workdir / "run" / "recipe.yaml")
    assert yaml.safe_load(text)["data"] == str(workdir / "data.json")
    assert yaml.safe_load(r.to_yaml())["data"] == "data.json"  # text only: as given
    monkeypatch.chdir(workdir / "run")
    assert LoraRecipe.from_yaml("recipe.yaml").data == str(workdir / "data.json")


def test_resume_accepts_the_same_relative_data_path(workdir):
    """train() saves recipe.yaml with absolute data paths; resuming with the same recipe, built in
    Python with a relative path, is the same run."""
    from loraforge.errors import OutputDirError
    from loraforge.training.output import _check_same_run

    r = LoraRecipe(model="LLM-Research/phi-4", data="data.json", output_dir="run")
    (workdir / "run").mkdir()
    r.to_yaml(workdir / "run" / "recipe.yaml")
    _check_same_run(workdir / "run", r)  # no error
    _check_same_run(workdir / "run", r.replace(data=str(workdir / "data.json")))
    with pytest.raises(OutputDirError, match=r"different settings \(data\)"):
        _check_same_run(workdir / "run", r.replace(data="other.json"))


def test_validate_missing_data_names_the_folder_it_was_resolved_against(workdir, capsys):
    recipe = write_recipe(
        workdir / "recipes" / "r.yaml", model="LLM-Research/phi-4", data="data.json"
    )
    assert main(["validate", str(recipe)]) == 2
    assert (
        f"data: file {str(workdir / 'recipes' / 'data.json')!r} does not exist (relative paths "
        f"in a recipe file are relative to its folder {workdir / 'recipes'})"
    ) in capsys.readouterr().err
    assert main(["validate", str(recipe), "--set", "data=nope.jsonl"]) == 2
    assert (
        f"data: file {str(workdir / 'nope.jsonl')!r} does not exist (relative paths given with "
        f"--set are relative to the current folder {workdir})"
    ) in capsys.readouterr().err
    assert main(["validate", str(recipe), "--set", "data=data.json"]) == 0  # ./data.json


def test_csv_data_names_the_file_and_the_formats_read(workdir, capsys):
    csv = workdir / "train.csv"
    csv.write_text("instruction,output\nhi,hello\n", encoding="utf-8")
    from loraforge.data.records import check_records

    message = (
        f"{csv}: .csv files are not read; loraforge reads a .json file holding an array of "
        "records, or a .jsonl file with one JSON record per line"
    )
    with pytest.raises(DataError, match="^" + re.escape(message)):
        check_records(str(csv))
    recipe = write_recipe(workdir / "recipe.yaml", model="LLM-Research/phi-4", data="train.csv")
    assert main(["validate", str(recipe)]) == 2
    assert message in capsys.readouterr().err


def test_demo_recipe_still_validates(workdir, base, capsys):
    """The demo's recipe (absolute paths, model_source local) is unaffected by the path rules."""
    r = demo_recipe(base, workdir / "run", data=str(workdir / "data.json"))
    r.to_yaml(workdir / "demo.yaml")
    assert main(["validate", str(workdir / "demo.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


# --------------------------------------------------------------------------- the plan for a card


@pytest.fixture(scope="module")
def phi4_folder(tmp_path_factory) -> Path:
    """Phi-4's config.json (no weights: an empty model.safetensors, which validate does not
    read) beside the tiny tokenizer with Phi-4's chat_template."""
    from conftest import phi4_config

    folder = tmp_path_factory.mktemp("phi4-config") / "phi-4"
    phi4_config().save_pretrained(str(folder))
    build_tiny_tokenizer().save_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_validate_shows_the_plan_for_a_smaller_card_from_the_config(workdir, phi4_folder, capsys):
    recipe = write_recipe(
        workdir / "recipe.yaml", model=str(phi4_folder), data="data.json", quantization="nf4"
    )
    assert main(["validate", str(recipe), "--gpu-gib", "16", "--set", "max_memory_gib=15"]) == 0
    out = capsys.readouterr().out
    plan = next(line for line in out.splitlines() if line.strip().startswith("plan:"))
    assert "on a 16 GiB GPU (8.5 GiB of weights in bfloat16, nf4" in plan
    # what a run would plan there: 1,024-token graphed rows with the input embedding table in
    # host memory (the config's untied table is taken to be movable)
    assert "max_length=384" in plan and "1024 tokens/row" in plan and "checkpointing off" in plan
    assert "input embeddings in host memory (0.96 GiB)" in plan
    # with eager layers: 4,096-token rows with 38 layers checkpointed
    eager = ["--set", "cuda_graphs=off"]
    main(["validate", str(recipe), "--gpu-gib", "16", "--set", "max_memory_gib=15", *eager])
    out = capsys.readouterr().out
    plan = next(line for line in out.splitlines() if line.strip().startswith("plan:"))
    assert "4096 tokens/row" in plan and "38 layers" in plan
    # the recipe fixes rows the estimate puts over the budget: said, and the run may still fit
    fixed = ["--set", "pack_tokens=8192", "--set", "gradient_checkpointing=full"]
    assert (
        main(["validate", str(recipe), "--gpu-gib", "16", "--set", "max_memory_gib=15", *fixed])
        == 0
    )
    out = capsys.readouterr().out
    assert "estimated 16.6 GiB, over max_memory_gib=15" in out and "may fit" in out


def test_validate_refuses_a_card_the_weights_do_not_fit(workdir, phi4_folder, base, capsys):
    recipe = write_recipe(workdir / "recipe.yaml", model=str(phi4_folder), data="data.json")
    assert main(["validate", str(recipe), "--gpu-gib", "24"]) == 2
    err = capsys.readouterr().err
    assert "plan on a 24 GiB GPU:" in err and "the model's weights take 27.3 GiB" in err
    # a tiny local model: the plan; a hub id: nothing to plan from (validate downloads nothing)
    tiny = write_recipe(workdir / "tiny.yaml", model=str(base), data="data.json")
    assert main(["validate", str(tiny), "--gpu-gib", "24"]) == 0
    assert "packing 8192 tokens/row" in capsys.readouterr().out
    hub = write_recipe(workdir / "hub.yaml", model="LLM-Research/phi-4", data="data.json")
    assert main(["validate", str(hub), "--gpu-gib", "24"]) == 0
    assert "plan:      not computed: it needs a local model folder's config.json" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "inf"])
def test_validate_gpu_gib_must_be_a_positive_size(workdir, bad, capsys):
    recipe = write_recipe(workdir / "recipe.yaml", model="LLM-Research/phi-4", data="data.json")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(recipe), "--gpu-gib", bad])
    assert exc.value.code == 2
    assert f"expected a positive number of GiB, e.g. 24; got {bad!r}" in capsys.readouterr().err
