"""Unit tests of `SFTDatasetBuilder`: sources, formats, masking, truncation, the report, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loraforge import DataError, DataReport, DroppedRecord, SFTDatasetBuilder
from loraforge.data.builder import IGNORE_INDEX, load_records, to_messages
from loraforge.errors import UnknownTemplateError

SYSTEM = "你是甄嬛"
ALPACA = [
    {"instruction": "你是谁？", "input": "", "output": "臣妾甄嬛。"},
    {"instruction": "今天天气如何？", "input": "请说两句", "output": "晨起薄雾未散。"},
    {"instruction": "皇上驾到！", "input": "", "output": "快去备茶。"},
]


# --------------------------------------------------------------------------- helpers


def ids_of(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def im_end(tok: Any) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def reference(tok: Any, system: str | None, user: str, answer: str) -> tuple[list[int], list[int]]:
    """The tutorial's recipe, written out by hand: the Phi-4 prompt string tokenized whole (special
    tokens parsed) and masked, then the answer's ids and <|im_end|> supervised."""
    head = f"<|im_start|>system<|im_sep|>{system}<|im_end|>" if system else ""
    prompt = ids_of(
        tok, f"{head}<|im_start|>user<|im_sep|>{user}<|im_end|><|im_start|>assistant<|im_sep|>"
    )
    answer_ids = [*ids_of(tok, answer), im_end(tok)]
    return prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids


def build(tok: Any, source: Any, **kw: Any) -> tuple[list[dict[str, list[int]]], DataReport]:
    builder = SFTDatasetBuilder(tok, **kw)
    ds = builder.build(source)
    assert builder.report is not None
    return [ds[i] for i in range(len(ds))], builder.report


def supervised_spans(tok: Any, row: dict[str, list[int]]) -> list[str]:
    """Decoded runs of consecutive supervised positions (checking each label equals its id)."""
    spans: list[list[int]] = []
    prev = False
    for tid, lab in zip(row["input_ids"], row["labels"], strict=True):
        on = lab != IGNORE_INDEX
        if on:
            assert lab == tid
            if not prev:
                spans.append([])
            spans[-1].append(tid)
        prev = on
    return [tok.decode(s) for s in spans]


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any], blank_lines: bool = False) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- sources


def test_list_of_dicts_matches_handwritten_reference(tiny_tokenizer):
    rows, report = build(tiny_tokenizer, ALPACA, system_prompt=SYSTEM, input_separator="")
    assert report.records_read == report.built == 3
    for row, rec in zip(rows, ALPACA, strict=True):
        ids, labels = reference(
            tiny_tokenizer, SYSTEM, rec["instruction"] + rec["input"], rec["output"]
        )
        assert row["input_ids"] == ids
        assert row["labels"] == labels
        assert row["attention_mask"] == [1] * len(ids)


@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl_blank_lines", "dataset", "generator"])
def test_every_source_kind_gives_the_same_examples(tiny_tokenizer, tmp_path, kind):
    import datasets

    expected, _ = build(tiny_tokenizer, ALPACA, system_prompt=SYSTEM)
    source: Any
    if kind == "json":
        source = write_json(tmp_path / "d.json", ALPACA)
    elif kind == "jsonl":
        source = str(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    elif kind == "jsonl_blank_lines":
        source = write_jsonl(tmp_path / "d.jsonl", ALPACA, blank_lines=True)
    elif kind == "dataset":
        source = datasets.Dataset.from_list(ALPACA)
    else:
        source = (dict(r) for r in ALPACA)
    rows, report = build(tiny_tokenizer, source, system_prompt=SYSTEM)
    assert rows == expected
    assert report.records_read == 3
    assert report.format == "alpaca"


def test_report_names_its_source(tiny_tokenizer, tmp_path):
    import datasets

    path = write_json(tmp_path / "d.json", ALPACA)
    assert build(tiny_tokenizer, path)[1].source == str(path)
    assert build(tiny_tokenizer, ALPACA)[1].source == "<list>"
    assert build(tiny_tokenizer, datasets.Dataset.from_list(ALPACA))[1].source == "<Dataset>"


def test_json_with_bom_and_unknown_suffix(tiny_tokenizer, tmp_path):
    text = json.dumps(ALPACA, ensure_ascii=False)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    array_txt = tmp_path / "array.txt"
    array_txt.write_text(text, encoding="utf-8")
    lines_txt = tmp_path / "lines.data"
    write_jsonl(lines_txt, ALPACA)
    expected, _ = build(tiny_tokenizer, ALPACA)
    for path in (bom, array_txt, lines_txt):
        assert build(tiny_tokenizer, path)[0] == expected


def test_load_records_gives_index_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA[:2])
    assert list(load_records(path)) == [(0, 1, ALPACA[0]), (1, 2, ALPACA[1])]
    # blank lines are skipped: the index counts records, the line counts lines
    gaps = write_jsonl(tmp_path / "gaps.jsonl", ALPACA[:2], blank_lines=True)
    assert list(load_records(gaps)) == [(0, 1, ALPACA[0]), (1, 3, ALPACA[1])]
    array = write_json(tmp_path / "d.json", ALPACA[:2])
    assert list(load_records(array)) == [(0, None, ALPACA[0]), (1, None, ALPACA[1])]
    assert list(load_records(ALPACA[:1])) == [(0, None, ALPACA[0])]


