"""Hostile records never kill a run or eat the machine, and errors say what happened.

1. A deeply nested skipped record (600 and 10,000 levels) is summarised with bounded depth and
   size in the data report and written verbatim to ``skipped.jsonl``; the run's final save works.
2. A full disk while writing ``skipped.jsonl`` is a ``DiskFullError`` naming the folder.
3. A model folder holding pickle weights is a ``ModelError`` naming the file; nothing is
   unpickled (a payload that would create a file does not run).
4. A 10 MB string is tokenized only as far as truncation needs: bounded memory, and the same
   examples as tokenizing it whole (Hypothesis property).
"""

from __future__ import annotations

import errno
import json
import os
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from loraforge import DataError, DiskFullError, ModelError, SFTDatasetBuilder, train
from loraforge.data.builder import IGNORE_INDEX, MAX_RECORD_DEPTH, DroppedRecord
from loraforge.data.records import to_messages
from loraforge.data.templates import Segment
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.models import load_model
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer, sample_data_path
from loraforge.training import files, guards

TOKENIZER = build_tiny_tokenizer()
RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:6]
MB = 1024 * 1024


def nested_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dict(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def deep_json(depth: int, kind: str) -> str:
    """A record whose output nests ``depth`` levels, as JSON text (built without recursion)."""
    if kind == "list":
        inner = "[" * depth + "]" * depth
    else:
        inner = '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)
    return '{"instruction": "hi", "output": ' + inner + "}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepare_tiny_base(tmp_path_factory.mktemp("hostile") / "base", hidden_size=64)


def builder(**kw: Any) -> SFTDatasetBuilder:
    return SFTDatasetBuilder(TOKENIZER, "phi-4", max_length=kw.pop("max_length", 64), **kw)


# =========================================================================== 1. deep records


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_deep_skipped_record_from_a_file_is_summarised_and_written_verbatim(tmp_path, kind):
    deep_line = deep_json(600, kind)
    lines = [json.dumps(RECORDS[0]), deep_line, json.dumps(RECORDS[1])]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\r\n", encoding="utf-8")
    b = builder(on_bad_record="skip")
    assert len(b.build(data)) == 2
    report = b.report
    assert report is not None
    [dropped] = report.dropped
    assert (dropped.index, dropped.line) == (1, 2)
    assert "field 'output': must be a string" in dropped.reason
    assert dropped.record is None  # deeper than MAX_RECORD_DEPTH: not kept as a value
    assert dropped.raw == deep_line  # the line as read
    assert len(dropped.summary) <= 500 and dropped.summary.startswith("{'instruction': 'hi'")
    repr(dropped)  # printable
    # the report: bounded, JSON-ready (this raised RecursionError in dataclasses.asdict)
    data_report = report.to_dict()
    text = files.json_text(data_report, indent=2)
    assert len(text) < 4000
    assert data_report["dropped"] == [
        {"index": 1, "line": 2, "reason": dropped.reason, "record_repr": dropped.summary}
    ]
    # skipped.jsonl: the raw line, exactly as read
    skipped = tmp_path / "skipped.jsonl"
    guards.write_skipped_records(skipped, report.dropped)
    [line] = skipped.read_text(encoding="utf-8").splitlines()
    assert line.endswith(', "record": ' + deep_line + "}")
    entry = json.loads(line)
    assert (entry["index"], entry["line"], entry["reason"]) == (1, 2, dropped.reason)
    assert entry["record"] == json.loads(deep_line)


def test_shallow_skipped_records_keep_their_value_and_json(tmp_path):
    recs = [RECORDS[0], {"instruction": "q", "output": [[1, {"x": "\u2028"}]]}, "text"]
    b = builder(on_bad_record="skip")
    b.build(recs)
    assert b.report is not None
    assert [d.record for d in b.report.dropped] == [recs[1], recs[2]]
    assert [d.raw for d in b.report.dropped] == [None, None]
    path = tmp_path / "skipped.jsonl"
    guards.write_skipped_records(path, b.report.dropped)
    rows = path.read_text(encoding="utf-8").splitlines()  # U+2028 escaped: still 2 lines
    assert [json.loads(r)["record"] for r in rows] == [recs[1], recs[2]]


@pytest.mark.parametrize("make", [nested_list, nested_dict])
def test_record_10000_deep_in_memory_is_skipped_with_a_bounded_repr(tmp_path, make):
    deep = {"instruction": "hi", "output": make(10_000)}
    b = builder(on_bad_record="skip")
    assert len(b.build([RECORDS[0], deep])) == 1
    assert b.report is not None
    [dropped] = b.report.dropped
    assert dropped.index == 1 and dropped.record is None and dropped.raw is None
    assert len(dropped.summary) <= 500
    assert len(files.json_text(b.report.to_dict())) < 4000
    path = tmp_path / "skipped.jsonl"
    guards.write_skipped_records(path, b.report.dropped)
    [entry] = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert entry["record_repr"] == dropped.summary and "record" not in entry
    # with on_bad_record="raise" the record is named, never a RecursionError
    with pytest.raises(DataError, match=r"<list>, record 1, field 'output': must be a string"):
        builder().build([RECORDS[0], deep])


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_record_10000_deep_in_a_file_names_the_line(tmp_path, mode):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n" + deep_json(10_000, "list") + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: unreadable JSON \(nested too deeply"):
        builder(on_bad_record=mode).build(data)


