"""The template registry: built-ins, names, "pkg.module:Class" paths and entry-point plugins."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import loraforge
from loraforge import (
    LoraForgeError,
    PromptTemplate,
    TemplateError,
    UnknownTemplateError,
    get_template,
    list_templates,
    register_template,
)
from loraforge.data import templates
from loraforge.data.templates import ENTRY_POINT_GROUP, Phi4Template, template_id, template_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_template"
BUILT_INS = ["chatml", "llama-3", "phi-3", "phi-4", "phi-4-mini"]
_unique = itertools.count()


@pytest.fixture(autouse=True)
def fresh_registry():
    """Forget plugins (and anything registered with a non-built-in source) around each test."""
    templates._reset_plugins()
    yield
    templates._reset_plugins()


@pytest.fixture
def module_factory(tmp_path, monkeypatch):
    """Write importable modules under tmp_path; each gets a unique name, forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str, stem: str = "lf_test_mod") -> str:
        name = f"{stem}_{next(_unique)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- fake distributions


class FakeDistribution(metadata.Distribution):
    """An installed distribution that exists only in memory: METADATA and entry_points.txt."""

    def __init__(self, name: str, entry_points: str) -> None:
        self._name = name
        self._entry_points = entry_points

    def read_text(self, filename):
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: 1.0\n"
        if filename == "entry_points.txt":
            return self._entry_points
        return None

    def locate_file(self, path):
        return Path(path)


class FakeFinder(metadata.DistributionFinder):
    """A sys.meta_path finder that imports nothing and only reports the fake distributions."""

    def __init__(self) -> None:
        self.dists: list[FakeDistribution] = []

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):  # noqa: B008
        want = context.name
        norm = metadata.Prepared.normalize
        return iter(d for d in self.dists if want is None or norm(d.metadata["Name"]) == norm(want))


@pytest.fixture
def fake_plugins(monkeypatch):
    """``add(dist_name, {entry_name: "module:Class"})`` makes a plugin visible to entry_points()."""
    finder = FakeFinder()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, finder])

    def add(dist_name: str, entry_points: dict[str, str]) -> FakeDistribution:
        lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
        dist = FakeDistribution(dist_name, "\n".join(lines) + "\n")
        finder.dists.append(dist)
        return dist

    return add


PLUGIN_SOURCE = """
    from loraforge import PromptTemplate

    class PipeTemplate(PromptTemplate):
        name = "pipe-test"
        description = "a test plugin"
        header = "|{role}| "
        end_of_turn = " |end|"
        separator = "\\n"
        generation_prompt = "|assistant| "

    class Nameless(PipeTemplate):
        name = ""

    class Clash(PipeTemplate):
        name = "phi-4"

    def not_a_template():
        pass

    class Outer:
        class Inner(PipeTemplate):
            name = ""

    instance = PipeTemplate()
"""


# --------------------------------------------------------------------------- built-ins and names


def test_built_ins_listed_sorted():
    listed = list_templates()
    assert list(listed) == sorted(listed)
    for name in BUILT_INS:
        assert listed[name] == "built-in"
        assert get_template(name).name == name


def test_get_template_accepts_class_and_instance():
    assert type(get_template(Phi4Template)) is Phi4Template
    tpl = Phi4Template()
    assert get_template(tpl) is tpl
    assert template_id(tpl) == {
        "class_path": "loraforge.data.templates:Phi4Template",
        "name": "phi-4",
        "spec": template_spec(tpl),
    }
    assert template_spec(tpl)["end_of_turn"] == "<|im_end|>"


def test_get_template_rejects_other_types():
    with pytest.raises(
        TemplateError, match=r"^template must be a name or a PromptTemplate, got 42$"
    ):
        get_template(42)


def test_duplicate_name_raises():
    class AnotherPhi4(PromptTemplate):
        name = "phi-4"

    message = (
        "a template named 'phi-4' is already registered "
        "(built-in: loraforge.data.templates:Phi4Template); choose another name"
    )
    with pytest.raises(TemplateError, match=f"^{re.escape(message)}$"):
        register_template(AnotherPhi4)
    with pytest.raises(TemplateError, match=re.escape(message)):
        register_template(PromptTemplate, name="phi-4", source="test")
    assert type(get_template("phi-4")) is Phi4Template