# --------------------------------------------------------------------------- formats

CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "臣妾甄嬛。"},
    {"role": "user", "content": "今天天气如何？"},
    {"role": "assistant", "content": "晨起薄雾未散。"},
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def test_alpaca_input_is_joined_with_the_separator(tiny_tokenizer):
    rec = [{"instruction": "翻译", "input": "hello", "output": "你好"}]
    for sep in ("\n", "", " / "):
        rows, _ = build(tiny_tokenizer, rec, input_separator=sep)
        ids, labels = reference(tiny_tokenizer, None, f"翻译{sep}hello", "你好")
        assert (rows[0]["input_ids"], rows[0]["labels"]) == (ids, labels)
    # only one of instruction / input: no separator
    for only in ({"instruction": "翻译", "input": ""}, {"instruction": "", "input": "翻译"}):
        rows, _ = build(tiny_tokenizer, [{**only, "output": "好"}], input_separator="SEP")
        assert rows[0]["input_ids"] == reference(tiny_tokenizer, None, "翻译", "好")[0]


def test_alpaca_system_field_overrides_system_prompt(tiny_tokenizer):
    recs = [
        {"instruction": "问", "output": "答", "system": "自己的系统"},
        {"instruction": "问", "output": "答"},
        {"instruction": "问", "output": "答", "system": ""},
    ]
    rows, _ = build(tiny_tokenizer, recs, system_prompt=SYSTEM)
    assert rows[0]["input_ids"] == reference(tiny_tokenizer, "自己的系统", "问", "答")[0]
    assert rows[1]["input_ids"] == reference(tiny_tokenizer, SYSTEM, "问", "答")[0]
    assert rows[2]["input_ids"] == reference(tiny_tokenizer, SYSTEM, "问", "答")[0]
    rows, _ = build(tiny_tokenizer, recs[1:2])  # no system anywhere: no system turn at all
    assert rows[0]["input_ids"] == reference(tiny_tokenizer, None, "问", "答")[0]


def test_alpaca_history_equals_messages_and_sharegpt(tiny_tokenizer):
    alpaca = {
        "system": SYSTEM,
        "history": [["你是谁？", "臣妾甄嬛。"]],
        "instruction": "今天天气如何？",
        "output": "晨起薄雾未散。",
    }
    messages = {"messages": CONV}
    sharegpt = {
        "conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in CONV]
    }
    got = [build(tiny_tokenizer, [r])[0][0] for r in (alpaca, messages, sharegpt)]
    assert got[0] == got[1] == got[2]
    assert supervised_spans(tiny_tokenizer, got[0]) == [
        "臣妾甄嬛。<|im_end|>",
        "晨起薄雾未散。<|im_end|>",
    ]
    assert tiny_tokenizer.decode(got[0]["input_ids"]) == (
        f"<|im_start|>system<|im_sep|>{SYSTEM}<|im_end|>"
        "<|im_start|>user<|im_sep|>你是谁？<|im_end|>"
        "<|im_start|>assistant<|im_sep|>臣妾甄嬛。<|im_end|>"
        "<|im_start|>user<|im_sep|>今天天气如何？<|im_end|>"
        "<|im_start|>assistant<|im_sep|>晨起薄雾未散。<|im_end|>"
    )


def test_sharegpt_role_aliases(tiny_tokenizer):
    rec = {
        "conversations": [
            {"from": "user", "value": "hi"},
            {"from": "chatgpt", "value": "yo"},
            {"from": "human", "value": "q"},
            {"from": "assistant", "value": "a"},
        ]
    }
    rows, report = build(tiny_tokenizer, [rec])
    assert report.format == "sharegpt"
    assert supervised_spans(tiny_tokenizer, rows[0]) == ["yo<|im_end|>", "a<|im_end|>"]


