"""Prompt templates: golden renderings, the segment contract, and parity with chat_templates."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import SHARED

from loraforge import (
    LoraForgeError,
    PromptTemplate,
    TemplateError,
    TemplateMismatchError,
    check_template,
    get_template,
    list_templates,
)

BUILT_INS = ["chatml", "llama-3", "phi-3", "phi-4", "phi-4-mini"]
PHI4_MINI_CONFIG = SHARED / "phi4-mini" / "tokenizer_config.json"

# Two user/assistant exchanges after a system prompt.
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2"},
]

# name -> (render(CONVERSATION), render(CONVERSATION, add_generation_prompt=True)), written out.
GOLDEN = {
    "phi-4": (
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello! How can I help?<|im_end|>"
        "<|im_start|>user<|im_sep|>What is 1+1?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>2<|im_end|>",
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello! How can I help?<|im_end|>"
        "<|im_start|>user<|im_sep|>What is 1+1?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>2<|im_end|>"
        "<|im_start|>assistant<|im_sep|>",
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "phi-3": (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nHi!<|end|>\n"
        "<|assistant|>\nHello! How can I help?<|end|>\n"
        "<|user|>\nWhat is 1+1?<|end|>\n"
        "<|assistant|>\n2<|end|>\n"
        "<|endoftext|>",
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nHi!<|end|>\n"
        "<|assistant|>\nHello! How can I help?<|end|>\n"
        "<|user|>\nWhat is 1+1?<|end|>\n"
        "<|assistant|>\n2<|end|>\n"
        "<|assistant|>\n",
    ),
    "phi-4-mini": (
        "<|system|>You are a helpful assistant.<|end|>"
        "<|user|>Hi!<|end|>"
        "<|assistant|>Hello! How can I help?<|end|>"
        "<|user|>What is 1+1?<|end|>"
        "<|assistant|>2<|end|>"
        "<|endoftext|>",
        "<|system|>You are a helpful assistant.<|end|>"
        "<|user|>Hi!<|end|>"
        "<|assistant|>Hello! How can I help?<|end|>"
        "<|user|>What is 1+1?<|end|>"
        "<|assistant|>2<|end|>"
        "<|assistant|>",
    ),
    "llama-3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>",
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}

# Special-token values each family's chat_template reads (bos_token / eos_token).
FAMILY_TOKENS: dict[str, dict[str, str]] = {
    "llama-3": {"bos_token": "<|begin_of_text|>"},
    "phi-3": {"eos_token": "<|endoftext|>"},
    "phi-4-mini": {"eos_token": "<|endoftext|>"},
}

# Conversations for the segment contract: edge cases on top of check_template's own samples.
CONTRACT_CONVERSATIONS = [
    [],
    CONVERSATION,
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "\n答案 🙂 \n"}],
    [{"role": "assistant", "content": "starts with the answer"}],
    [{"role": "system", "content": "s"}, {"role": "system", "content": "twice"}],
]


def make_tokenizer(chat_template: str | None, **special_tokens: str):
    """A vocabulary-free fast tokenizer carrying only a chat_template (for rendering)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    tok.chat_template = chat_template
    return tok


# --------------------------------------------------------------------------- golden renderings


def test_golden_table_covers_every_built_in():
    assert sorted(GOLDEN) == BUILT_INS
    assert {k: v for k, v in list_templates().items() if k in BUILT_INS} == dict.fromkeys(
        BUILT_INS, "built-in"
    )


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_render(name):
    without, with_prompt = GOLDEN[name]
    tpl = get_template(name)
    assert tpl.render(CONVERSATION) == without
    assert tpl.render(CONVERSATION, add_generation_prompt=True) == with_prompt


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_render_matches_family_chat_template(name):
    """The literal goldens are also what the family's own Jinja template produces."""
    tpl = get_template(name)
    tok = make_tokenizer(type(tpl).chat_template, **FAMILY_TOKENS.get(name, {}))
    for gen, expected in zip((False, True), GOLDEN[name], strict=True):
        assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen) == (
            expected
        )


def test_llama3_trims_content_like_its_chat_template():
    conv = [{"role": "user", "content": "  hi \n"}, {"role": "assistant", "content": "\tyo "}]
    assert get_template("llama-3").render(conv) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
    )
    # Phi-4 renders content verbatim (its tokenizer, not its template, eats the spaces).
    assert get_template("phi-4").render(conv) == (
        "<|im_start|>user<|im_sep|>  hi \n<|im_end|><|im_start|>assistant<|im_sep|>\tyo <|im_end|>"
    )


def test_empty_conversation():
    assert get_template("phi-4").render([]) == ""
    assert get_template("phi-4").render([], add_generation_prompt=True) == (
        "<|im_start|>assistant<|im_sep|>"
    )
    assert get_template("llama-3").render([]) == "<|begin_of_text|>"
    assert get_template("phi-3").render([]) == "<|endoftext|>"


# --------------------------------------------------------------------------- segment contract


