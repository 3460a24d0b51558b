"""Parity with the self-llm tutorial's ``process_func`` on the real data and Phi-4's tokenizer.

The tutorial (self-llm, Phi-4 LoRA) tokenizes, for each alpaca record of huanhuan.json::

    <|im_start|>system<|im_sep|>{system}<|im_end|><|im_start|>user<|im_sep|>{instruction+input}
    <|im_end|><|im_start|>assistant<|im_sep|>

(one line, special tokens parsed, no BOS) as masked prompt, then the output's ids and
<|im_end|> (100265) as labels, and cuts everything at 384 tokens. loraforge must give exactly the
same ids and labels, except that it never emits an example with no supervised token: the tutorial
would feed record 1522 (a 434-token prompt) to the trainer with every label -100.
"""

from __future__ import annotations

import json

import pytest
from conftest import SYSTEM_PROMPT

from loraforge import SFTDatasetBuilder, check_template
from loraforge.data.builder import IGNORE_INDEX

pytestmark = pytest.mark.shared

MAX_LENGTH = 384
IM_END = 100265
ZERO_LABEL_RECORD = 1522


def tutorial_untruncated(tokenizer, example):
    """The tutorial's ``process_func`` before its cut, with its end-of-turn id written out."""
    instruction = tokenizer(
        f"<|im_start|>system<|im_sep|>{SYSTEM_PROMPT}<|im_end|><|im_start|>user<|im_sep|>"
        f"{example['instruction'] + example['input']}<|im_end|><|im_start|>assistant<|im_sep|>",
        add_special_tokens=False,
    )
    response = tokenizer(f"{example['output']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [IM_END]
    labels = [IGNORE_INDEX] * len(instruction["input_ids"]) + response["input_ids"] + [IM_END]
    return input_ids, labels


def tutorial_process_func(tokenizer, example):
    input_ids, labels = tutorial_untruncated(tokenizer, example)
    return input_ids[:MAX_LENGTH], labels[:MAX_LENGTH]


def make_builder(tokenizer):
    return SFTDatasetBuilder(
        tokenizer, "phi-4", max_length=MAX_LENGTH, system_prompt=SYSTEM_PROMPT, input_separator=""
    )


@pytest.fixture(scope="module")
def built(phi4_tokenizer, huanhuan_path):
    builder = make_builder(phi4_tokenizer)
    ds = builder.build(huanhuan_path)
    return ds[:], builder.report


def test_phi4_template_matches_the_tokenizer(phi4_tokenizer):
    assert phi4_tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    check_template("phi-4", phi4_tokenizer)


def test_counts(built, huanhuan_path):
    _, report = built
    records = json.loads(huanhuan_path.read_text(encoding="utf-8"))
    assert len(records) == 3729
    assert report.records_read == 3729
    assert report.built == 3728
    assert len(report.dropped) == 1
    assert report.format == "alpaca"
    assert report.source == str(huanhuan_path)


def test_zero_supervision_record_is_dropped_not_emitted(built, phi4_tokenizer, huanhuan_path):
    _, report = built
    records = json.loads(huanhuan_path.read_text(encoding="utf-8"))
    _, labels = tutorial_process_func(phi4_tokenizer, records[ZERO_LABEL_RECORD])
    assert all(x == IGNORE_INDEX for x in labels)  # what the tutorial would train on
    [dropped] = report.dropped
    assert dropped.index == ZERO_LABEL_RECORD
    assert dropped.reason == (
        f"no supervised token left after cutting to max_length={MAX_LENGTH} "
        "(prompt alone is 434 tokens)"
    )


def test_every_record_matches_the_tutorial(built, phi4_tokenizer, huanhuan_path):
    cols, report = built
    records = json.loads(huanhuan_path.read_text(encoding="utf-8"))
    expected = [tutorial_process_func(phi4_tokenizer, r) for r in records]
    zero = [
        i for i, (_, labels) in enumerate(expected) if all(x == IGNORE_INDEX for x in labels[1:])
    ]
    assert zero == [ZERO_LABEL_RECORD]
    kept = [e for i, e in enumerate(expected) if i not in zero]
    assert len(cols["input_ids"]) == len(kept)
    mismatched = [
        i
        for i, ((ids, labels), got_ids, got_labels) in enumerate(
            zip(kept, cols["input_ids"], cols["labels"], strict=True)
        )
        if list(got_ids) != ids or list(got_labels) != labels
    ]
    assert mismatched == []
    assert all(list(m) == [1] * len(m) for m in cols["attention_mask"])
    # the records the tutorial cuts are the ones loraforge reports as truncated
    cut = [
        i
        for i, r in enumerate(records)
        if i not in zero and len(tutorial_untruncated(phi4_tokenizer, r)[0]) > MAX_LENGTH
    ]
    assert report.truncated == cut