def test_messages_system_prompt_only_fills_a_missing_or_empty_system(tiny_tokenizer):
    own = {"messages": CONV[:3]}
    none = {"messages": CONV[1:3]}
    empty = {"messages": [{"role": "system", "content": ""}, *CONV[1:3]]}
    rows, _ = build(tiny_tokenizer, [own, none, empty], system_prompt="默认")
    assert rows[0]["input_ids"] == reference(tiny_tokenizer, SYSTEM, "你是谁？", "臣妾甄嬛。")[0]
    assert rows[1]["input_ids"] == reference(tiny_tokenizer, "默认", "你是谁？", "臣妾甄嬛。")[0]
    assert rows[2]["input_ids"] == rows[1]["input_ids"]
    rows, _ = build(tiny_tokenizer, [empty])  # empty system and no default: no system turn
    assert rows[0]["input_ids"] == reference(tiny_tokenizer, None, "你是谁？", "臣妾甄嬛。")[0]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"output": "a", "input": "q"}, "alpaca"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
        ),
    ],
)
def test_format_is_detected(tiny_tokenizer, record, fmt):
    rows, report = build(tiny_tokenizer, [record])
    assert report.format == fmt
    assert supervised_spans(tiny_tokenizer, rows[0]) == ["a<|im_end|>"]


def test_explicit_format_overrides_detection(tiny_tokenizer):
    rec = {
        "messages": [
            {"role": "user", "content": "from messages"},
            {"role": "assistant", "content": "M"},
        ],
        "instruction": "from alpaca",
        "output": "A",
    }
    rows, report = build(tiny_tokenizer, [rec])
    assert report.format == "messages"
    assert supervised_spans(tiny_tokenizer, rows[0]) == ["M<|im_end|>"]
    rows, report = build(tiny_tokenizer, [rec], format="alpaca")
    assert report.format == "alpaca"
    assert supervised_spans(tiny_tokenizer, rows[0]) == ["A<|im_end|>"]


def test_format_is_detected_once_from_the_first_record(tiny_tokenizer):
    mixed = [ALPACA[0], {"messages": CONV}]
    with pytest.raises(
        DataError, match=re.escape("<list>, record 1, field 'output': missing; it must be a string")
    ):
        build(tiny_tokenizer, mixed)


# --------------------------------------------------------------------------- masking


