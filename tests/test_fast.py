"""The fast path's pieces that run on the CPU: the fused LoRA forward and the planner."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from loraforge import LoraRecipe, RecipeError
from loraforge.fast import fuse_lora_forward, plan_fast_path
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer

TOK = build_tiny_tokenizer()
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _lora(dropout: float):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(TOK)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=TARGETS
        ),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def test_fused_lora_forward_is_exact_in_float32_with_dropout():
    plain = _lora(0.1)
    fused = copy.deepcopy(plain)
    assert fuse_lora_forward(fused) == 8  # 4 module types x 2 layers
    ids = torch.randint(0, 1000, (2, 40))
    torch.manual_seed(3)
    a = plain(input_ids=ids, labels=ids).loss
    a.backward()
    torch.manual_seed(3)  # same dropout masks
    b = fused(input_ids=ids, labels=ids).loss
    b.backward()
    assert a.item() == b.item()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-8)


def test_fused_lora_forward_leaves_mixed_dtypes_to_peft():
    """bf16 activations with fp32 adapters and no autocast: PEFT's own forward (which casts)."""
    plain = _lora(0.0)
    plain.base_model.model.to(torch.bfloat16)
    for n, p in plain.named_parameters():
        if "lora" in n:
            p.data = p.data.float()
    fused = copy.deepcopy(plain)
    fuse_lora_forward(fused)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def _recipe(**kw) -> LoraRecipe:
    return LoraRecipe(model="m", data="d", attention="sdpa", liger_kernels="off", **kw)


def test_plan_on_the_cpu_is_the_plain_path():
    plan = plan_fast_path(_recipe(), build_tiny_model(TOK), 100)
    assert (plan.packing, plan.attention, plan.gradient_checkpointing) == (False, "sdpa", "off")
    packed = plan_fast_path(_recipe(packing="on"), build_tiny_model(TOK), 100)
    assert packed.packing and packed.pack_tokens == 4096


class _Param:
    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n

    def element_size(self) -> int:
        return 2


def _phi4_sized():
    """Phi-4's shape as far as the planner looks: config and 14.7 B bf16 parameters."""
    cfg = SimpleNamespace(hidden_size=5120, num_hidden_layers=40)
    return SimpleNamespace(config=cfg, parameters=lambda: [_Param(14_659_507_200)])


@pytest.fixture
def fake_gpu(monkeypatch):
    def card(gib: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.cuda,
            "get_device_properties",
            lambda i: SimpleNamespace(total_memory=int(gib * 2**30)),
        )

    return card


def test_plan_for_phi4_under_40_gib_checkpoints_full_8192_token_rows(fake_gpu):
    fake_gpu(80)
    plan = plan_fast_path(_recipe(), _phi4_sized(), 384)
    assert (plan.packing, plan.pack_tokens, plan.gradient_checkpointing) == (True, 8192, "full")
    assert "under a 40 GiB cap" in plan.reason


def test_plan_without_a_cap_uses_the_card_and_skips_checkpointing(fake_gpu):
    fake_gpu(140)
    plan = plan_fast_path(_recipe(max_memory_gib=None), _phi4_sized(), 384)
    assert plan.gradient_checkpointing == "off" and plan.pack_tokens >= 2048


def test_plan_without_packing_sizes_the_padded_batch(fake_gpu):
    fake_gpu(80)
    small = plan_fast_path(_recipe(packing="off", batch_size=1, max_length=384), _phi4_sized(), 384)
    assert (small.packing, small.gradient_checkpointing) == (False, "off")
    big = plan_fast_path(
        _recipe(packing="off", batch_size=64, max_length=2048), _phi4_sized(), 2048
    )
    assert big.gradient_checkpointing == "full"


def test_liger_on_without_the_package_is_a_recipe_error(monkeypatch):
    monkeypatch.setattr("loraforge.fast.liger_available", lambda: False)
    with pytest.raises(RecipeError, match=r"liger_kernels: 'on' needs the liger-kernel package"):
        plan_fast_path(
            LoraRecipe(model="m", data="d", liger_kernels="on"), build_tiny_model(TOK), 100
        )
