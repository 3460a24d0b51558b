"""Fuzzing the data path and the recipe loader (issue 6: "nothing lost under bad input").

Promise: whatever bytes a data file or a recipe holds, the result is a built dataset or a
``LoraForgeError`` naming the file (and, for a record, its line and field) - never another
exception type, and never a silent drop: every record read is either emitted or listed in the
report's ``dropped`` with its raw value (``on_bad_record="skip"``).

The number of generated cases is printed at the end of the module (``pytest -s``) and written to
``$LORAFORGE_FIGURES`` when set (see docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import _figures
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge import DataError, LoraForgeError, LoraRecipe, RecipeError, SFTDatasetBuilder
from loraforge.recipe import LoraRecipe as _LR
from loraforge.tiny import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
TMP = Path(tempfile.mkdtemp(prefix="loraforge-fuzz-"))
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    _figures.flush("test_fuzz")


def _builder(on_bad_record: str) -> SFTDatasetBuilder:
    return SFTDatasetBuilder(
        TOKENIZER, "phi-4", max_length=48, on_bad_record=on_bad_record, system_prompt="s"
    )


def _write(name: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(dir=TMP))
    path = folder / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- data strategies

GOOD = [
    {"instruction": "你好", "output": "嗯。"},
    {"instruction": "q", "input": "x", "output": "a", "system": "sys"},
    {"instruction": "q", "output": "a", "history": [["u", "v"]]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["instruction", "input", "output", "system", "history", "messages", "conversations"]


def _json_line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def record_lines(draw: Any, junk: bool = True) -> bytes:
    """One line of a would-be JSONL file: a record, a damaged record or (``junk``) a line that
    is not JSON at all."""
    kind = draw(st.sampled_from(range(12) if junk else (0, 1, 2, 0, 1, 2, 3, 4, 6, 8)))
    if kind <= 2:
        return _json_line(draw(st.sampled_from(GOOD)))
    if kind == 3:  # a good record with one field replaced by anything
        rec = dict(draw(st.sampled_from(GOOD)))
        rec[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
        return _json_line(rec)
    if kind == 4:  # any JSON value
        return _json_line(draw(JSON_VALUES))
    if kind == 5:  # truncated line
        line = _json_line(draw(st.sampled_from(GOOD)))
        return line[: draw(st.integers(0, len(line) - 1))]
    if kind == 6:  # unpaired surrogates / escapes in strings
        esc = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\u0000", "\\u2028"]))
        return ('{"instruction": "a' + esc + '", "output": "b' + esc + '"}').encode()
    if kind == 7:  # deep nesting
        depth = draw(st.sampled_from([10, 900, 5000, 100_000]))
        return b'{"instruction": ' + b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if kind == 8:  # huge values
        big = draw(st.sampled_from(["s", "int", "float"] if junk else ["s", "float"]))
        if big == "s":
            return _json_line({"instruction": "q" * 50_000, "output": "a"})
        if big == "int":
            return b'{"instruction": "q", "output": "a", "n": ' + b"7" * 5000 + b"}"
        return b'{"instruction": "q", "output": 1e999, "x": NaN, "y": -Infinity}'
    if kind == 9:  # raw bytes, invalid UTF-8 included
        return draw(st.binary(max_size=40))
    if kind == 10:  # whitespace-only and odd separators
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\r", b"\x0b", b"\xe2\x80\xa8", b"\x00"]))
    return draw(st.text(max_size=30)).encode("utf-8", "surrogatepass")


@st.composite
def data_files(draw: Any) -> tuple[str, bytes]:
    junk = draw(st.booleans())  # without junk, every line parses: datasets get built
    lines = draw(st.lists(record_lines(junk), min_size=0, max_size=8))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    shape = draw(st.integers(0, 3))
    # shape 0: a JSON array of the lines' values
    body = b"[" + b",".join(lines) + b"]" if shape == 0 else sep.join(lines)
    if junk and draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # cut anywhere
    prefixes = [b"", b"\xef\xbb\xbf", b" \n"] + ([b"\xff\xfe", b"\xfe\xff"] if junk else [])
    prefix = draw(st.sampled_from(prefixes))
    name = draw(st.sampled_from(["d.jsonl", "d.json", "d.txt", "d"]))
    return name, prefix + body


def _is_jsonl(name: str, raw: bytes) -> bool:
    """The reader's rule: .jsonl, or not .json and not starting with '['."""
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return name.endswith(".jsonl") or (
        not name.endswith(".json") and not text.lstrip().startswith("[")
    )


def _nonblank_lines(raw: bytes) -> int:
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    return sum(1 for row in text.split("\n") if row.strip())


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(
        b, sort_keys=True, default=repr
    )


@settings(FUZZ, max_examples=1000)
@given(data_files(), st.sampled_from(["raise", "skip"]))
def test_any_data_file_builds_or_names_file_line_and_field(file: tuple[str, bytes], mode: str):
    _figures.add("data_file_cases")
    name, raw = file
    path = _write(name, raw)
    builder = _builder(mode)
    try:
        ds = builder.build(path)
    except LoraForgeError as exc:
        _figures.count("data_file_outcomes", "DataError")
        assert isinstance(exc, DataError), repr(exc)
        assert exc.source == str(path) and str(exc).startswith(str(path)), str(exc)
        if exc.index is not None and exc.line is None:  # a record of a JSON array
            assert f"record {exc.index}" in str(exc)
        if exc.field is not None:
            assert f"field {exc.field!r}" in str(exc)
        if exc.index is not None and _is_jsonl(name, raw):
            assert exc.line is not None, str(exc)
        return
    except Exception as exc:  # the promise: nothing but LoraForgeError
        pytest.fail(f"{type(exc).__name__} escaped for {name} {raw[:200]!r}: {exc}")
    _figures.count("data_file_outcomes", "dataset")
    report = builder.report
    assert report is not None
    # nothing lost silently: every record read is emitted or listed as dropped
    assert len(ds) == report.built
    assert report.built + len(report.dropped) == report.records_read
    assert sorted(d.index for d in report.dropped) == sorted({d.index for d in report.dropped})
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    if not _is_jsonl(name, raw):
        assert report.records_read == len(json.loads(text))
    else:
        assert report.records_read == _nonblank_lines(raw)
        rows = [r for r in text.split("\n") if r.strip()]
        for d in report.dropped:  # the raw record travels with the reason
            assert (d.line is not None and str(path) in d.reason) or "token" in d.reason
            assert _same_json(d.record, json.loads(rows[d.index]))
    if mode == "raise":  # only content drops (no supervised token) are possible
        assert all("token" in d.reason for d in report.dropped), report.dropped


# --------------------------------------------------------------------------- one bad field

BAD_VALUES = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.booleans(),
    st.just("\ud800 lone surrogate"),
)