def test_labels_mask_everything_but_assistant_content_and_end_of_turn(tiny_tokenizer):
    rows, _ = build(tiny_tokenizer, [{"messages": CONV}])
    row = rows[0]
    end = im_end(tiny_tokenizer)
    supervised = [i for i, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX]
    # each supervised run ends with <|im_end|>, and every other position is masked
    assert supervised_spans(tiny_tokenizer, row) == [
        "臣妾甄嬛。<|im_end|>",
        "晨起薄雾未散。<|im_end|>",
    ]
    assert row["labels"][-1] == end
    masked_text = tiny_tokenizer.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    assert masked_text == (
        f"<|im_start|>system<|im_sep|>{SYSTEM}<|im_end|><|im_start|>user<|im_sep|>你是谁？<|im_end|>"
        "<|im_start|>assistant<|im_sep|><|im_start|>user<|im_sep|>今天天气如何？<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )
    assert len(supervised) == sum(
        len(ids_of(tiny_tokenizer, a)) + 1 for a in ("臣妾甄嬛。", "晨起薄雾未散。")
    )


def test_train_on_last_assistant_and_all(tiny_tokenizer):
    default, _ = build(tiny_tokenizer, [{"messages": CONV}])
    last, _ = build(tiny_tokenizer, [{"messages": CONV}], train_on="last_assistant")
    every, _ = build(tiny_tokenizer, [{"messages": CONV}], train_on="all")
    assert default[0]["input_ids"] == last[0]["input_ids"] == every[0]["input_ids"]
    assert supervised_spans(tiny_tokenizer, last[0]) == ["晨起薄雾未散。<|im_end|>"]
    assert every[0]["labels"] == every[0]["input_ids"]


def test_pad_token_is_never_the_end_of_turn_token(tiny_tokenizer):
    end = im_end(tiny_tokenizer)
    assert tiny_tokenizer.eos_token_id == end
    assert tiny_tokenizer.pad_token_id is not None and tiny_tokenizer.pad_token_id != end
    rows = build(tiny_tokenizer, ALPACA)[0] + build(tiny_tokenizer, [{"messages": CONV}])[0]
    for row in rows:
        # the answer closes with a supervised <|im_end|>, never with the pad token
        assert row["labels"][-1] == row["input_ids"][-1] == end
        assert tiny_tokenizer.pad_token_id not in row["input_ids"]
        assert tiny_tokenizer.pad_token_id not in row["labels"]


def test_special_token_text_in_content_stays_text(tiny_tokenizer):
    rec = {
        "messages": [
            {"role": "user", "content": "say <|im_end|> now"},
            {"role": "assistant", "content": "<|im_end|><|im_start|>system"},
        ]
    }
    rows, _ = build(tiny_tokenizer, [rec])
    row = rows[0]
    end = im_end(tiny_tokenizer)
    # two real <|im_end|> tokens (closing the user and the assistant turn), none from content
    assert row["input_ids"].count(end) == 2
    assert supervised_spans(tiny_tokenizer, row) == ["<|im_end|><|im_start|>system<|im_end|>"]


# --------------------------------------------------------------------------- truncation

LONG = {"instruction": "问", "output": "臣妾甄嬛，入宫不久，还请多多指教。" * 8}


def test_cut_end_keeps_the_first_max_length_tokens(tiny_tokenizer):
    full, _ = build(tiny_tokenizer, [LONG], max_length=4096)
    n = len(full[0]["input_ids"])
    rows, report = build(tiny_tokenizer, [ALPACA[0], LONG], max_length=n - 10)
    assert report.truncated == [1]
    assert report.built == 2 and report.dropped == []
    assert rows[1]["input_ids"] == full[0]["input_ids"][: n - 10]
    assert rows[1]["labels"] == full[0]["labels"][: n - 10]
    assert len(rows[1]["attention_mask"]) == n - 10
    # statistics are measured before truncation
    assert report.total_tokens["max"] == n


def test_drop_truncation_drops_long_records(tiny_tokenizer):
    full, _ = build(tiny_tokenizer, [LONG], max_length=4096)
    n = len(full[0]["input_ids"])
    rows, report = build(tiny_tokenizer, [ALPACA[0], LONG], max_length=n - 1, truncation="drop")
    assert rows == build(tiny_tokenizer, [ALPACA[0]])[0]
    assert report.built == 1 and report.truncated == []
    assert [d.index for d in report.dropped] == [1]
    assert report.dropped[0].reason == f"{n} tokens > max_length={n - 1} (truncation='drop')"
    # a record of exactly max_length tokens fits
    _, report = build(tiny_tokenizer, [LONG], max_length=n, truncation="drop")
    assert report.built == 1 and report.dropped == [] and report.truncated == []


def test_record_whose_supervised_tokens_are_all_cut_is_dropped(tiny_tokenizer):
    long_prompt = {"instruction": "皇上驾到！" * 20, "output": "快去备茶。"}
    full, _ = build(tiny_tokenizer, [long_prompt], max_length=4096)
    prompt_len = full[0]["labels"].count(IGNORE_INDEX)
    # one supervised token left: emitted
    rows, report = build(tiny_tokenizer, [long_prompt], max_length=prompt_len + 1)
    assert report.truncated == [0]
    assert sum(lab != IGNORE_INDEX for lab in rows[0]["labels"]) == 1
    # none left: dropped, with the index and the reason, never emitted
    rows, report = build(tiny_tokenizer, [ALPACA[0], long_prompt, ALPACA[1]], max_length=prompt_len)
    assert report.records_read == 3 and report.built == 2
    assert report.truncated == []
    [dropped] = report.dropped
    assert (dropped.index, dropped.line) == (1, None)
    assert dropped.reason == (
        f"no supervised token left after cutting to max_length={prompt_len} "
        f"(prompt alone is {prompt_len} tokens)"
    )
    assert dropped.record == long_prompt  # the raw record, to look at or fix
    assert len(rows) == 2
    assert "dropped record 1: no supervised token left" in report.format_text()


def test_everything_dropped_is_an_error(tiny_tokenizer):
    builder = SFTDatasetBuilder(tiny_tokenizer, max_length=5)
    with pytest.raises(
        DataError,
        match=re.escape(
            "<list>: no training example left (1 read, 1 dropped); first drop: no supervised token "
            "left after cutting to max_length=5"
        ),
    ):
        builder.build(ALPACA[:1])
    assert builder.report is not None and builder.report.built == 0


# --------------------------------------------------------------------------- report


def test_report_fields(tiny_tokenizer):
    recs = [*ALPACA, LONG, {"instruction": "问"}]
    builder = SFTDatasetBuilder(tiny_tokenizer, max_length=40, on_bad_record="skip")
    ds = builder.build(recs)
    rep = builder.report
    assert rep is not None
    full, _ = build(tiny_tokenizer, recs[:4], max_length=4096)
    assert rep.records_read == 5
    assert rep.built == len(ds) == 4
    assert rep.truncated == [3]
    assert [(d.index, d.line) for d in rep.dropped] == [(4, None)]
    assert "field 'output': missing" in rep.dropped[0].reason
    assert rep.format == "alpaca"
    lengths = [len(r["input_ids"]) for r in full]
    response = [sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in full]
    prompt = [a - b for a, b in zip(lengths, response, strict=True)]
    for stats, values in (
        (rep.total_tokens, lengths),
        (rep.response_tokens, response),
        (rep.prompt_tokens, prompt),
    ):
        assert stats == pytest.approx(
            {"p50": np.percentile(values, 50), "p95": np.percentile(values, 95), "max": max(values)}
        )
    emitted = [ds[i] for i in range(len(ds))]
    assert rep.tokens_emitted == sum(len(r["input_ids"]) for r in emitted)
    sup = sum(lab != IGNORE_INDEX for r in emitted for lab in r["labels"])
    assert rep.supervised_fraction == pytest.approx(sup / rep.tokens_emitted)
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["records_read"] == 5 and d["dropped"][0]["index"] == 4
    text = str(rep)
    for needle in (
        "records read       5",
        "examples built     4",
        "truncated          1",
        "dropped            1",
        "dropped record 4:",
    ):
        assert needle in text


def test_report_lists_dropped_jsonl_records_by_line(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "q", "output": 3}])
    builder = SFTDatasetBuilder(tiny_tokenizer, on_bad_record="skip")
    builder.build(path)
    assert builder.report is not None
    [dropped] = builder.report.dropped
    assert (dropped.index, dropped.line) == (1, 2)
    assert f"{path}, line 2, record 1, field 'output': must be a string, got int" in dropped.reason
    assert f"dropped line 2: {path}" in builder.report.format_text()