def test_duplicate_of_a_registered_template_names_its_source():
    @register_template(source="test (first)")
    class First(PromptTemplate):
        name = "dup-test"

    class Second(PromptTemplate):
        name = "dup-test"

    with pytest.raises(
        TemplateError,
        match=re.escape(
            f"a template named 'dup-test' is already registered (test (first): "
            f"{First.__module__}:{First.__qualname__}); choose another name"
        ),
    ):
        register_template(Second, source="test (second)")
    assert type(get_template("dup-test")) is First
    assert list_templates()["dup-test"] == "test (first)"


def test_register_bare_and_as_decorator_with_name():
    class Base(PromptTemplate):
        name = "base-test"
        header = "{role}> "

    assert register_template(Base, source="test") is Base
    renamed = register_template(Base, name="renamed-test", source="test")
    assert renamed is not Base and issubclass(renamed, Base)
    assert (renamed.name, Base.name) == ("renamed-test", "base-test")
    assert get_template("renamed-test").render([{"role": "user", "content": "x"}]) == "user> x"

    @register_template(name="decorated-test", source="test")
    class Decorated(PromptTemplate):
        pass

    assert Decorated.name == "decorated-test"
    assert type(get_template("decorated-test")) is Decorated
    assert template_id(get_template("decorated-test"))["name"] == "decorated-test"
    assert {"base-test", "renamed-test", "decorated-test"} <= set(list_templates())


@pytest.mark.parametrize("bad", ["", " padded", "padded ", "pkg.mod:Cls"])
def test_register_malformed_name(bad):
    class Bad(PromptTemplate):
        name = bad

    message = (
        f"template {Bad.__qualname__} needs a non-empty `name` without spaces at its ends "
        f"or ':' (got {bad!r})"
    )
    with pytest.raises(TemplateError, match=f"^{re.escape(message)}$"):
        register_template(Bad, source="test")
    assert bad not in list_templates()


@pytest.mark.parametrize("thing", [object, Phi4Template(), "phi-4", None.__class__])
def test_register_non_template(thing):
    with pytest.raises(
        TemplateError, match=r"^register_template expects a PromptTemplate subclass, got "
    ):
        register_template(thing, source="test")


def test_unknown_name_lists_known_and_nearest():
    with pytest.raises(UnknownTemplateError) as info:
        get_template("phi4")
    err = info.value
    known = ", ".join(sorted(list_templates()))
    assert str(err) == (
        f"unknown template 'phi4'. Did you mean 'phi-4'? Known templates: {known} "
        "(or give 'package.module:Class')."
    )
    for name in BUILT_INS:
        assert name in known
    # Also a KeyError for callers that catch that, but printed without KeyError's quotes.
    assert isinstance(err, KeyError) and isinstance(err, LoraForgeError)


@pytest.mark.parametrize(
    ("typo", "nearest"), [("phi-4-min", "phi-4-mini"), ("llama3", "llama-3"), ("chat-ml", "chatml")]
)
def test_unknown_name_suggestions(typo, nearest):
    with pytest.raises(UnknownTemplateError, match=re.escape(f"Did you mean {nearest!r}?")):
        get_template(typo)


def test_unknown_name_without_close_match():
    with pytest.raises(UnknownTemplateError, match=r"^unknown template 'zzzz'\. Known templates: "):
        get_template("zzzz")


# --------------------------------------------------------------------------- "pkg.module:Class"


def test_class_path_escape_hatch(module_factory):
    mod = module_factory(PLUGIN_SOURCE)
    tpl = get_template(f"{mod}:PipeTemplate")
    assert type(tpl).__name__ == "PipeTemplate"
    assert tpl.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "|user| hi |end|\n|assistant| "
    )
    # Not registered by being named: list_templates() is unchanged, the path is its identity.
    assert "pipe-test" not in list_templates()
    assert template_id(tpl) == {"class_path": f"{mod}:PipeTemplate", "spec": template_spec(tpl)}
    assert type(get_template(template_id(tpl)["class_path"])) is type(tpl)
    nested = get_template(f"{mod}:Outer.Inner")
    assert template_id(nested)["class_path"] == f"{mod}:Outer.Inner"


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        (
            "loraforge_no_such_module_xyz:Foo",
            UnknownTemplateError,
            "cannot import template class 'loraforge_no_such_module_xyz:Foo': "
            "No module named 'loraforge_no_such_module_xyz'",
        ),
        (
            "{mod}:Missing",
            UnknownTemplateError,
            "cannot import template class '{mod}:Missing': module '{mod}' has no attribute "
            "'Missing'",
        ),
        (
            "{mod}:Outer.Missing",
            UnknownTemplateError,
            "cannot import template class '{mod}:Outer.Missing': type object 'Outer' has no "
            "attribute 'Missing'",
        ),
        (
            "{mod}:not_a_template",
            TemplateError,
            "'{mod}:not_a_template' is not a PromptTemplate subclass (got <function "
            "not_a_template at ",
        ),
        (
            "{mod}:instance",
            TemplateError,
            "'{mod}:instance' is not a PromptTemplate subclass "
            "(got PipeTemplate(name='pipe-test'))",
        ),
    ],
)
def test_bad_class_path(module_factory, path, error, message):
    mod = module_factory(PLUGIN_SOURCE)
    with pytest.raises(error, match="^" + re.escape(message.format(mod=mod))):
        get_template(path.format(mod=mod))


