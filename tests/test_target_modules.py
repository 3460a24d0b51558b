"""`resolve_target_modules`: "all-linear" finds Phi-4's fused layers; wrong names are errors."""

from __future__ import annotations

import re

import pytest

from loraforge.errors import TargetModulesError
from loraforge.models import linear_module_names, resolve_target_modules

PHI4_LINEAR = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
TUTORIAL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_all_linear_on_phi3_finds_the_fused_layers(tiny_model):
    assert resolve_target_modules(tiny_model, "all-linear") == PHI4_LINEAR
    assert linear_module_names(tiny_model) == PHI4_LINEAR
    # the output head is a linear layer, but not a LoRA target
    assert "lm_head" in dict(tiny_model.named_modules())
    assert "lm_head" not in resolve_target_modules(tiny_model, "all-linear")


def test_tutorial_names_fail_listing_exactly_the_unmatched_ones(tiny_model):
    with pytest.raises(TargetModulesError) as info:
        resolve_target_modules(tiny_model, TUTORIAL)
    msg = str(info.value)
    assert re.search(
        re.escape(
            "these target_modules match no module of Phi3ForCausalLM: "
            "q_proj, k_proj, v_proj, gate_proj, up_proj."
        ),
        msg,
    )
    assert "The model's linear modules are: down_proj, gate_up_proj, o_proj, qkv_proj" in msg
    unmatched = msg.split(": ", 1)[1].split(".", 1)[0].split(", ")
    assert unmatched == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    assert "o_proj" not in unmatched and "down_proj" not in unmatched
    assert "all-linear" in msg
    assert isinstance(info.value, ValueError)


def test_explicit_names_and_dotted_suffixes(tiny_model):
    assert resolve_target_modules(tiny_model, ["qkv_proj", "o_proj"]) == ["o_proj", "qkv_proj"]
    assert resolve_target_modules(tiny_model, ["self_attn.qkv_proj"]) == ["self_attn.qkv_proj"]
    assert resolve_target_modules(tiny_model, ["model.layers.0.mlp.down_proj"]) == [
        "model.layers.0.mlp.down_proj"
    ]
    assert resolve_target_modules(tiny_model, "qkv_proj") == ["qkv_proj"]
    assert resolve_target_modules(tiny_model, ["o_proj", "o_proj"]) == ["o_proj"]


def test_suffix_must_match_whole_name_parts(tiny_model):
    # "up_proj" is a suffix of the string "gate_up_proj" but not a module name
    with pytest.raises(
        TargetModulesError,
        match=re.escape("match no module of Phi3ForCausalLM: up_proj, attn.qkv_proj"),
    ):
        resolve_target_modules(tiny_model, ["up_proj", "attn.qkv_proj"])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("input_layernorm", "Phi3RMSNorm"),
        ("self_attn", "Phi3Attention"),
        ("embed_tokens", "Embedding"),
    ],
)
def test_non_linear_module_is_an_error(tiny_model, name, kind):
    with pytest.raises(
        TargetModulesError,
        match=re.escape(
            f"these are not linear layers: {name} ({kind}). The model's linear modules are: "
            "down_proj, gate_up_proj, o_proj, qkv_proj"
        ),
    ):
        resolve_target_modules(tiny_model, ["qkv_proj", name])


def test_unmatched_and_non_linear_are_reported_together(tiny_model):
    with pytest.raises(TargetModulesError) as info:
        resolve_target_modules(tiny_model, ["q_proj", "input_layernorm"])
    msg = str(info.value)
    assert "match no module of Phi3ForCausalLM: q_proj" in msg
    assert "these are not linear layers: input_layernorm (Phi3RMSNorm)" in msg


def test_llama_all_linear_gives_the_seven_unfused_names(llama_model):
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_target_modules(llama_model, "all-linear") == expected
    assert resolve_target_modules(llama_model, TUTORIAL) == sorted(TUTORIAL)
    with pytest.raises(
        TargetModulesError,
        match=re.escape("match no module of LlamaForCausalLM: qkv_proj, gate_up_proj"),
    ):
        resolve_target_modules(llama_model, ["qkv_proj", "gate_up_proj"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_resolved_names_work_with_peft(tiny_model):
    from peft import LoraConfig, get_peft_model

    names = resolve_target_modules(tiny_model, "all-linear")
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(PHI4_LINEAR)