@pytest.mark.parametrize("name", sorted(list_templates()))
@pytest.mark.parametrize("gen", [False, True], ids=["no_gen", "gen"])
def test_segment_contract(name, gen):
    tpl = get_template(name)
    for conv in CONTRACT_CONVERSATIONS:
        segs = tpl.segments(conv, add_generation_prompt=gen)
        assert tpl.render(conv, add_generation_prompt=gen) == "".join(s.text for s in segs)
        assert all(s.turn == -1 or 0 <= s.turn < len(conv) for s in segs)
        # Turns appear in order.
        turns = [s.turn for s in segs if s.turn >= 0]
        assert turns == sorted(turns)
        for i, message in enumerate(conv):
            mine = [s for s in segs if s.turn == i]
            content = [s for s in mine if s.content]
            expected = message["content"].strip() if tpl.strip_content else message["content"]
            assert [s.text for s in content] == [expected], (name, i)
            trainable = [s for s in mine if s.trainable]
            if message["role"] == "assistant":
                # The answer and its end-of-turn marker: the model learns to answer and to stop.
                assert trainable == [content[0], *[s for s in mine if s.text == tpl.end_of_turn]]
                assert [s.content for s in trainable] == [True, False]
            else:
                assert trainable == []
        # Nothing outside a message (BOS, generation prompt, EOS suffix) is ever trained.
        assert not any(s.trainable or s.content for s in segs if s.turn == -1)


@pytest.mark.parametrize("name", sorted(list_templates()))
def test_check_template_against_own_chat_template(name):
    tpl = get_template(name)
    chat_template = type(tpl).chat_template
    if chat_template is None:
        pytest.skip(f"{name} declares no chat_template")
    tok = make_tokenizer(chat_template, **FAMILY_TOKENS.get(name, {}))
    check_template(name, tok)
    check_template(tpl, tok, conversations=CONTRACT_CONVERSATIONS[1:])


# --------------------------------------------------------------------------- check_template


@pytest.mark.shared
def test_check_template_real_phi4(phi4_tokenizer):
    check_template("phi-4", phi4_tokenizer)


@pytest.mark.shared
def test_check_template_chatml_fails_against_real_phi4(phi4_tokenizer):
    # First sample: one user turn "你是谁？"; ChatML writes "\n" where Phi-4 writes <|im_sep|>.
    expected = (
        "template 'chatml' renders differently from the tokenizer's chat_template "
        "(add_generation_prompt=False):\n"
        "  first difference at character 16\n"
        "  tokenizer: ...'<|im_start|>user<|im_sep|>你是谁？<|im_end|>'\n"
        "  template:  ...'<|im_start|>user\\n你是谁？<|im_end|>\\n'"
    )
    with pytest.raises(TemplateMismatchError, match=f"^{re.escape(expected)}$"):
        check_template("chatml", phi4_tokenizer)


@pytest.mark.shared
def test_check_template_phi4_mini_config():
    if not PHI4_MINI_CONFIG.is_file():
        pytest.skip(f"{PHI4_MINI_CONFIG} not present")
    config = json.loads(PHI4_MINI_CONFIG.read_text(encoding="utf-8"))
    tok = make_tokenizer(
        config["chat_template"], bos_token=config["bos_token"], eos_token=config["eos_token"]
    )
    check_template("phi-4-mini", tok)
    with pytest.raises(
        TemplateMismatchError, match=r"(?s)'phi-3'.*first difference at character 8"
    ):
        check_template("phi-3", tok)  # "<|user|>\n" vs "<|user|>"


def test_check_template_reports_difference_deep_in_long_text():
    long = "x" * 100
    tok = make_tokenizer(get_template("phi-4").chat_template)

    class Drifting(PromptTemplate):
        name = "drifting"
        header = "<|im_start|>{role}<|im_sep|>"
        end_of_turn = "<|im_end|> "  # one stray space
        generation_prompt = "<|im_start|>assistant<|im_sep|>"

    with pytest.raises(TemplateMismatchError) as info:
        check_template(Drifting(), tok, conversations=[[{"role": "user", "content": long}]])
    message = str(info.value)
    assert "template 'drifting'" in message
    assert "first difference at character 136\n" in message
    # 40 characters of context either side, not the whole 100-character message.
    assert f"tokenizer: ...'{'x' * 30}<|im_end|>'" in message
    assert f"template:  ...'{'x' * 30}<|im_end|> '" in message


def test_check_template_quiet_without_chat_template(caplog):
    tok = make_tokenizer(None)
    with caplog.at_level(logging.INFO, logger="loraforge.data.templates"):
        assert check_template("phi-4", tok) is None
    assert "tokenizer has no chat_template; nothing to check phi-4 against" in caplog.text

    class NoTemplate:  # not even a transformers tokenizer
        def __init__(self):
            self.encoded = []

        def apply_chat_template(self, *args, **kwargs):
            raise AssertionError("must not be called")

        def encode(self, text, add_special_tokens=True):  # the stop check still runs
            self.encoded.append(text)
            return [7]

    tok = NoTemplate()
    check_template("chatml", tok)
    assert tok.encoded == ["<|im_end|>"]


# --------------------------------------------------------------------------- message errors


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
            "message 1: unknown role 'bot'; valid roles: system, user, assistant",
        ),
        (
            [{"content": "no role"}],
            "message 0: unknown role None; valid roles: system, user, assistant",
        ),
        (
            [{"role": "user", "content": ["a", "list"]}],
            "message 0 (user): content must be a string, got list",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant"}],
            "message 1 (assistant): content must be a string, got NoneType",
        ),
        (
            [{"role": "user", "content": "hi"}, ("assistant", "hello")],
            "message 1: expected a mapping with 'role' and 'content', got tuple",
        ),
        (
            ["user: hi"],
            "message 0: expected a mapping with 'role' and 'content', got str",
        ),
    ],
)
@pytest.mark.parametrize("name", BUILT_INS)
def test_bad_messages_raise_template_error(name, conversation, message):
    tpl = get_template(name)
    with pytest.raises(TemplateError, match=f"^{re.escape(message)}$") as info:
        tpl.segments(conversation)
    assert isinstance(info.value, LoraForgeError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(TemplateError, match=re.escape(message)):
        tpl.render(conversation, add_generation_prompt=True)