def test_many_drops_are_summarised(tiny_tokenizer):
    recs = [ALPACA[0]] + [{"instruction": "q"}] * 25
    builder = SFTDatasetBuilder(tiny_tokenizer, on_bad_record="skip")
    builder.build(recs)
    assert builder.report is not None
    assert len(builder.report.dropped) == 25
    assert [d.index for d in builder.report.dropped] == list(range(1, 26))
    assert "... and 5 more dropped (see report.dropped)" in builder.report.format_text()


def test_encode_messages(tiny_tokenizer):
    builder = SFTDatasetBuilder(tiny_tokenizer, max_length=4096)
    ex = builder.encode_messages(CONV[:3])
    ids, labels = reference(tiny_tokenizer, SYSTEM, "你是谁？", "臣妾甄嬛。")
    assert (ex.input_ids, ex.labels, ex.truncated) == (ids, labels, False)
    assert ex.attention_mask == [1] * len(ids)
    assert ex.prompt_tokens + ex.response_tokens == len(ids)


# --------------------------------------------------------------------------- bad input


def raises(*parts: str) -> Any:
    """pytest.raises(DataError) whose message must hold `parts` in this order."""
    return pytest.raises(DataError, match=".*".join(re.escape(p) for p in parts))


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ("just text", "alpaca", "<list>, record 1: expected a JSON object, got str"),
        ([1, 2], "messages", "<list>, record 1: expected a JSON object, got list"),
        (
            {"instruction": "q"},
            "alpaca",
            "<list>, record 1, field 'output': missing; it must be a string",
        ),
        (
            {"instruction": "q", "output": None},
            "alpaca",
            "<list>, record 1, field 'output': missing; it must be a string",
        ),
        (
            {"instruction": "q", "output": " \n"},
            "alpaca",
            "<list>, record 1, field 'output': is empty; it must be a non-empty string",
        ),
        (
            {"instruction": "q", "output": ["a"]},
            "alpaca",
            "<list>, record 1, field 'output': must be a string, got list",
        ),
        (
            {"instruction": "", "input": "", "output": "a"},
            "alpaca",
            "<list>, record 1, field 'instruction': both 'instruction' and 'input' are empty; one "
            "must hold the prompt",
        ),
        (
            {"instruction": "q", "output": "a", "system": 1},
            "alpaca",
            "<list>, record 1, field 'system': must be a string, got int",
        ),
        (
            {"instruction": "q", "output": "a", "history": "x"},
            "alpaca",
            "<list>, record 1, field 'history': must be a list of [user, assistant] pairs",
        ),
        (
            {"instruction": "q", "output": "a", "history": [["u"]]},
            "alpaca",
            "<list>, record 1, field 'history': item 0 must be a [user, assistant] pair of strings",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
            "messages",
            "<list>, record 1, field 'messages[1].content': must be a string, got int",
        ),
        (
            {"messages": [{"role": "user", "content": None}]},
            "messages",
            "<list>, record 1, field 'messages[0].content': must be a string, got NoneType",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "messages",
            "<list>, record 1, field 'messages[1].role': unknown role 'bot'; valid: "
            "system, user, assistant",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "sharegpt",
            "<list>, record 1, field 'conversations[1].from': unknown from 'bot'; valid: "
            "assistant, bard, bing, chatgpt, gpt, human, system, user",
        ),
        (
            {"messages": ["q"]},
            "messages",
            "<list>, record 1, field 'messages[0]': must be an object with 'role' and 'content'",
        ),
        (
            {"messages": []},
            "messages",
            "<list>, record 1, field 'messages': is empty; a conversation needs at least a user "
            "and an assistant turn",
        ),
        (
            {"messages": "hi"},
            "messages",
            "<list>, record 1, field 'messages': must be a list of turns, got str",
        ),
        ({"conversations": []}, "sharegpt", "<list>, record 1, field 'conversations': is empty"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            },
            "messages",
            "<list>, record 1, field 'messages': the conversation ends with a user turn; "
            "training needs it to end with an assistant turn",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}]},
            "messages",
            "<list>, record 1, field 'messages': the conversation ends with a system turn",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "messages",
            "<list>, record 1, field 'messages[1].content': assistant content is empty",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "<list>, record 1, field 'messages[1].role': a system message may only come first",
        ),
    ],
)
def test_bad_record_names_record_field_and_what_is_valid(tiny_tokenizer, record, fmt, message):
    good = (
        ALPACA[0]
        if fmt == "alpaca"
        else {"messages": CONV}
        if fmt == "messages"
        else {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    )
    with raises(message):
        build(tiny_tokenizer, [good, record], format=fmt)


def test_undetectable_format(tiny_tokenizer):
    with raises(
        "<list>, record 0: cannot tell the record format from ['completion', 'prompt']; "
        "expected alpaca (instruction, input, output), messages (OpenAI) or "
        "conversations (ShareGPT), or set the format explicitly (fields named otherwise: map "
        "them with data_columns, e.g. {instruction: prompt, output: answer})"
    ):
        build(tiny_tokenizer, [{"prompt": "q", "completion": "a"}])
    with raises("<list>, record 0: cannot tell the record format from list"):
        build(tiny_tokenizer, [["q", "a"]])


def test_bad_jsonl_record_names_file_and_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n[1, 2]\n", encoding="utf-8")
    # the line counts lines (blank ones too), the record index counts records
    with raises(f"{path}, line 3, record 1: expected a JSON object, got list"):
        build(tiny_tokenizer, path, format="alpaca")


def test_invalid_json_array_names_the_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q", "output" "a"}\n]',
        encoding="utf-8",
    )
    with raises(f"{path}, line 3: invalid JSON (Expecting ':' delimiter at column"):
        build(tiny_tokenizer, path)
    # a JSONL file saved as .json: the second line is where it goes wrong
    lines = tmp_path / "lines.json"
    write_jsonl(lines, ALPACA)
    with raises(f"{lines}, line 2: invalid JSON (Extra data at column 1)"):
        build(tiny_tokenizer, lines)