@st.composite
def one_bad_record(draw: Any) -> tuple[list[Any], int, str, Any]:
    fmt = draw(st.sampled_from(["alpaca", "messages", "sharegpt"]))
    n = draw(st.integers(2, 6))
    k = draw(st.integers(0, n - 1))
    recs: list[Any] = []
    for i in range(n):
        if fmt == "alpaca":
            recs.append({"instruction": f"q{i}", "input": "", "output": f"a{i}"})
        elif fmt == "messages":
            recs.append(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"},
                    ]
                }
            )
        else:
            recs.append(
                {
                    "conversations": [
                        {"from": "human", "value": f"q{i}"},
                        {"from": "gpt", "value": f"a{i}"},
                    ]
                }
            )
    if fmt == "alpaca":
        field = draw(st.sampled_from(["instruction", "output", "input", "system"]))
        recs[k][field] = draw(BAD_VALUES)
        expected = field
    else:
        key, role_key, content_key = (
            ("messages", "role", "content")
            if fmt == "messages"
            else ("conversations", "from", "value")
        )
        turn = draw(st.integers(0, 1))
        what = draw(st.sampled_from([content_key, role_key]))
        bad = draw(BAD_VALUES if what == content_key else st.sampled_from(["robot", 7, None]))
        recs[k][key][turn][what] = bad
        expected = f"{key}[{turn}].{what}"
    return recs, k, expected, fmt


