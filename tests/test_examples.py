"""examples/phi4_huanhuan runs end to end, with the tiny model and a small sample swapped in.

The recipe file itself is used unchanged; only ``--set`` overrides replace Phi-4 and the huanhuan
data, so a key that stops being a LoraRecipe field, or a script that stops matching the public API,
fails here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import background

from loraforge import LoraRecipe, load_for_inference
from loraforge.cli import main
from loraforge.demo import prepare_tiny_base
from loraforge.tiny import sample_data_path

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "phi4_huanhuan"
RECIPE = EXAMPLE / "recipe.yaml"
RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4_huanhuan")
    data = root / "huanhuan-sample.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return root, prepare_tiny_base(root / "base", hidden_size=64), data


def overrides(base: Path, data: Path, output_dir: Path) -> list[str]:
    return [
        f"model={base}",
        "model_source=local",
        f"data={data}",
        f"output_dir={output_dir}",
        "num_epochs=40",
        "learning_rate=1e-2",
        "lora_dropout=0",
        "max_length=128",
        "batch_size=8",
        "dtype=float32",
        "gradient_checkpointing=false",
    ]


def test_recipe_is_the_tutorial_setup():
    r = LoraRecipe.from_yaml(RECIPE)
    assert (r.model, r.model_source, r.template) == ("LLM-Research/phi-4", "modelscope", "phi-4")
    assert r.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"
    assert (r.lora_r, r.lora_alpha, r.lora_dropout) == (8, 32, 0.1)
    assert (r.learning_rate, r.num_epochs, r.max_length) == (1e-4, 3, 384)
    assert r.batch_size is None and r.micro_batch_size == 4  # packs on a GPU, 4 a step on CPU
    assert r.target_modules == "all-linear" and r.gradient_checkpointing == "full"
    assert r.output_dir == "output/phi4-huanhuan"


def test_recipe_through_cli(tiny, capsys):
    root, base, data = tiny
    out = root / "run-cli"
    argv = ["-q", "train", str(RECIPE)]
    for pair in overrides(base, data, out):
        argv += ["--set", pair]
    assert main(argv) == 0
    assert f"adapter in {out}" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()
    run = json.loads((out / "loraforge.json").read_text(encoding="utf-8"))
    assert run["metrics"]["steps"] == 40
    chat = load_for_inference(out, device="cpu")
    assert chat.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"
    assert chat.chat(RECORDS[0]["instruction"], max_new_tokens=64) == RECORDS[0]["output"]


# Runs each ``[script, *args]`` as ``python script *args`` would (``__main__``, ``sys.argv``, the
# script's folder first on ``sys.path``), one after the other in one interpreter: torch and
# transformers are imported once for both scripts. A line ``MARK`` starts each script's output.
MARK = "----- next script -----"
RUN_SCRIPTS = f"""
import json, os, runpy, sys
for argv in json.loads(sys.argv[1]):
    print({MARK!r}, flush=True)
    sys.argv = argv
    sys.path[0] = os.path.dirname(argv[0])
    runpy.run_path(argv[0], run_name="__main__")
"""


def _scripts(folder: Path) -> dict:
    data = folder / "huanhuan-sample.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    base = prepare_tiny_base(folder / "base", hidden_size=64)
    out = folder / "run-scripts"
    train_argv = [str(EXAMPLE / "train.py"), str(RECIPE)]
    for pair in overrides(base, data, out):
        train_argv += ["--set", pair]
    prompts = [RECORDS[0]["instruction"], RECORDS[3]["instruction"]]
    chat_argv = [str(EXAMPLE / "chat.py"), str(out), "--max-new-tokens", "64"]
    for p in prompts:
        chat_argv += ["--prompt", p]
    return {"args": [sys.executable, "-c", RUN_SCRIPTS, json.dumps([train_argv, chat_argv])]}


@background(_scripts)
def test_train_and_chat_scripts(background_run):
    _, done = background_run
    assert done.returncode == 0, done.stderr[-3000:]
    before, trained, chatted = done.stdout.split(MARK + "\n")
    assert before == ""
    assert "done: 40 steps" in trained
    assert chatted.splitlines() == [RECORDS[0]["output"], RECORDS[3]["output"]]