def test_dropped_record_keeps_values_up_to_the_depth_limit():
    ok = {"instruction": "hi", "output": nested_list(MAX_RECORD_DEPTH - 1)}
    too_deep = {"instruction": "hi", "output": nested_list(MAX_RECORD_DEPTH)}
    b = builder(on_bad_record="skip")
    b.build([RECORDS[0], ok, too_deep])
    assert b.report is not None
    assert [d.record for d in b.report.dropped] == [ok, None]


def test_error_messages_quote_user_values_boundedly():
    huge_role = "r" * 1_000_000
    with pytest.raises(DataError) as info:
        builder().build([{"messages": [{"role": huge_role, "content": "x"}]}])
    assert "unknown role 'rrrr" in str(info.value) and len(str(info.value)) < 400
    many_keys = {f"k{i}": i for i in range(100_000)} | {1: "int key"}
    with pytest.raises(DataError, match=r"cannot tell the record format from \[.*more\]") as info:
        builder().build([many_keys])
    assert len(str(info.value)) < 600


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_train_with_a_deep_skipped_record_saves(base, tmp_path, kind):
    deep_line = deep_json(600, kind)
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    lines.insert(2, deep_line)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = demo_recipe(
        base,
        tmp_path / "run",
        data=str(data),
        on_bad_record="skip",
        max_steps=2,
        num_epochs=1,
        batch_size=2,
        logging_steps=1,
    )
    result = train(recipe)  # raised RecursionError in the final save
    out = result.output_dir
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["records_read"] == len(lines) and report["built"] == len(RECORDS)
    [summary] = report["dropped"]
    assert (summary["index"], summary["line"]) == (2, 3)
    assert len(summary["record_repr"]) <= 500
    assert report["skipped_records_file"] == "skipped.jsonl"
    [entry] = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert (entry["index"], entry["line"]) == (2, 3)
    assert entry["record"] == json.loads(deep_line)
    assert (out / "adapter_model.safetensors").is_file()


# =========================================================================== 2. disk full


def _enospc_on(monkeypatch: pytest.MonkeyPatch, name_part: str) -> list[str]:
    """Make os.write fail with ENOSPC on files whose name holds ``name_part``."""
    real_write = os.write
    hits: list[str] = []

    def write(fd: int, data: Any) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name_part in os.path.basename(target):
            hits.append(target)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return hits


def test_disk_full_writing_skipped_records_names_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "skipped.jsonl"
    path.write_text("previous\n")
    dropped = [DroppedRecord(3, "bad", 4, {"x": 1}, '{"x": 1}')]
    hits = _enospc_on(monkeypatch, "skipped.jsonl")
    with pytest.raises(
        DiskFullError,
        match=rf"disk full while writing the skipped records to "
        rf"{tmp_path} \(OSError: \[Errno {errno.ENOSPC}\]",
    ) as info:
        guards.write_skipped_records(path, dropped)
    monkeypatch.undo()
    assert hits and info.value.folder == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skipped.jsonl"]  # no temporary left
    assert path.read_text() == "previous\n"  # the old file is intact


