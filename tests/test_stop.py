"""Generation stops on the template's end-of-turn marker, also when it is several tokens.

The model here is a real ``Phi3ForCausalLM`` whose logits are set by hand: its layers add nothing
to the residual stream, each token of a chosen chain has a basis vector as embedding, and the
output head maps that vector to the next token of the chain. So ``generate`` writes exactly the
chain (an answer, the marker, then more text), greedily and on the CPU, with no training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from loraforge import ChatModel, PromptTemplate, TemplateError, check_template, register_template
from loraforge.data import templates
from loraforge.data.templates import check_stoppable
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer

EXAMPLE = (
    Path(__file__).resolve().parents[1] / "examples" / "custom_template" / "loraforge_vicuna.py"
)


@pytest.fixture(autouse=True)
def fresh_registry():
    templates._reset_plugins()
    yield
    templates._reset_plugins()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def vicuna():
    """The shipped example plugin's template, registered here as a plugin would be."""
    spec = importlib.util.spec_from_file_location("loraforge_vicuna_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register_template(module.VicunaTemplate, source="test (example plugin)")
    return templates.get_template("vicuna")


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def forced_model(tok, chain: list[int]):
    """A tiny Phi-3 model that, after token ``chain[i]``, always predicts ``chain[i + 1]``."""
    assert len(set(chain)) == len(chain), "chain tokens must be distinct"
    model = build_tiny_model(tok, hidden_size=64).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head.zero_()
        for i, t in enumerate(chain):
            emb[t] = 0.0
            emb[t, i] = 1.0
        for i, nxt in enumerate(chain[1:]):
            head[nxt, i] = 1.0
    return model


def count_forwards(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def vicuna_chain(tok, chat: ChatModel, prompt: str = "hi") -> list[int]:
    last = chat.prompt_ids(prompt)[-1]
    return [last, *ids_of(tok, "ok"), *ids_of(tok, "</s>"), *ids_of(tok, "XYZ")]


# --------------------------------------------------------------------------- chat and stream


def test_the_example_marker_is_several_tokens(tok, vicuna):
    assert len(ids_of(tok, vicuna.end_of_turn)) == 4  # '<', '/', 's', '>' in the tiny tokenizer
    chat = ChatModel(None, tok, vicuna)
    assert chat.stop_strings == ["</s>"]
    assert chat.stop_token_ids == [tok.eos_token_id]


def test_chat_stops_on_a_multi_token_marker_and_strips_it(tok, vicuna):
    chat = ChatModel(None, tok, vicuna)
    chat.model = forced_model(tok, vicuna_chain(tok, chat))
    calls = count_forwards(chat.model)
    # Without a stop, the forced model writes 'ok</s>XYZ' and then whatever follows Z.
    raw = chat.model.generate(
        torch.tensor([chat.prompt_ids("hi")]), max_new_tokens=12, do_sample=False
    )
    assert tok.decode(raw[0, len(chat.prompt_ids("hi")) :]).startswith("ok</s>XYZ")
    calls.clear()
    assert chat.chat("hi", max_new_tokens=12) == "ok"
    assert len(calls) == 2 + 4  # generation stopped after the marker: 'o', 'k', '<', '/', 's', '>'


def test_stream_never_yields_the_marker(tok, vicuna):
    chat = ChatModel(None, tok, vicuna)
    chat.model = forced_model(tok, vicuna_chain(tok, chat))
    pieces = list(chat.stream("hi", max_new_tokens=12))
    assert "".join(pieces) == "ok"
    assert not any("<" in p for p in pieces)


def test_stream_holds_back_only_what_could_start_the_marker():
    chat = ChatModel(None, build_tiny_tokenizer(), _template("</s>"))
    feed = ["a <", "b", " </", "s", ">tail", "more"]
    assert list(chat._until_marker(iter(feed))) == ["a ", "<b", " "]
    assert list(chat._until_marker(iter(["x</", "t"]))) == ["x", "</t"]
    assert "".join(chat._until_marker(iter(["no marker <"]))) == "no marker <"


def test_user_stop_strings_are_kept_with_the_marker(tok, vicuna):
    chat = ChatModel(None, tok, vicuna)
    chat.model = forced_model(tok, vicuna_chain(tok, chat))
    assert chat.chat("hi", max_new_tokens=12, stop_strings=["k"]) == "ok"  # 'k' stops first
    calls = count_forwards(chat.model)
    chat.chat("hi", max_new_tokens=12, stop_strings=["k"])
    assert len(calls) == 2


def test_a_one_token_marker_stops_by_its_id(tok):
    phi4 = templates.get_template("phi-4")
    chat = ChatModel(None, tok, phi4)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (chat.stop_token_ids, chat.stop_strings) == ([im_end], [])
    chain = [chat.prompt_ids("hi")[-1], *ids_of(tok, "ok"), im_end, *ids_of(tok, "XYZ")]
    chat.model = forced_model(tok, chain)
    assert chat.chat("hi", max_new_tokens=12) == "ok"
    assert "".join(chat.stream("hi", max_new_tokens=12)) == "ok"


# --------------------------------------------------------------------------- merged model


def test_merged_model_stops_on_a_multi_token_marker(tok, vicuna, tmp_path, caplog):
    chat = ChatModel(None, tok, vicuna)
    chat.model = forced_model(tok, vicuna_chain(tok, chat))
    prompt = chat.prompt_ids("hi")
    with caplog.at_level(logging.WARNING, logger="loraforge.inference"):
        out = chat.merge_and_save(tmp_path / "merged")
    assert "generate() is given tokenizer=" in caplog.text
    assert "stop_strings=['</s>']" in caplog.text
    config = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert config["stop_strings"] == ["</s>"]
    assert config["eos_token_id"] in ([tok.eos_token_id], tok.eos_token_id)
    # A plain transformers user: the saved generation_config stops on the marker ...
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    plain_tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([prompt])
    new = model.generate(ids, max_new_tokens=12, do_sample=False, tokenizer=plain_tok)
    assert plain_tok.decode(new[0, len(prompt) :]) == "ok</s>"
    # ... and generate() without the tokenizer refuses rather than running past it.
    with pytest.raises(ValueError, match=r"tokenizer"):
        model.generate(ids, max_new_tokens=12, do_sample=False)


def test_merged_model_with_a_one_token_marker_uses_eos_ids(tok, tmp_path):
    chat = ChatModel(None, tok, templates.get_template("phi-4"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    chain = [chat.prompt_ids("hi")[-1], *ids_of(tok, "ok"), im_end, *ids_of(tok, "XYZ")]
    chat.model = forced_model(tok, chain)
    out = chat.merge_and_save(tmp_path / "merged")
    config = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert config["eos_token_id"] in ([im_end], im_end)
    assert config.get("stop_strings") is None
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = chat.prompt_ids("hi")
    new = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert new[0, len(prompt) :].tolist() == [*ids_of(tok, "ok"), im_end]


# --------------------------------------------------------------------------- check_stoppable


def _template(marker: str, name: str = "stop-test") -> PromptTemplate:
    class T(PromptTemplate):
        header = "{role}: "
        end_of_turn = marker
        separator = "\n"
        generation_prompt = "assistant: "

    T.name = name
    return T()


def test_check_stoppable_accepts_built_ins_and_the_example(tok, vicuna):
    for name in ("phi-4", "chatml", "phi-3", "phi-4-mini", "llama-3", "vicuna"):
        check_stoppable(name, tok)
    vicuna_tok = build_tiny_tokenizer(chat_template=type(vicuna).chat_template)
    check_template("vicuna", vicuna_tok)


@pytest.mark.shared
def test_check_stoppable_vicuna_on_real_phi4(phi4_tokenizer, vicuna):
    assert len(ids_of(phi4_tokenizer, "</s>")) == 3
    check_stoppable(vicuna, phi4_tokenizer)
    assert ChatModel(None, phi4_tokenizer, vicuna).stop_strings == ["</s>"]


def test_empty_marker_is_refused(tok):
    message = (
        "template 'stop-test' has an empty end_of_turn: a model trained with it never learns "
        "where its answer ends, and generation would stop only at max_new_tokens. Set "
        "end_of_turn to the text that closes a message (for example the tokenizer's EOS token "
        "'<|im_end|>')"
    )
    with pytest.raises(TemplateError, match=f"^{re.escape(message)}$"):
        check_stoppable(_template(""), tok)
    with pytest.raises(TemplateError, match="empty end_of_turn"):
        check_template(_template(""), tok, conversations=[])


def test_marker_a_normalizer_changes_is_refused(tok):
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()
    lower = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    check_stoppable(_template("<end>"), lower)  # reads back as written: fine
    with pytest.raises(
        TemplateError,
        match=r"cannot stop on end_of_turn '<END>': it is 5 tokens .* decodes as '.*<end>', which "
        r"does not end with the marker\. The tokenizer does not read it back as written",
    ):
        check_stoppable(_template("<END>"), lower)


def test_marker_mixing_a_special_token_with_text_is_refused(tok):
    with pytest.raises(
        TemplateError,
        match=r"cannot stop on end_of_turn '<\|im_end\|>##'.*special token\(s\) \['<\|im_end\|>'\]"
        r", which decoding drops: make end_of_turn the special token alone and move the rest "
        r"into `separator`",
    ):
        check_stoppable(_template("<|im_end|>##"), tok)
    check_stoppable(_template("<|im_end|>\n"), tok)  # the special token's rstrip eats the \n


def test_marker_the_tokenizer_cannot_write_is_refused():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(
        TemplateError,
        match=re.escape(
            "this tokenizer cannot write end_of_turn '</s>' (it tokenizes to ['[UNK]'])"
        ),
    ):
        check_stoppable(_template("</s>"), word)
