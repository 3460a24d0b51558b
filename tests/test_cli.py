"""The command line: each verb through ``loraforge.cli.main`` (and one real subprocess)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import yaml
from conftest import background

import loraforge
from loraforge.cli import build_parser, main
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    base = prepare_tiny_base(root / "base", hidden_size=64)
    recipe = demo_recipe(base, root / "run", data=str(root / "data.json"), num_epochs=40, lora_r=8)
    path = root / "recipe.yaml"
    recipe.to_yaml(path)
    return path


def test_templates_lists_builtins(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    for name in ("phi-4", "chatml", "phi-3", "llama-3"):
        assert name in out
    assert "built-in" in out


def test_inspect_data_default_sample(capsys):
    assert main(["-q", "inspect-data"]) == 0
    out = capsys.readouterr().out
    assert "records read       48" in out
    assert "[[" + RECORDS[0]["output"] + "<|im_end|>]]" in out
    assert "<|im_start|>assistant<|im_sep|>[[" in out


def test_validate_ok_and_errors(recipe_file, capsys, tmp_path):
    assert main(["validate", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "step:" in out  # what one optimizer step holds, said up front
    assert main(["validate", str(recipe_file), "--set", "packing=on", "--set", "batch_size=4"]) == 2
    assert "batch_size: not used with packing: on" in capsys.readouterr().err
    assert (
        main(["validate", str(recipe_file), "--set", "lora_rank=4", "--set", "lora_dropout=3"]) == 2
    )
    err = capsys.readouterr().err
    assert "did you mean 'lora_r'" in err and "lora_dropout: must be in [0, 1)" in err
    assert main(["validate", str(recipe_file), "--set", f"data={tmp_path / 'none.json'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_train_chat_merge_through_cli(recipe_file, capsys, tmp_path):
    out = recipe_file.parent / "run"
    assert main(["-q", "train", str(recipe_file), "--set", f"output_dir={out}"]) == 0
    assert "adapter in" in capsys.readouterr().out
    assert main(["-q", "chat", str(out), "--prompt", RECORDS[3]["instruction"]]) == 0
    assert capsys.readouterr().out.strip() == RECORDS[3]["output"]
    # each repeated --prompt is answered, on its own and in order
    asked = [RECORDS[1]["instruction"], RECORDS[3]["instruction"]]
    assert main(["-q", "chat", str(out), "--prompt", asked[0], "--prompt", asked[1]]) == 0
    assert capsys.readouterr().out.strip().split("\n\n") == [
        f"you> {asked[0]}\nmodel> {RECORDS[1]['output']}",
        f"you> {asked[1]}\nmodel> {RECORDS[3]['output']}",
    ]
    assert main(["-q", "merge", str(out), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # an occupied output folder is refused with a clear message, exit code 2
    assert main(["-q", "train", str(recipe_file), "--set", f"output_dir={out}"]) == 2
    assert "already holds files" in capsys.readouterr().err
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["output_dir"] == str(out)


@pytest.mark.integration
def test_chat_interactive_loop(recipe_file, monkeypatch, capsys):
    out = recipe_file.parent / "run-chat"
    assert (
        main(
            ["-q", "train", str(recipe_file), "--set", f"output_dir={out}", "--set", "num_epochs=1"]
        )
        == 0
    )
    capsys.readouterr()
    answers = iter([RECORDS[0]["instruction"], "/reset", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["-q", "chat", str(out)]) == 0
    assert "model> " in capsys.readouterr().out


def _demo(folder):
    return {
        "args": [sys.executable, "-m", "loraforge.cli", "demo", "--output", str(folder / "demo")]
    }


@pytest.mark.integration
@background(_demo)
def test_demo_command_in_a_subprocess(background_run):
    folder, proc = background_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[matches]" in proc.stdout
    assert (folder / "demo" / "run" / "adapter_model.safetensors").is_file()
    assert "step 10/" in proc.stderr  # the plain log line


def test_validate_reads_every_record_without_a_tokenizer(recipe_file, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "c"}\n', encoding="utf-8"
    )
    assert main(["validate", str(recipe_file), "--set", f"data={bad}"]) == 2
    assert (
        f"{bad}, line 2, record 1, field 'instruction': must be a string" in capsys.readouterr().err
    )
    assert (
        main(["validate", str(recipe_file), "--set", f"data={bad}", "--set", "on_bad_record=skip"])
        == 0
    )
    out = capsys.readouterr().out
    assert "2 records, 1 to skip" in out and "skip:" in out


def test_inspect_data_refuses_flags_it_would_ignore(recipe_file, capsys):
    assert main(["-q", "inspect-data", str(recipe_file), "--max-length", "64"]) == 2
    assert "--max-length: not used with a recipe" in capsys.readouterr().err
    assert main(["-q", "inspect-data", "--set", "max_length=64"]) == 2
    assert "--set: needs a recipe file" in capsys.readouterr().err


# --------------------------------------------------------------------------- help and version

OWNED = ["demo", "train", "templates", "inspect-data", "validate"]  # chat, merge: see their tests


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"loraforge {loraforge.__version__}\n"


def test_top_level_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: loraforge [-h] [--version] [-q] COMMAND ...\n\nloraforge: LoRA")
    assert "It only parses arguments" not in out  # the module's developer docstring
    assert "\nexamples:\n  loraforge demo " in out
    assert "relative to the recipe's folder" in out
    for verb in [*OWNED, "chat", "merge"]:
        assert f"\n    {verb}" in out


@pytest.mark.parametrize("verb", OWNED)
def test_every_option_of_a_command_has_help(verb, capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[verb]
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: loraforge {verb} ")
    assert "\nexamples:\n  loraforge " in out
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, (verb, action.dest)
        names = action.option_strings or [action.metavar or action.dest]
        assert all(name in out for name in names), (verb, names)
        words = action.help.split("%(")[0].split()[:4]  # its first words, wherever it wraps
        assert " ".join(words) in " ".join(out.split()), (verb, action.dest)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["templates"], ["validate", "-h"]])
def test_light_commands_do_not_import_torch(argv):
    """``loraforge --help``/``--version``/``templates`` answer without torch, transformers, PEFT."""
    code = (
        "import sys\n"
        "from loraforge.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'modelscope')\n"
        "print('EXIT', code, 'HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "EXIT 0 HEAVY []", proc.stdout
