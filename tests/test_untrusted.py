"""A run folder is data: loading one runs no code that it ships or names unless the caller says so.

Each attack is a real folder made here: a tokenizer whose ``auto_map`` points at a ``.py`` file
in the folder, a ``recipe.yaml`` that switches ``trust_remote_code`` on, a ``loraforge.json``
naming a template module that sits in the folder (loaded with the folder as working directory
and ``''`` on ``sys.path``, as ``python -c`` and notebooks have it). Every payload writes a
sentinel file when it runs; the tests assert that it does not, that the error says how to allow
it, and that with the permission given it runs as before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import background

from loraforge import ModelError, PromptTemplate, TemplateError, load_for_inference
from loraforge.cli import main
from loraforge.data import templates
from loraforge.data.templates import (
    check_recordable,
    get_template,
    list_templates,
    register_template,
    template_from_id,
    template_id,
    template_spec,
)
from loraforge.demo import prepare_tiny_base

CONV = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(autouse=True)
def fresh_registry():
    templates._reset_plugins()
    yield
    templates._reset_plugins()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return make_clean_run(tmp_path_factory.mktemp("untrusted"))


def make_clean_run(root: Path) -> Path:
    """A loraforge run folder (adapter, tokenizer, loraforge.json, recipe.yaml), made without
    training: a LoRA adapter freshly initialised on the tiny base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = prepare_tiny_base(root / "base", hidden_size=64)
    run = root / "run"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=4, target_modules=["qkv_proj"]),
    )
    model.save_pretrained(str(run), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(run))
    write_run(run, template_id(get_template("phi-4")), base=base)
    (run / "recipe.yaml").write_text(
        yaml.safe_dump({"model": str(base), "system_prompt": "sys"}), encoding="utf-8"
    )
    return run


def write_run(folder: Path, template: dict, base: Path | None = None) -> None:
    run_file = folder / "loraforge.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    run["template"] = template
    if base is not None:
        run["base_model"] = {"model": str(base), "source": "local", "resolved_path": str(base)}
    run_file.write_text(json.dumps(run), encoding="utf-8")


@pytest.fixture
def run_copy(clean_run, tmp_path):
    folder = tmp_path / "downloaded-run"
    shutil.copytree(clean_run, folder)
    return folder


def payload(sentinel: Path, body: str = "") -> str:
    return f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n" + textwrap.dedent(
        body
    )


# --------------------------------------------------------------------------- trust_remote_code