def test_invalid_jsonl_line_names_the_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + '\n\n{"instruction": "q",}\n', encoding="utf-8")
    with raises(
        f"{path}, line 3: invalid JSON (Expecting property name enclosed in double "
        "quotes at column 21); each line of a JSONL file must be one JSON object"
    ):
        build(tiny_tokenizer, path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_invalid_utf8_names_the_line(tiny_tokenizer, tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    good = json.dumps(ALPACA[0], ensure_ascii=False).encode("utf-8")
    bad = b'{"instruction": "q", "output": "' + "甄".encode("gbk") + b'"}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    offset = len(good) + 1 + len('{"instruction": "q", "output": "')
    with raises(f"{path}, line 2: not valid UTF-8 (byte {offset}); save the file as UTF-8"):
        build(tiny_tokenizer, path)


def test_invalid_utf8_after_a_bom_names_the_file_offset(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(ALPACA[0]).encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + good + b'\n{"instruction": "\xff"}\n')
    offset = 3 + len(good) + 1 + len('{"instruction": "')
    with raises(f"{path}, line 2: not valid UTF-8 (byte {offset})"):
        build(tiny_tokenizer, path)


def test_missing_file_folder_and_wrong_top_level(tiny_tokenizer, tmp_path):
    missing = tmp_path / "nope.json"
    with raises(f"{missing}: no such file (give a .json array or a .jsonl file)"):
        build(tiny_tokenizer, missing)
    with raises(f"{tmp_path}: is a folder; give a .json array or a .jsonl file"):
        build(tiny_tokenizer, tmp_path)
    obj = write_json(tmp_path / "obj.json", {"data": ALPACA})
    with raises(
        f"{obj}: expected a JSON array of records at the top level, got dict (for one "
        "record per line use a .jsonl file)"
    ):
        build(tiny_tokenizer, obj)


def test_wrong_source_types(tiny_tokenizer):
    with raises(
        "<dict>: expected a sequence of records (list of dicts), a file path or a "
        "datasets.Dataset, got a single mapping"
    ):
        build(tiny_tokenizer, ALPACA[0])
    with raises(
        "<int>: expected a list of records, a .json/.jsonl path or a datasets.Dataset, got int"
    ):
        build(tiny_tokenizer, 3)


def test_empty_source_is_an_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with raises(f"{path}: no training example left (0 read, 0 dropped)"):
        build(tiny_tokenizer, path)
    with raises("<list>: no training example left (0 read, 0 dropped)"):
        build(tiny_tokenizer, [])


def test_data_error_attributes(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "q", "output": ""}])
    with pytest.raises(DataError) as info:
        build(tiny_tokenizer, path)
    err = info.value
    assert (err.source, err.line, err.index, err.field) == (str(path), 2, 1, "output")
    assert err.reason == "is empty; it must be a non-empty string"
    assert isinstance(err, ValueError)


def test_skip_bad_records_counts_them(tiny_tokenizer, tmp_path):
    recs = [
        ALPACA[0],
        "text",
        {"instruction": "q"},
        ALPACA[1],
        {"instruction": "q", "output": " "},
        ALPACA[2],
    ]
    rows, report = build(tiny_tokenizer, recs, on_bad_record="skip")
    assert report.records_read == 6 and report.built == 3 and len(rows) == 3
    assert [d.index for d in report.dropped] == [1, 2, 4]
    assert "record 1: expected a JSON object, got str" in report.dropped[0].reason
    assert "field 'output': missing" in report.dropped[1].reason
    assert "field 'output': is empty" in report.dropped[2].reason
    for d in report.dropped:
        assert isinstance(d, DroppedRecord)
        assert d.record == recs[d.index]  # the raw record, as read
    assert rows == build(tiny_tokenizer, [ALPACA[0], ALPACA[1], ALPACA[2]])[0]
    # a first record whose format cannot be told is skipped too; detection moves on
    rows, report = build(tiny_tokenizer, ["x", ALPACA[0]], on_bad_record="skip")
    assert report.format == "alpaca" and report.built == 1
    assert "cannot tell the record format" in report.dropped[0].reason


def test_skip_does_not_hide_unreadable_files(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n{oops\n", encoding="utf-8")
    with raises(f"{path}, line 2: invalid JSON"):
        build(tiny_tokenizer, path, on_bad_record="skip")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 1}, "max_length must be an integer >= 2, got 1"),
        ({"max_length": 384.0}, "max_length must be an integer >= 2, got 384.0"),
        ({"max_length": True}, "max_length must be an integer >= 2, got True"),
        ({"max_length": "384"}, "max_length must be an integer >= 2, got '384'"),
        (
            {"format": "jsonl"},
            "format must be one of auto, alpaca, messages, sharegpt; got 'jsonl'",
        ),
        (
            {"train_on": "assistant"},
            "train_on must be one of all_assistant, last_assistant, all; got 'assistant'",
        ),
        ({"truncation": "left"}, "truncation must be one of cut_end, drop; got 'left'"),
        ({"on_bad_record": "ignore"}, "on_bad_record must be one of raise, skip; got 'ignore'"),
    ],
)
def test_bad_builder_arguments(tiny_tokenizer, kwargs, message):
    with raises(message):
        SFTDatasetBuilder(tiny_tokenizer, **kwargs)


