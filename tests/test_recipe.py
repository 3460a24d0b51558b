"""`LoraRecipe`: defaults, immutability, YAML round trip and all-at-once validation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import loraforge
from loraforge.errors import RecipeError
from loraforge.recipe import LoraRecipe

REQUIRED = {"model": "LLM-Research/phi-4", "data": "huanhuan.json"}


@pytest.fixture
def recipe() -> LoraRecipe:
    return LoraRecipe(**REQUIRED)


def test_defaults_follow_the_tutorial_except_target_modules(recipe):
    assert recipe.lora_r == 8
    assert recipe.lora_alpha == 32
    assert recipe.lora_dropout == 0.1
    assert recipe.learning_rate == 1e-4
    assert recipe.num_epochs == 3
    assert recipe.max_length == 384
    assert recipe.target_modules == "all-linear"
    assert recipe.template == "phi-4"
    assert recipe.train_on == "all_assistant"
    assert recipe.truncation == "cut_end"
    assert recipe.on_bad_record == "raise"


def test_every_field_has_a_one_line_help():
    helps = LoraRecipe.field_help()
    assert list(helps) == [f.name for f in dataclasses.fields(LoraRecipe)]
    for name, text in helps.items():
        assert text and "\n" not in text, name


def test_frozen(recipe):
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lora_r = 16  # type: ignore[misc]
    assert recipe.lora_r == 8


def test_keyword_only():
    with pytest.raises(TypeError):
        LoraRecipe("LLM-Research/phi-4", "huanhuan.json")  # type: ignore[misc]


def test_slots_reject_unknown_attributes(recipe):
    assert "__slots__" in LoraRecipe.__dict__
    assert not hasattr(recipe, "__dict__")
    # A frozen+slots dataclass raises TypeError on Python <= 3.11 (CPython gh-90562: its
    # __setattr__ closes over the pre-slots class) and FrozenInstanceError later; either way
    # a misspelled attribute can never be set.
    with pytest.raises((AttributeError, TypeError)):
        recipe.lora_rank = 16  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        object.__setattr__(recipe, "lora_rank", 16)
    assert not hasattr(recipe, "lora_rank")


def test_unknown_keyword_in_the_constructor():
    with pytest.raises(TypeError, match="lora_rank"):
        LoraRecipe(**REQUIRED, lora_rank=16)  # type: ignore[call-arg]


def test_yaml_round_trip(tmp_path, recipe):
    custom = recipe.replace(
        data=str(tmp_path / "huanhuan.json"),  # relative paths: see tests/test_validate.py
        target_modules=["qkv_proj", "o_proj"],
        report_to=["tensorboard"],
        lora_r=16,
        learning_rate=2e-4,
        system_prompt="现在你要扮演皇帝身边的女人--甄嬛",
        input_separator="",
        eval_steps=50,
        eval_fraction=0.1,
        save_total_limit=None,
    )
    path = tmp_path / "recipe.yaml"
    text = custom.to_yaml(path)
    assert path.read_text(encoding="utf-8") == text
    data = yaml.safe_load(text)
    assert data["loraforge_version"] == loraforge.__version__
    assert next(iter(data)) == "loraforge_version"
    assert "现在你要扮演" in text  # written as text, not escaped
    back = LoraRecipe.from_yaml(path)
    assert back == custom
    assert back.target_modules == ("qkv_proj", "o_proj")
    assert back.to_yaml() == text
    assert LoraRecipe.from_yaml(tmp_path / "recipe.yaml", overrides={"lora_r": 4}).lora_r == 4


def test_to_dict_gives_plain_values(recipe):
    d = recipe.replace(target_modules=("qkv_proj",)).to_dict()
    assert d["target_modules"] == ["qkv_proj"]
    assert d["report_to"] == []
    assert list(d) == [f.name for f in dataclasses.fields(LoraRecipe)]
    assert LoraRecipe.from_dict(d) == recipe.replace(target_modules=("qkv_proj",))


def test_loraforge_version_key_is_accepted():
    r = LoraRecipe.from_dict({**REQUIRED, "loraforge_version": "0.0.1"})
    assert r == LoraRecipe(**REQUIRED)


def test_unknown_key_suggests_the_nearest_field():
    with pytest.raises(
        RecipeError, match=re.escape("unknown setting 'lora_rank'; did you mean 'lora_r'?")
    ):
        LoraRecipe.from_dict({**REQUIRED, "lora_rank": 16})
    with pytest.raises(
        RecipeError,
        match=re.escape("unknown setting 'learning_rat'; did you mean 'learning_rate'?"),
    ):
        LoraRecipe.from_dict({**REQUIRED, "learning_rat": 1e-4})
    with pytest.raises(RecipeError) as info:
        LoraRecipe.from_dict({**REQUIRED, "zzzz": 1})
    assert info.value.problems == ["unknown setting 'zzzz'"]


def test_all_problems_are_reported_at_once():
    with pytest.raises(RecipeError) as info:
        LoraRecipe.from_dict(
            {
                **REQUIRED,
                "lora_rank": 16,
                "learning_rate": "fast",
                "train_on": "everything",
                "lora_dropout": 1.5,
            }
        )
    problems = info.value.problems
    assert problems == [
        "unknown setting 'lora_rank'; did you mean 'lora_r'?",
        "learning_rate: expected a number, got 'fast'",
        "train_on: must be one of 'all_assistant', 'last_assistant', 'all' (got 'everything')",
        "lora_dropout: must be in [0, 1) (got 1.5)",
    ]
    text = str(info.value)
    assert text.startswith("invalid recipe (4 problem(s)):")
    for p in problems:
        assert f"  - {p}" in text


def test_constructor_reports_all_problems_too():
    with pytest.raises(RecipeError) as info:
        LoraRecipe(lora_r=0, batch_size=0, max_length=1, warmup_ratio=1.0)
    joined = "\n".join(info.value.problems)
    for needle in (
        "model: required",
        "data: required",
        "lora_r: must be >= 1 (got 0)",
        "batch_size: must be unset (null) or an integer >= 1 (got 0)",
        "max_length: must be >= 2 (got 1)",
        "warmup_ratio: must be in [0, 1) (got 1.0)",
    ):
        assert needle in joined
    assert len(info.value.problems) == 6


def test_missing_model_and_data():
    with pytest.raises(RecipeError) as info:
        LoraRecipe()
    assert info.value.problems == [
        "model: required: a local model folder or a hub id such as LLM-Research/phi-4",
        "data: required: a .json array or .jsonl file of training records, a folder saved "
        "by datasets, or a hub dataset id",
    ]
    with pytest.raises(RecipeError, match="data: required"):
        LoraRecipe.from_dict({"model": "m"})
    with pytest.raises(RecipeError, match="model: required"):
        LoraRecipe.from_dict({"data": "d.json", "lora_r": 4})


def test_unknown_key_and_missing_model_are_reported_together():
    with pytest.raises(RecipeError) as info:
        LoraRecipe.from_dict({"data": "d.json", "lr": 1e-4})
    assert info.value.problems[0].startswith("unknown setting 'lr'")
    assert any(p.startswith("model: required") for p in info.value.problems)


def test_yaml_lists_become_tuples_and_string_numbers_are_coerced(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: m\n"
        "data: d.json\n"
        "learning_rate: 1e-4\n"  # YAML 1.1 reads this as the *string* '1e-4'
        "lora_alpha: '16'\n"
        "lora_r: '4'\n"
        "num_epochs: 2\n"
        "max_length: 512.0\n"
        "trust_remote_code: 'no'\n"
        "overwrite_output_dir: 'yes'\n"
        "target_modules: [qkv_proj, o_proj]\n"
        "report_to:\n  - tensorboard\n",
        encoding="utf-8",
    )
    assert yaml.safe_load(path.read_text())["learning_rate"] == "1e-4"
    r = LoraRecipe.from_yaml(path)
    assert r.learning_rate == 1e-4 and isinstance(r.learning_rate, float)
    assert r.lora_alpha == 16 and isinstance(r.lora_alpha, int)
    assert r.lora_r == 4 and isinstance(r.lora_r, int)
    assert r.num_epochs == 2
    assert r.max_length == 512 and isinstance(r.max_length, int)
    assert r.trust_remote_code is False
    assert r.overwrite_output_dir is True
    assert r.target_modules == ("qkv_proj", "o_proj")
    assert r.report_to == ("tensorboard",)
    # a list given to the constructor is frozen into a tuple too
    assert LoraRecipe(**REQUIRED, target_modules=["qkv_proj"]).target_modules == ("qkv_proj",)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora_r", "eight", "lora_r: expected an integer, got 'eight'"),
        ("lora_r", 8.5, "lora_r: must be an integer (got 8.5)"),
        ("learning_rate", True, "learning_rate: expected a number, got True"),
        ("learning_rate", "nan", "learning_rate: must be a finite number (got nan)"),
        ("lora_dropout", 7 * 10**400, "lora_dropout: expected a number, got 7"),
        (
            "overwrite_output_dir",
            "maybe",
            "overwrite_output_dir: expected true or false, got 'maybe'",
        ),
        ("overwrite_output_dir", 1, "overwrite_output_dir: must be true or false (got 1)"),
        (
            "target_modules",
            "qkv_proj",
            "target_modules: must be 'all-linear' or a list of module names (got 'qkv_proj')",
        ),
        (
            "target_modules",
            [],
            "target_modules: must be 'all-linear' or a non-empty list of module names (got ())",
        ),
        ("max_steps", 0, "max_steps: must be -1 (off) or >= 1 (got 0)"),
        ("eval_steps", 0, "eval_steps: must be None or an integer >= 1 (got 0)"),
        ("save_total_limit", 0, "save_total_limit: must be None or an integer >= 1 (got 0)"),
        ("system_prompt", 3, "system_prompt: must be a string or null (got 3)"),
        ("report_to", "wandb", "report_to: must be a list of tracker names (got 'wandb')"),
    ],
)
def test_bad_values_name_the_field(key, value, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        LoraRecipe.from_dict({**REQUIRED, key: value})


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("train_on", "assistant", "'all_assistant', 'last_assistant', 'all'"),
        ("truncation", "left", "'cut_end', 'drop'"),
        ("data_format", "jsonl", "'auto', 'alpaca', 'messages', 'sharegpt'"),
        ("dtype", "bf16", "'auto', 'bfloat16', 'float16', 'float32'"),
        ("model_source", "hf", "'auto', 'modelscope', 'huggingface', 'local'"),
        ("lr_scheduler", "cos", "'linear', 'cosine', 'constant', 'constant_with_warmup'"),
        ("on_bad_record", "ignore", "'raise', 'skip'"),
    ],
)
def test_bad_literal_lists_the_valid_options(key, value, valid):
    with pytest.raises(
        RecipeError, match=re.escape(f"{key}: must be one of {valid} (got {value!r})")
    ):
        LoraRecipe.from_dict({**REQUIRED, key: value})


def test_eval_data_and_eval_fraction_exclude_each_other():
    with pytest.raises(RecipeError, match="eval_data and eval_fraction: give one way"):
        LoraRecipe(**REQUIRED, eval_data="e.json", eval_fraction=0.1)


def test_replace(recipe):
    r2 = recipe.replace(lora_r=16, target_modules=["qkv_proj"])
    assert (r2.lora_r, r2.target_modules) == (16, ("qkv_proj",))
    assert recipe.lora_r == 8  # the original is untouched
    assert r2.replace() == r2
    with pytest.raises(RecipeError, match=re.escape("did you mean 'lora_r'?")):
        recipe.replace(lora_rank=16)
    with pytest.raises(RecipeError, match=re.escape("lora_dropout: must be in [0, 1) (got 1.0)")):
        recipe.replace(lora_dropout=1.0)
    assert recipe.replace(learning_rate="2e-4").learning_rate == 2e-4


def test_from_yaml_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(
        RecipeError, match=re.escape(f"recipe file {str(missing)!r} does not exist")
    ):
        LoraRecipe.from_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(
        RecipeError, match="(?s)" + re.escape(f"invalid recipe {bad}") + ".*not valid YAML"
    ):
        LoraRecipe.from_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="expected a mapping of settings, got list"):
        LoraRecipe.from_yaml(listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: m\ndata: d\nlora_rank: 4\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        LoraRecipe.from_yaml(typo)
    assert info.value.source == str(typo)
    assert str(info.value).startswith(f"invalid recipe {typo} (1 problem(s)):")


def test_empty_yaml_reports_the_required_fields(tmp_path):
    empty = Path(tmp_path / "empty.yaml")
    empty.write_text("", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        LoraRecipe.from_yaml(empty)
    assert [p.split(":")[0] for p in info.value.problems] == ["model", "data"]


def test_recipe_error_is_a_value_error():
    with pytest.raises(ValueError):
        LoraRecipe()
    assert issubclass(RecipeError, loraforge.LoraForgeError)


def test_settings_that_would_do_nothing_are_errors():
    with pytest.raises(RecipeError, match=r"pack_tokens: has no effect with packing: off"):
        LoraRecipe(model="m", data="d", packing="off", pack_tokens=4096)
    with pytest.raises(RecipeError, match=r"eval_steps: has no effect without eval_data"):
        LoraRecipe(model="m", data="d", eval_steps=10)
    LoraRecipe(model="m", data="d", eval_steps=10, eval_fraction=0.1)


def test_batch_size_is_never_silently_dropped_by_packing():
    with pytest.raises(RecipeError, match=r"batch_size: not used with packing: on \(got 4\)"):
        LoraRecipe(model="m", data="d.json", packing="on", batch_size=4)
    packed = LoraRecipe(model="m", data="d.json", packing="on")
    assert packed.batch_size is None and packed.micro_batch_size == 4
    assert LoraRecipe(model="m", data="d.json", batch_size=2).micro_batch_size == 2


def test_step_summary_says_what_a_step_holds_for_each_packing_setting():
    auto = LoraRecipe(model="m", data="d.json")
    assert (
        auto.step_summary().startswith("on a GPU packed rows")
        and "on the CPU 4 padded" in auto.step_summary()
    )
    assert LoraRecipe(model="m", data="d.json", batch_size=2).step_summary() == "2 padded examples"
    on = LoraRecipe(model="m", data="d.json", packing="on", pack_tokens=1024, grad_accum=2)
    assert on.step_summary().startswith("2 x packed rows of up to 1024 tokens")


@pytest.mark.parametrize("field", ["data", "eval_data", "eval_prompts"])
def test_a_path_no_file_can_have_is_named(tmp_path, field):
    """A YAML escape can put an unpaired surrogate in a path (found by the fuzz test: ``~`` then
    one made ``expanduser`` raise UnicodeEncodeError); it is a recipe error naming the field."""
    path = tmp_path / "r.yaml"
    path.write_text(f'data: d.json\n{field}: "~\\ud800\\udc00"\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=f"{field}: holds characters no file name"):
        LoraRecipe.from_yaml(path)