EVIL_TOKENIZER = """
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def plant_tokenizer_code(folder: Path, sentinel: Path) -> None:
    (folder / "evil_tok.py").write_text(payload(sentinel, EVIL_TOKENIZER), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    config_file.write_text(json.dumps(config), encoding="utf-8")


def set_recipe(folder: Path, **settings) -> None:
    recipe_file = folder / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    recipe.update(settings)
    recipe_file.write_text(yaml.safe_dump(recipe), encoding="utf-8")


def test_recipe_yaml_cannot_switch_on_remote_code(run_copy, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    plant_tokenizer_code(run_copy, sentinel)
    set_recipe(run_copy, trust_remote_code=True)
    message = (
        f"recipe.yaml of {run_copy} sets trust_remote_code: true; loraforge does not run code "
        "from a run folder unless you pass trust_remote_code=True / --trust-remote-code (only "
        "for a folder you trust)"
    )
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        load_for_inference(run_copy, device="cpu")
    assert main(["-q", "chat", str(run_copy), "--prompt", "hi"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not sentinel.exists()


def test_tokenizer_auto_map_is_not_run(run_copy, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    plant_tokenizer_code(run_copy, sentinel)  # recipe.yaml leaves trust_remote_code off
    message = (
        f"tokenizer_config.json of {run_copy} asks to run code shipped with it (AutoTokenizer -> "
        "['evil_tok.EvilTokenizer', 'evil_tok.EvilTokenizer']); loraforge does not run code from "
        "a run folder unless you pass trust_remote_code=True / --trust-remote-code"
    )
    with pytest.raises(ModelError, match=f"^{re.escape(message)}"):
        load_for_inference(run_copy, device="cpu")
    assert main(["-q", "merge", str(run_copy), str(tmp_path / "merged")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not sentinel.exists()
    assert not (tmp_path / "merged").exists()


def test_base_model_code_named_by_the_run_is_not_run(run_copy, tmp_path):
    """loraforge.json can point the base model anywhere, e.g. at a folder with model code."""
    sentinel = tmp_path / "pwned"
    run = json.loads((run_copy / "loraforge.json").read_text(encoding="utf-8"))
    base = tmp_path / "evil-base"
    shutil.copytree(run["base_model"]["resolved_path"], base)
    (base / "modeling_evil.py").write_text(payload(sentinel), encoding="utf-8")
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "evil-arch"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig"}
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_evil.EvilForCausalLM"
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    write_run(run_copy, run["template"], base=base)
    with pytest.raises(
        ModelError,
        match=f"^{re.escape(f'config.json of {base} asks to run code shipped with it (AutoConfig')}"
        r".*loraforge does not run code from a model folder unless you pass "
        r"trust_remote_code=True / --trust-remote-code",
    ):
        load_for_inference(run_copy, device="cpu")
    assert not sentinel.exists()


def _chat_trusting_remote_code(folder: Path) -> dict:
    """``loraforge chat --trust-remote-code`` on a run folder whose tokenizer ships code."""
    run = make_clean_run(folder / "made")
    plant_tokenizer_code(run, folder / "pwned")
    set_recipe(run, trust_remote_code=True)
    env = dict(os.environ, HF_MODULES_CACHE=str(folder / "hf-modules"))
    cmd = [sys.executable, "-m", "loraforge.cli", "-q", "chat", str(run), "--prompt", "hi"]
    cmd += ["--max-new-tokens", "2", "--trust-remote-code"]
    return {"args": cmd, "env": env, "cwd": folder}


@pytest.mark.integration
@background(_chat_trusting_remote_code)
def test_trust_remote_code_flag_runs_it_as_before(background_run):
    folder, proc = background_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "pwned").read_text() == "ran"  # the caller allowed it: the folder's code ran


# --------------------------------------------------------------------------- template modules

EVIL_TEMPLATE = """
from loraforge import PromptTemplate


class Evil(PromptTemplate):
    name = "evil"
    header = "<|im_start|>{role}<|im_sep|>"
    end_of_turn = "<|im_end|>"
    generation_prompt = "<|im_start|>assistant<|im_sep|>"

    def segments(self, messages, add_generation_prompt=False):  # not declarative
        return super().segments(messages, add_generation_prompt)