@pytest.mark.integration
def test_train_with_a_full_disk_for_skipped_records_raises_disk_full(base, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS] + ['{"instruction": "no output"}']
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    recipe = demo_recipe(base, out, data=str(data), on_bad_record="skip", max_steps=1)
    _enospc_on(monkeypatch, "skipped.jsonl")
    with pytest.raises(DiskFullError, match=rf"writing the skipped records to {out} ") as info:
        train(recipe)
    assert info.value.folder == str(out)
    assert not [p for p in out.iterdir() if "skipped" in p.name]


# =========================================================================== 3. pickle weights


class _Payload:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


def _pickle_model_folder(folder: Path, payload: Path | None) -> Path:
    model = build_tiny_model(TOKENIZER, hidden_size=32, intermediate_size=64)
    model.save_pretrained(str(folder), safe_serialization=True)
    TOKENIZER.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    weights = {"x": _Payload(payload)} if payload else model.state_dict()
    torch.save(weights, folder / "pytorch_model.bin")  # what safe_serialization=False wrote
    return folder


@pytest.mark.parametrize("malicious", [False, True])
def test_pickle_weights_are_refused_naming_the_file(tmp_path, malicious):
    sentinel = tmp_path / "pwned"
    folder = _pickle_model_folder(tmp_path / "m", sentinel if malicious else None)
    with pytest.raises(
        ModelError,
        match=r"holds its weights as pickle \(pytorch_model\.bin\), not safetensors; loraforge "
        r"never unpickles weights .* Convert them to safetensors",
    ) as info:
        load_model(str(folder), dtype=torch.float32)
    assert str(folder) in str(info.value)
    assert not sentinel.exists()