@pytest.mark.parametrize("path", [":PipeTemplate", "..relative:PipeTemplate", "pkg.mod:"])
def test_malformed_class_path_is_a_loraforge_error(path):
    with pytest.raises(UnknownTemplateError, match=r"must look like 'package.module:Class'"):
        get_template(path)


# --------------------------------------------------------------------------- entry-point plugins


def test_plugin_discovered_from_entry_point(fake_plugins, module_factory):
    mod = module_factory(PLUGIN_SOURCE)
    fake_plugins("loraforge-template-pipe", {"pipe": f"{mod}:PipeTemplate"})
    listed = list_templates()
    assert listed["pipe-test"] == "plugin (loraforge-template-pipe)"  # cls.name wins over "pipe"
    assert "pipe" not in listed
    assert all(listed[name] == "built-in" for name in BUILT_INS)
    tpl = get_template("pipe-test")
    assert tpl.render([{"role": "user", "content": "hi"}]) == "|user| hi |end|\n"
    assert template_id(tpl) == {
        "class_path": f"{mod}:PipeTemplate",
        "name": "pipe-test",
        "spec": template_spec(tpl),
    }
    # The nearest-name hint knows about plugins too.
    with pytest.raises(UnknownTemplateError, match=re.escape("Did you mean 'pipe-test'?")):
        get_template("pipe-tset")


def test_plugin_found_by_get_template_alone(fake_plugins, module_factory):
    mod = module_factory(PLUGIN_SOURCE)
    fake_plugins("loraforge-template-pipe", {"pipe": f"{mod}:PipeTemplate"})
    assert get_template("pipe-test").name == "pipe-test"


def test_nameless_plugin_takes_entry_point_name(fake_plugins, module_factory):
    mod = module_factory(PLUGIN_SOURCE)
    fake_plugins("nameless-dist", {"from-entry-point": f"{mod}:Nameless"})
    assert list_templates()["from-entry-point"] == "plugin (nameless-dist)"
    assert get_template("from-entry-point").name == "from-entry-point"


def test_plugins_discovered_once_and_reset(fake_plugins, module_factory, monkeypatch):
    mod = module_factory(PLUGIN_SOURCE)
    fake_plugins("loraforge-template-pipe", {"pipe": f"{mod}:PipeTemplate"})
    calls = []
    real = templates._iter_entry_points
    monkeypatch.setattr(templates, "_iter_entry_points", lambda: calls.append(1) or real())
    for _ in range(3):
        assert "pipe-test" in list_templates()
        get_template("phi-4")
    assert len(calls) == 1
    templates._reset_plugins()
    assert "pipe-test" in list_templates()  # rediscovered, not "already registered"
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("loraforge_no_such_module_xyz:Foo", "No module named 'loraforge_no_such_module_xyz'"),
        ("{mod}:Missing", "module '{mod}' has no attribute 'Missing'"),
        ("{mod}:not_a_template", "{mod}:not_a_template is not a PromptTemplate subclass"),
        ("{mod}:Clash", "a template named 'phi-4' is already registered (built-in: "),
        ("{boom}:Anything", "boom at import"),
    ],
    ids=["missing-module", "missing-class", "not-a-template", "name-clash", "import-raises"],
)
def test_broken_plugin_warns_and_others_work(fake_plugins, module_factory, value, reason):
    mod = module_factory(PLUGIN_SOURCE)
    boom = module_factory("raise RuntimeError('boom at import')\n", stem="lf_test_boom")
    value, reason = value.format(mod=mod, boom=boom), reason.format(mod=mod)
    fake_plugins("loraforge-template-broken", {"broken": value})
    fake_plugins("loraforge-template-pipe", {"pipe": f"{mod}:PipeTemplate"})
    expected = (
        f"loraforge: template plugin 'broken' from loraforge-template-broken ({value}) "
        f"was not loaded: {reason}"
    )
    with pytest.warns(RuntimeWarning, match="^" + re.escape(expected)):
        listed = list_templates()
    assert listed["pipe-test"] == "plugin (loraforge-template-pipe)"
    assert "broken" not in listed
    assert type(get_template("phi-4")) is Phi4Template
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every lookup
        assert get_template("pipe-test").name == "pipe-test"
        list_templates()