"""


@pytest.fixture
def in_folder(monkeypatch):
    """Work in ``folder`` with '' on sys.path, as `python -c` or a notebook started there has."""

    def enter(folder: Path) -> None:
        monkeypatch.chdir(folder)
        monkeypatch.syspath_prepend("")
        monkeypatch.delenv("PYTHONPATH", raising=False)

    yield enter
    for name in [m for m in sys.modules if m.startswith("lf_evil")]:
        del sys.modules[name]


def plant_template_module(folder: Path, sentinel: Path, module: str = "lf_evil_tpl") -> str:
    (folder / f"{module}.py").write_text(payload(sentinel, EVIL_TEMPLATE), encoding="utf-8")
    write_run(folder, {"name": "gone-template", "class_path": f"{module}:Evil"})  # old format
    return f"{module}:Evil"


def test_run_folder_class_path_is_not_imported(run_copy, tmp_path, in_folder, capsys):
    sentinel = tmp_path / "pwned"
    plant_template_module(run_copy, sentinel)
    in_folder(run_copy)
    message = (
        "loraforge.json of . names template class 'lf_evil_tpl:Evil' (template 'gone-template'), "
        "which is not registered here. loraforge does not import code named by a run folder "
        "unless you pass allow_template_import=True / --allow-template-import (only for a folder "
        "you trust); or install the plugin that registers the template"
    )
    with pytest.raises(TemplateError, match=f"^{re.escape(message)}$"):
        load_for_inference(".", device="cpu")
    assert main(["-q", "chat", ".", "--prompt", "hi"]) == 2
    assert "--allow-template-import" in capsys.readouterr().err
    assert not sentinel.exists()


def test_allowed_template_import_still_skips_the_current_folder(run_copy, tmp_path, in_folder):
    sentinel = tmp_path / "pwned"
    plant_template_module(run_copy, sentinel)
    in_folder(run_copy)
    with pytest.raises(
        TemplateError,
        match=r"module 'lf_evil_tpl' would be imported from the current folder \(.*lf_evil_tpl\.py"
        r"\); loraforge imports template modules from installed packages and PYTHONPATH, "
        r"never implicitly from the current folder\. If you mean it, run with PYTHONPATH=",
    ):
        load_for_inference(".", device="cpu", allow_template_import=True)
    assert not sentinel.exists()


def test_allowed_template_import_from_pythonpath_runs_as_before(
    run_copy, tmp_path, in_folder, monkeypatch, capsys
):
    sentinel = tmp_path / "pwned"
    plant_template_module(run_copy, sentinel)
    in_folder(run_copy)
    monkeypatch.setenv("PYTHONPATH", str(run_copy))  # the user's explicit choice
    chat = load_for_inference(".", device="cpu", allow_template_import=True)
    assert sentinel.read_text() == "ran"
    assert type(chat.template).__name__ == "Evil"
    assert isinstance(chat.chat("hi", max_new_tokens=2), str)
    sentinel.unlink()
    assert main(["-q", "chat", ".", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "--allow-template-import" in capsys.readouterr().err
    argv = ["-q", "chat", ".", "--prompt", "hi", "--max-new-tokens", "2", "--allow-template-import"]
    assert main(argv) == 0  # lf_evil_tpl is imported already: the same class, nothing re-run
    assert not sentinel.exists()


def test_recorded_spec_rebuilds_without_importing(run_copy, tmp_path, in_folder):
    """A declarative template whose module is gone (or never existed here) still loads."""
    sentinel = tmp_path / "pwned"
    plant_template_module(run_copy, sentinel)
    tpl = get_template("chatml")
    spec = template_spec(tpl)
    spec["name"] = "my-chatml"
    write_run(run_copy, {"name": "my-chatml", "class_path": "lf_evil_tpl:Evil", "spec": spec})
    in_folder(run_copy)
    chat = load_for_inference(".", device="cpu")
    assert not sentinel.exists()  # the recorded class path was not imported
    assert chat.template.name == "my-chatml"
    assert chat.template.render(CONV) == tpl.render(CONV)
    assert chat.template.render(CONV, True) == tpl.render(CONV, True)
    assert template_id(chat.template)["spec"] == spec  # a rebuilt template records the same form


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"header": "{role.__class__}"}, "header: '{role.__class__}' may hold no placeholder but"),
        ({"header": "{other}"}, "header: '{other}' may hold no placeholder but {role}"),
        ({"strip_content": "yes"}, "strip_content: invalid value 'yes'"),
        ({"role_names": {"robot": "R"}}, "role_names: invalid value {'robot': 'R'}"),
        ({"chat_template": 3}, "chat_template: invalid value 3"),
        ({"hook": "x"}, "unknown field(s) hook (written by a newer loraforge?)"),
    ],
)
def test_malformed_spec_is_refused(change, problem):
    spec = {**template_spec(get_template("phi-4")), "name": "x", **change}
    with pytest.raises(
        TemplateError, match=f"^loraforge.json of /r: template spec: .*{re.escape(problem)}"
    ):
        template_from_id({"name": "x", "spec": spec}, where="loraforge.json of /r")


def test_missing_spec_fields_are_listed():
    with pytest.raises(TemplateError, match=r"template spec: prefix: missing; header: missing"):
        template_from_id({"spec": {"name": "x", "description": ""}})


def test_registered_name_that_renders_differently_yields_to_the_record(caplog):
    spec = {**template_spec(get_template("phi-4")), "header": "<|im_start|>{role}\n"}
    with caplog.at_level("WARNING", logger="loraforge.data.templates"):
        tpl = template_from_id({"name": "phi-4", "spec": spec}, where="loraforge.json of /r")
    assert tpl.header == "<|im_start|>{role}\n"
    assert "template 'phi-4' as registered now (built-in) differs from the one" in caplog.text
    assert "(header); using the recorded form" in caplog.text
    same = template_from_id(template_id(get_template("phi-4")))
    assert type(same) is type(get_template("phi-4"))


def test_old_run_files_are_still_read():
    phi4 = type(get_template("phi-4"))
    assert type(template_from_id({"name": "phi-4"})) is phi4
    gone = {"name": "gone", "class_path": "loraforge.data.templates:Phi4Template"}
    assert type(template_from_id(gone)) is phi4  # a registered class: nothing to import
    with pytest.raises(TemplateError, match=r"names no template"):
        template_from_id({"name": "gone"})


def test_script_template_that_overrides_segments_needs_the_caller():
    tid = {"name": "s", "class_path": "__main__:Script", "spec": None}
    with pytest.raises(
        TemplateError,
        match=r"defined in the training script itself; it overrides segments\(\), so the run "
        r"could not record a form that rebuilds it\. Pass the class from your own code: "
        r"load_for_inference\(path, template=YourTemplate\)",
    ):
        template_from_id(tid, allow_import=True)


def test_load_for_inference_takes_the_template_from_the_caller(run_copy, caplog):
    class Mine(PromptTemplate):
        name = "mine"
        header = "<|im_start|>{role}\n"
        end_of_turn = "<|im_end|>"
        generation_prompt = "<|im_start|>assistant\n"

        def segments(self, messages, add_generation_prompt=False):
            return super().segments(messages, add_generation_prompt)

    write_run(run_copy, template_id(Mine()))  # records class_path test_untrusted...:Mine
    with pytest.raises(TemplateError, match="allow_template_import"):
        load_for_inference(run_copy, device="cpu")
    chat = load_for_inference(run_copy, device="cpu", template=Mine)
    assert type(chat.template) is Mine
    write_run(run_copy, template_id(get_template("phi-4")))
    with caplog.at_level("WARNING", logger="loraforge.inference"):
        load_for_inference(run_copy, device="cpu", template="chatml")
    assert (
        "differs from the one" in caplog.text and "prompts will not match training" in caplog.text
    )


# --------------------------------------------------------------------------- user class paths

CWD_MODULES = {
    "module": {"lf_evil_cwd.py": EVIL_TEMPLATE},
    "package": {"lf_evil_pkg/__init__.py": "", "lf_evil_pkg/sub.py": EVIL_TEMPLATE},
}


@pytest.mark.parametrize(
    ("kind", "path"), [("module", "lf_evil_cwd:Evil"), ("package", "lf_evil_pkg.sub:Evil")]
)
def test_user_class_path_never_comes_from_the_current_folder(
    tmp_path, in_folder, monkeypatch, kind, path
):
    sentinel = tmp_path / "pwned"
    work = tmp_path / "work"
    for name, body in CWD_MODULES[kind].items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(payload(sentinel, body) if body else "", encoding="utf-8")
    in_folder(work)
    with pytest.raises(TemplateError, match=r"would be imported from the current folder"):
        get_template(path)
    assert not sentinel.exists()
    monkeypatch.setenv("PYTHONPATH", ".")  # documented: put the folder on PYTHONPATH
    assert type(get_template(path)).__name__ == "Evil"
    assert sentinel.exists()


def test_user_class_path_from_sys_path_elsewhere_works(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "lf_evil_lib.py").write_text(EVIL_TEMPLATE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.chdir(tmp_path)
    try:
        assert get_template("lf_evil_lib:Evil").name == "evil"
    finally:
        sys.modules.pop("lf_evil_lib", None)


# --------------------------------------------------------------------------- templates in scripts


def test_templates_registered_by_user_code_are_not_built_in():
    class Mine(PromptTemplate):
        name = "mine-registered"
        end_of_turn = "</s>"

    register_template(Mine)
    listed = list_templates()
    assert listed["mine-registered"] == f"registered ({__name__})"
    assert listed["phi-4"] == "built-in"


def test_check_recordable():
    class Declarative(PromptTemplate):
        name = "decl"
        end_of_turn = "</s>"

    class Custom(Declarative):
        def segments(self, messages, add_generation_prompt=False):
            return super().segments(messages, add_generation_prompt)

    class ScriptDeclarative(Declarative):
        __module__ = "__main__"

    class ScriptCustom(Custom):
        __module__ = "__main__"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_recordable(Declarative())
        check_recordable(get_template("phi-4"))
        check_recordable(ScriptDeclarative())  # its declarative form is recorded: no warning
    with pytest.warns(
        UserWarning, match=r"defined in the running script \(__main__\), so no later"
    ):
        check_recordable(ScriptCustom())
    with pytest.warns(
        UserWarning,
        match=re.escape(
            f"loraforge chat will import {__name__}:test_check_recordable.<locals>.Custom"
        )
        + r" only with --allow-template-import",
    ):
        check_recordable(Custom())


SCRIPT = """
import json, sys
from typing import ClassVar
from loraforge import PromptTemplate, register_template, train
from loraforge.data.templates import list_templates
from loraforge.demo import demo_recipe, prepare_tiny_base