def test_safetensors_beside_a_malicious_pickle_is_what_loads(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "m"
    build_tiny_model(TOKENIZER, hidden_size=32, intermediate_size=64).save_pretrained(
        str(folder), safe_serialization=True
    )
    torch.save({"x": _Payload(sentinel)}, folder / "pytorch_model.bin")
    model = load_model(str(folder), dtype=torch.float32)
    assert model.config.hidden_size == 32 and not sentinel.exists()


@pytest.mark.integration
def test_train_on_a_pickle_model_raises_model_error(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = _pickle_model_folder(tmp_path / "m", sentinel)
    recipe = demo_recipe(folder, tmp_path / "run", max_steps=1)
    # train() refuses it among the model settings, before loading (check_model_source)
    with pytest.raises(
        ModelError, match=r"holds no weights \(\*\.safetensors\); it has pytorch_model\.bin"
    ):
        train(recipe)
    assert not sentinel.exists()


# =========================================================================== 4. bounded work

# pieces that stress the cut: long single pieces (runs of one letter, of spaces, of CJK), words,
# newlines, digits, punctuation, characters the vocabulary merges and ones it does not
PIECES = ["q", " ", "  ", "\n", "皇上", "臣妾", "，", "hello", " world", "123", "!?", "🙂", "a b"]
TEXTS = st.lists(
    st.tuples(st.sampled_from(PIECES), st.integers(1, 3000)), min_size=1, max_size=6
).map(lambda runs: "".join(p * n for p, n in runs))
PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


class _LengthSpy:
    """Wraps the plain tokenizer: records the longest text it is asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[int] = []

    @property
    def longest(self) -> int:
        return max(self.seen, default=0)

    def _see(self, texts: Any) -> None:
        self.seen += [len(t) for t in texts]
        assert self.longest <= 200_000, f"the tokenizer was handed {self.longest} characters"

    def encode(self, text: str, **kw: Any) -> Any:
        self._see([text])
        return self.inner.encode(text, **kw)

    def encode_batch(self, texts: list[str], **kw: Any) -> Any:
        self._see(texts)
        return self.inner.encode_batch(texts, **kw)


def content(text: str) -> list[Segment]:
    return [Segment(text, trainable=True, content=True)]


@PROPERTY
@given(TEXTS, st.integers(2, 40))
@example("q" * 20_000, 3)  # a cut inside one long piece
@example(" " * 20_000 + "x", 2)
def test_cut_text_gives_the_first_tokens_of_the_whole(text, limit):
    seg = builder().segment_tokenizer
    [[whole]] = seg.encode_many([content(text)])
    [[ids]], [cut] = seg.encode_many_bounded([content(text)], limit)
    event("cut" if cut else "whole")
    if cut:
        assert len(text) > seg._width(limit)
        assert len(ids) >= limit and ids == whole[: len(ids)]
    else:
        assert ids == whole


def test_a_long_piece_ending_at_the_cut_grows_the_prefix():
    seg = builder().segment_tokenizer
    limit = 5
    width = seg._width(limit)
    # the prefix ends with " hello" after one long piece: no piece is complete before the last
    # two, and the last is short; the prefix is doubled
    text = "q" * (width - 6) + " hello" + " ab" * 5000
    [[whole]] = seg.encode_many([content(text)])
    spy = seg._plain = _LengthSpy(seg._plain)
    [[ids]], [cut] = seg.encode_many_bounded([content(text)], limit)
    assert cut and len(ids) >= limit and ids == whole[: len(ids)]
    assert spy.seen == [width, 2 * width]


@st.composite
def records(draw: Any) -> list[dict[str, str]]:
    n = draw(st.integers(1, 3))
    return [
        {"instruction": draw(TEXTS | st.just("hi")), "output": "a" + draw(TEXTS | st.just("ok"))}
        for _ in range(n)
    ]


@PROPERTY
@given(records(), st.integers(2, 40), st.sampled_from(["cut_end", "drop"]))
def test_built_examples_equal_tokenizing_whole_texts(recs, max_length, truncation):
    b = builder(max_length=max_length, truncation=truncation)
    long = [r for r in recs for t in r.values() if len(t) > b.segment_tokenizer._width(max_length)]
    event("a text is cut" if long else "no text cut")
    expected = []
    for r in recs:  # reference: encode_messages tokenizes the whole texts
        ex = b.encode_messages(to_messages(r, "alpaca"))
        dropped = (ex.truncated and truncation == "drop") or all(
            x == IGNORE_INDEX for x in ex.labels[1:]
        )
        if not dropped:
            expected.append((ex.input_ids, ex.labels))
    try:
        ds = b.build(recs)
    except DataError as exc:
        assert not expected and "no training example left" in str(exc)
        return
    assert list(zip(ds["input_ids"], ds["labels"], strict=True)) == expected
    assert b.report is not None and b.report.built == len(expected)


def _ten_mb_text(kind: str) -> str:
    n = 10 * MB
    if kind == "one piece":
        return "q" * n
    if kind == "spaces":
        return "a" + " " * n + "b"
    rng = random.Random(0)
    return "".join(rng.choices(PIECES, k=n // 3))[:n]


@pytest.mark.parametrize("truncation", ["cut_end", "drop"])
@pytest.mark.parametrize("kind", ["one piece", "spaces", "words"])
def test_ten_mb_string_costs_bounded_memory(kind, truncation):
    text = _ten_mb_text(kind)
    b = builder(max_length=384, truncation=truncation)
    b.build([RECORDS[0]])  # warm up (imports, caches)
    spy = _LengthSpy(b.segment_tokenizer._plain)
    b.segment_tokenizer._plain = spy
    recs = [RECORDS[0], {"instruction": "hi", "output": text}]
    tracemalloc.start()
    try:
        ds = b.build(recs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # not one copy of the string (10 MiB; 30 MiB for "words", which holds non-BMP characters)
    assert peak < 4 * MB, f"{peak / MB:.1f} MiB"
    assert 0 < spy.longest <= 200_000
    report = b.report
    assert report is not None and report.total_tokens["max"] > 384
    if truncation == "cut_end":
        assert len(ds) == 2 and report.truncated == [1] and len(ds[1]["input_ids"]) == 384
    else:
        assert len(ds) == 1
        [dropped] = report.dropped
        assert (
            dropped.index == 1
            and "at least" in dropped.reason
            and "> max_length=384" in (dropped.reason)
        )
        assert len(dropped.summary) <= 500


def test_ten_mb_line_of_a_file_costs_bounded_memory(tmp_path):
    data = tmp_path / "big.jsonl"
    text = _ten_mb_text("one piece")
    data.write_text(
        json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": "hi", "output": text}) + "\n"
    )
    del text
    b = builder(max_length=384)
    b.build([RECORDS[0]])
    tracemalloc.start()
    try:
        ds = b.build(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the file's text, the line and the parsed string: 3 copies of 10 MiB, no more
    assert peak < 32 * MB, f"{peak / MB:.1f} MiB"
    assert len(ds) == 2 and len(ds[1]["input_ids"]) == 384