def test_two_plugins_same_name_first_wins(fake_plugins, module_factory):
    mod = module_factory(PLUGIN_SOURCE)
    fake_plugins("dist-a", {"pipe": f"{mod}:PipeTemplate"})
    fake_plugins("dist-b", {"pipe": f"{mod}:PipeTemplate"})
    with pytest.warns(
        RuntimeWarning,
        match=re.escape("template plugin 'pipe' from dist-b")
        + ".*"
        + re.escape("a template named 'pipe-test' is already registered (plugin (dist-a): "),
    ):
        assert list_templates()["pipe-test"] == "plugin (dist-a)"


# --------------------------------------------------------------------------- an installed plugin

PLUGIN_CHECK = r"""
import json, sys
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
import loraforge

conv = json.loads(sys.argv[1])
tpl = loraforge.get_template("vicuna")
tok = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
)
tok.chat_template = type(tpl).chat_template
loraforge.check_template("vicuna", tok)
loraforge.check_template("vicuna", tok, conversations=[conv])
from loraforge.tiny import build_tiny_tokenizer
recipe = loraforge.LoraRecipe(model="m", data="d.json", template="vicuna")
built = loraforge.SFTDatasetBuilder.from_recipe(build_tiny_tokenizer(), recipe).build(
    [{"instruction": "Hi!", "output": "Hello!"}])
print(json.dumps({
    "recipe_rows": len(built),
    "listed": loraforge.list_templates(),
    "render": tpl.render(conv),
    "prompt": tpl.render(conv[:-1], add_generation_prompt=True),
    "trainable": [s.text for s in tpl.segments(conv) if s.trainable],
    "id": loraforge.data.templates.template_id(tpl),
}))
"""

VICUNA_CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def vicuna_site(tmp_path_factory):
    """examples/custom_template installed with pip into a private folder (not on sys.path)."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("pip or setuptools missing: cannot build the example plugin offline")
    src = tmp_path_factory.mktemp("src") / "custom_template"
    shutil.copytree(EXAMPLE, src)  # build in a copy, so no build/ or egg-info in the repo
    site = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "--no-input", "--target", str(site), str(src),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        offline = ("BackendUnavailable", "No module named", "Could not find a version", "network")
        if any(marker in out for marker in offline):
            pytest.skip(f"pip cannot build the example offline:\n{out[-1500:]}")
        pytest.fail(f"pip install of {EXAMPLE} failed:\n{out[-3000:]}")
    return site


def _hide_plugins(folder: Path, tmp: Path) -> Path:
    """``folder``, or where it holds distributions declaring template plugins, a stand-in made
    of symlinks to everything else in it (so an installed plugin is invisible, the rest works).
    """
    hidden = {
        child.name
        for child in folder.iterdir()
        if child.suffix in (".dist-info", ".egg-info")
        and child.is_dir()
        and any(
            ep.group == ENTRY_POINT_GROUP for ep in metadata.PathDistribution(child).entry_points
        )
    }
    if not hidden:
        return folder
    stand_in = tmp / f"{len(list(tmp.iterdir()))}-{folder.name}"
    stand_in.mkdir()
    try:
        for child in folder.iterdir():
            if child.name not in hidden:
                (stand_in / child.name).symlink_to(child)
    except OSError as exc:  # no symlinks here (Windows without the privilege)
        pytest.skip(f"cannot hide the installed template plugins: {exc}")
    return stand_in


@pytest.fixture(scope="module")
def clean_path(tmp_path_factory) -> list[str]:
    """This process's import path with every installed template plugin hidden, for
    ``python -S`` (no site-packages of its own): the subprocess sees the packages this one
    does, the loraforge under test first, and no plugin, whatever this environment has."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import json, sys; print(json.dumps(sys.path))"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    bare = set(json.loads(proc.stdout))  # the standard library, always there
    tmp = tmp_path_factory.mktemp("clean-path")
    out = [str(Path(loraforge.__file__).resolve().parents[1])]
    for entry in dict.fromkeys(sys.path):
        if entry and entry not in bare and Path(entry).is_dir():
            out.append(str(_hide_plugins(Path(entry), tmp)))
    return out