@settings(FUZZ, max_examples=300)
@given(one_bad_record(), st.booleans())
def test_one_bad_field_is_named_by_file_line_and_field(case: Any, blank_lines: bool):
    _figures.add("bad_field_cases")
    recs, k, field, fmt = case
    sep = "\n\n" if blank_lines else "\n"
    body = sep.join(json.dumps(r) for r in recs) + "\n"  # \ud800 as an escape
    path = _write("d.jsonl", body.encode("utf-8", "surrogatepass"))
    line = k * (2 if blank_lines else 1) + 1
    builder = _builder("raise")
    builder.format = fmt
    with pytest.raises(DataError) as info:
        builder.build(path)
    err = info.value
    assert (err.source, err.line, err.index) == (str(path), line, k), str(err)
    assert err.field == field, str(err)
    assert str(err).startswith(f"{path}, line {line}, record {k}, field {field!r}: ")
    builder = _builder("skip")
    builder.format = fmt
    ds = builder.build(path)
    report = builder.report
    assert report is not None and len(ds) == len(recs) - 1
    [dropped] = report.dropped
    assert (dropped.index, dropped.line) == (k, line)
    assert _same_json(dropped.record, recs[k]) and field in dropped.reason


# --------------------------------------------------------------------------- recipes

NAMES = [f.name for f in __import__("dataclasses").fields(_LR)]
YAML_SCALARS = st.one_of(
    st.sampled_from(
        [
            "null",
            "~",
            "true",
            "no",
            "on",
            "0",
            "-1",
            "1e-4",
            "1e999",
            ".nan",
            ".inf",
            "-.inf",
            "2001-12-14",
            "0x1F",
            "0o17",
            "'1e-4'",
            '"\\ud800"',
            "[]",
            "{}",
            "!!binary aGk=",
            "!!python/object/apply:os.system ['echo pwned']",
            "!!python/name:os.system",
            "!!float 1",
            "!!str 5",
            "&a 3",
            "*a",
            "[a, b]",
            "{a: 1}",
            "all-linear",
            "phi-4",
            "[qkv_proj]",
            "'",
            '"unterminated',
            "7" * 5000,
            "[" * 700,
        ]
    ),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=15).map(json.dumps),
)


@st.composite
def recipe_texts(draw: Any) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:  # raw junk, invalid UTF-8 included
        return draw(st.binary(max_size=200))
    keys = draw(
        st.lists(st.sampled_from(NAMES) | st.text(min_size=1, max_size=10), min_size=0, max_size=8)
    )
    base = {"model": "m", "data": "d.jsonl"} if kind >= 2 else {}
    lines = [f"{k}: {v}" for k, v in base.items()]
    for key in keys:
        lines.append(f"{json.dumps(key)}: {draw(YAML_SCALARS)}")
    text = "\n".join(lines) + "\n"
    if kind == 5:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=400)
@given(recipe_texts())
def test_any_recipe_yaml_loads_or_raises_recipe_error(text: bytes):
    _figures.add("recipe_cases")
    path = _write("recipe.yaml", text)
    try:
        recipe = LoraRecipe.from_yaml(path)
    except RecipeError as exc:
        _figures.count("recipe_outcomes", "RecipeError")
        assert str(path) in str(exc) and exc.problems, str(exc)
        return
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} escaped for {text[:300]!r}: {exc}")
    _figures.count("recipe_outcomes", "recipe")
    assert isinstance(recipe, LoraRecipe)
    for name in ("learning_rate", "num_epochs", "lora_dropout", "warmup_ratio"):
        assert math.isfinite(getattr(recipe, name))


@pytest.mark.parametrize(
    "text",
    [
        "model: m\ndata: d\neval_data: e\neval_fraction: null\n",
        "model: m\ndata: d\nseed: " + "[" * 5000 + "\n",
        "model: m\ndata: d\nseed: " + "7" * 5000 + "\n",
    ],
    ids=["eval_fraction-null", "deep-nesting", "huge-int"],
)
def test_recipe_bugs_found_by_the_fuzzer_raise_recipe_error(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError):
        LoraRecipe.from_yaml(path)


def test_python_tags_in_a_recipe_are_rejected(tmp_path):
    """yaml.safe_load: a recipe cannot construct Python objects (or run os.system)."""
    for tag in (
        "!!python/object/apply:os.system ['touch {p}']",
        "!!python/object/new:os.system ['touch {p}']",
        "!!python/name:os.system",
        "!!python/module:os",
    ):
        sentinel = tmp_path / "pwned"
        path = tmp_path / "r.yaml"
        path.write_text(f"model: m\ndata: d\nseed: {tag.format(p=sentinel)}\n", encoding="utf-8")
        with pytest.raises(RecipeError, match=r"(?s)r\.yaml.*could not determine a constructor"):
            LoraRecipe.from_yaml(path)
        assert not sentinel.exists()
    _figures.add("python_tag_recipes_rejected", 4)