@register_template
class ScriptTemplate(PromptTemplate):
    name = "script-vicuna"
    header = "{role}: "
    role_names: ClassVar = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
    end_of_turn = "</s>"
    separator = "\\n"
    generation_prompt = "ASSISTANT: "


out = sys.argv[1]
base = prepare_tiny_base(out + "/base", hidden_size=64)
recipe = demo_recipe(base, out + "/run", template="script-vicuna", max_steps=2, batch_size=2)
train(recipe)
conv = [{"role": "user", "content": "hi"}]
print(json.dumps({
    "listed": list_templates()["script-vicuna"],
    "prompt": ScriptTemplate().render(conv, add_generation_prompt=True),
}))
"""


def _train_with_a_script_template(folder: Path) -> dict:
    script = folder / "train_it.py"
    script.write_text(SCRIPT, encoding="utf-8")
    return {"args": [sys.executable, str(script), str(folder / "out")], "cwd": folder}


@pytest.mark.integration
@background(_train_with_a_script_template)
def test_template_defined_in_a_script_survives_to_chat(background_run, tmp_path, monkeypatch):
    """The script trains in its own interpreter; the chat is here, in a process that never saw
    the script's class (asserted), from another folder."""
    folder, trained = background_run
    work = folder / "out"
    assert trained.returncode == 0, trained.stderr[-3000:]
    made = json.loads(trained.stdout.strip().splitlines()[-1])
    assert made["listed"] == "registered (__main__)"
    run = json.loads((work / "run" / "loraforge.json").read_text(encoding="utf-8"))
    assert run["template"]["class_path"] == "__main__:ScriptTemplate"
    assert run["template"]["spec"]["end_of_turn"] == "</s>"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert "script-vicuna" not in list_templates()
    assert not hasattr(sys.modules["__main__"], "ScriptTemplate")
    chat = load_for_inference(work / "run", device="cpu")
    conv = [{"role": "user", "content": "hi"}]
    assert chat.template.name == "script-vicuna"
    prompt = chat.template.render(conv, add_generation_prompt=True)
    assert prompt == made["prompt"] == "USER: hi</s>\nASSISTANT: "
    assert chat.stop_strings == ["</s>"]
    answer = chat.chat("hi", max_new_tokens=4)
    assert isinstance(answer, str) and "</s>" not in answer