def test_bad_builder_arguments_are_reported_together(tiny_tokenizer):
    with pytest.raises(DataError) as info:
        SFTDatasetBuilder(tiny_tokenizer, max_length=0, format="csv", train_on="x")
    text = str(info.value)
    for part in ("max_length must be", "format must be one of", "train_on must be one of"):
        assert part in text


def test_unknown_template_lists_the_known_ones(tiny_tokenizer):
    with pytest.raises(UnknownTemplateError, match=r"unknown template 'phi4'\. Did you mean "):
        SFTDatasetBuilder(tiny_tokenizer, "phi4")


def test_builder_arguments_are_keyword_only(tiny_tokenizer):
    with pytest.raises(TypeError):
        SFTDatasetBuilder(tiny_tokenizer, "phi-4", 384)  # type: ignore[misc]


def test_to_messages_is_usable_alone():
    assert to_messages(
        {"instruction": "q", "input": "i", "output": "a"},
        "alpaca",
        system_prompt="s",
        input_separator="|",
    ) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q|i"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(DataError, match=re.escape("field 'output': missing")):
        to_messages({"instruction": "q"}, "alpaca")


# --------------------------------------------------------------------------- edge cases


def test_jsonl_with_raw_line_separator_inside_a_string(tiny_tokenizer, tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028/U+2029 raw inside strings; JSONL lines are
    split on "\\n" only (str.splitlines() used to break such records apart)."""
    rec = {"instruction": "第一行\u2028第二行", "output": "好的\u2029"}
    path = write_jsonl(tmp_path / "d.jsonl", [rec, ALPACA[0]])
    rows, report = build(tiny_tokenizer, path)
    assert report.built == 2
    assert rows[0] == build(tiny_tokenizer, [rec])[0][0]


def test_deeply_nested_jsonl_line_is_a_data_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ALPACA[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8"
    )
    # (this used to escape as a bare RecursionError)
    with raises(f"{path}, line 2: unreadable JSON (nested too deeply to read)"):
        build(tiny_tokenizer, path)


def test_unconvertible_json_number_is_a_data_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ALPACA[0]) + '\n{"instruction": ' + "9" * 5000 + "}\n", encoding="utf-8"
    )
    with raises(f"{path}, line 2: unreadable JSON (Exceeds the limit"):
        build(tiny_tokenizer, path)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"instruction": "a\ud800b", "output": "x"}, "instruction"),
        ({"instruction": "q", "output": "x", "history": [["\udfff", "y"]]}, "history[0][0]"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "x\ud800"},
                ]
            },
            "messages[1].content",
        ),
    ],
)
def test_unpaired_surrogate_is_a_data_error(tiny_tokenizer, record, field):
    # JSON allows "\ud800"; no tokenizer can take it
    with raises(f"<list>, record 0, field {field!r}: holds an unpaired surrogate (U+D"):
        build(tiny_tokenizer, [record])


def test_deeply_nested_json_array_is_a_data_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with raises(f"{path}: JSON nested too deeply to read"):
        build(tiny_tokenizer, path)


def test_conversation_of_only_an_empty_system_message(tiny_tokenizer):
    # the empty system message is removed, leaving nothing (this used to be an IndexError)
    record = {"messages": [{"role": "system", "content": ""}]}
    with raises("<list>, record 0, field 'messages': the conversation ends with a"):
        build(tiny_tokenizer, [record])
    with raises("<list>, record 0, field 'messages': the conversation ends with a system turn"):
        build(tiny_tokenizer, [record], system_prompt="默认")


@pytest.mark.parametrize("chunk_size", [1, 2, 1000])
def test_chunk_size_does_not_change_the_result(tiny_tokenizer, chunk_size):
    recs = [*ALPACA, LONG, {"instruction": "q"}, {"instruction": "皇上驾到！" * 20, "output": "好"}]
    kw = {"max_length": 40, "on_bad_record": "skip"}
    expected, expected_report = build(tiny_tokenizer, recs, **kw)
    builder = SFTDatasetBuilder(tiny_tokenizer, **kw)
    ds = builder.build(recs, chunk_size=chunk_size)
    assert [ds[i] for i in range(len(ds))] == expected
    assert builder.report is not None
    assert sorted(builder.report.dropped, key=lambda d: d.index) == sorted(
        expected_report.dropped, key=lambda d: d.index
    )
    assert builder.report.truncated == expected_report.truncated


def test_history_with_an_empty_assistant_answer_is_rejected_like_other_formats():
    from loraforge.data.builder import to_messages

    rec = {"instruction": "q", "output": "a", "history": [["hi", "  "]]}
    with pytest.raises(DataError, match=r"field 'history\[0\]\[1\]': assistant answer is empty"):
        to_messages(rec, "alpaca")