def _run(path: list[str], site: Path | None, *args: str) -> subprocess.CompletedProcess:
    """``python -S *args`` on ``path``, with ``site`` (the private install) first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] * (site is not None) + path)
    cmd = [sys.executable, "-S", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=site or path[0], timeout=120, check=False
    )


LIST_TEMPLATES = "import json, loraforge; print(json.dumps(loraforge.list_templates()))"


def test_hide_plugins_hides_only_plugin_distributions(tmp_path):
    env = tmp_path / "site-packages"
    plugin = env / "lf_fake_plugin-1.0.dist-info"
    plugin.mkdir(parents=True)
    (plugin / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-fake-plugin\nVersion: 1.0\n")
    (plugin / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nfake = lf_fake:Fake\n")
    other = env / "other-2.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 2.0\n")
    (other / "entry_points.txt").write_text("[console_scripts]\nother = other:main\n")
    (env / "lf_fake.py").write_text("")
    (tmp_path / "stand-ins").mkdir()
    stand_in = _hide_plugins(env, tmp_path / "stand-ins")
    assert sorted(p.name for p in stand_in.iterdir()) == ["lf_fake.py", "other-2.0.dist-info"]
    assert (stand_in / "lf_fake.py").resolve() == (env / "lf_fake.py").resolve()
    assert _hide_plugins(stand_in, tmp_path / "stand-ins") == stand_in  # nothing left to hide


@pytest.mark.integration
def test_installed_example_plugin(vicuna_site, clean_path):
    assert (vicuna_site / "loraforge_vicuna.py").is_file()
    proc = _run(clean_path, vicuna_site, "-c", PLUGIN_CHECK, json.dumps(VICUNA_CONV))
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    got = json.loads(proc.stdout)
    assert got["listed"]["vicuna"] == "plugin (loraforge-template-vicuna)"
    assert all(got["listed"][name] == "built-in" for name in BUILT_INS)
    assert got["render"] == (
        "SYSTEM: You are a helpful assistant.</s>\nUSER: Hi!</s>\nASSISTANT: Hello!</s>\n"
    )
    assert got["prompt"] == "SYSTEM: You are a helpful assistant.</s>\nUSER: Hi!</s>\nASSISTANT: "
    assert got["trainable"] == ["Hello!", "</s>"]
    assert got["recipe_rows"] == 1  # a recipe can name the plugin template
    assert {k: got["id"][k] for k in ("class_path", "name")} == {
        "class_path": "loraforge_vicuna:VicunaTemplate",
        "name": "vicuna",
    }
    assert got["id"]["spec"]["end_of_turn"] == "</s>"  # what a run records: rebuildable
    # Without the install folder on the path, the plugin is simply absent.
    proc = _run(clean_path, None, "-c", LIST_TEMPLATES)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)) == BUILT_INS


@pytest.mark.integration
def test_installed_example_plugin_in_cli(vicuna_site, clean_path):
    proc = _run(clean_path, vicuna_site, "-m", "loraforge.cli", "templates")
    assert proc.returncode == 0, proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["vicuna"]), None)
    assert line is not None, proc.stdout
    assert "plugin (loraforge-template-vicuna)" in line
    for name in BUILT_INS:
        assert re.search(rf"^{re.escape(name)}\s", proc.stdout, re.MULTILINE), proc.stdout


@pytest.mark.integration
def test_installed_example_plugin_tests_pass_with_the_plugin_installed(vicuna_site):
    """The README tells users to install the example; the two tests above must not care."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(vicuna_site), env.get("PYTHONPATH")) if p)
    here = "tests/test_registry.py::test_installed_example_plugin"
    probe = subprocess.run(
        [sys.executable, "-c", LIST_TEMPLATES], capture_output=True, text=True, env=env, check=True
    )
    assert "vicuna" in json.loads(probe.stdout)  # installed, as the README has users do
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here, f"{here}_in_cli"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
