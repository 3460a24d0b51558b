"""The fast path's pieces that run on the CPU: the lean LoRA functions and the planner."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from loraforge import LoraRecipe, RecipeError
from loraforge.fast.lora_ops import fuse_lora_forward
from loraforge.fast.plan import plan_fast_path
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


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _layers(model):
    return model.base_model.model.model.layers


def test_partial_checkpointing_checkpoints_the_first_layers_and_keeps_the_gradients():
    from loraforge.models import enable_checkpointing

    fused = _lora(0.1)
    fuse_lora_forward(fused)
    part = copy.deepcopy(fused)
    enable_checkpointing(part.get_base_model(), layers=1)
    flags = [layer.gradient_checkpointing for layer in _layers(part)]
    assert flags == [True, False]
    ids = torch.randint(0, 1000, (2, 40))
    for model in (fused, part):
        torch.manual_seed(11)
        model(input_ids=ids, labels=ids).loss.backward()
    ref = _grads(fused)
    for n, g in _grads(part).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-6, atol=1e-9)


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


def _phi4_sized(norm_weight: float = 1.0):
    """Phi-4's shape as far as the planner looks: config, 14.7 B bf16 parameters and the norms
    (small stand-ins at Phi-4's 81 norm sites, all weights ``norm_weight``)."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    cfg = SimpleNamespace(hidden_size=5120, num_hidden_layers=40, vocab_size=100352)
    norms = [("model.norm", Phi3RMSNorm(8))] + [
        (f"model.layers.{i}.{site}", Phi3RMSNorm(8))
        for i in range(40)
        for site in ("input_layernorm", "post_attention_layernorm")
    ]
    for _, norm in norms:
        norm.weight.data.fill_(norm_weight)
        norm.to(torch.bfloat16).requires_grad_(False)
    return SimpleNamespace(
        config=cfg,
        dtype=torch.bfloat16,
        parameters=lambda: [_Param(14_659_507_200)],
        named_modules=lambda: iter(norms),
    )


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


def test_plan_for_phi4_under_40_gib_keeps_all_activations_of_2048_token_rows(fake_gpu):
    """Under the 40 GiB cap the lean path keeps every layer's activations for 2,048-token rows;
    PEFT's forward needs many layers checkpointed; full checkpointing when asked for packs the
    largest row that fits; a larger row gets a few layers checkpointed."""
    fake_gpu(80)
    plan = plan_fast_path(_recipe(), _phi4_sized(), 384, supervised_fraction=0.34)
    assert (plan.packing, plan.pack_tokens, plan.gradient_checkpointing) == (True, 2048, "off")
    assert "under a 40 GiB cap" in plan.reason
    peft = plan_fast_path(_recipe(fused_lora=False), _phi4_sized(), 384, supervised_fraction=0.34)
    assert peft.gradient_checkpointing == "partial" and 10 < peft.checkpoint_layers < 40
    full = plan_fast_path(_recipe(gradient_checkpointing="full"), _phi4_sized(), 384, 0.34)
    assert (full.pack_tokens, full.gradient_checkpointing) == (8192, "full")
    big = plan_fast_path(_recipe(pack_tokens=3072), _phi4_sized(), 384, 0.34)
    assert (big.pack_tokens, big.gradient_checkpointing) == (3072, "partial")
    assert 0 < big.checkpoint_layers < 20
    assert f"checkpointing {big.checkpoint_layers} layers" in big.describe()
    roomy = plan_fast_path(_recipe(max_memory_gib=48), _phi4_sized(), 384, 0.34)
    assert roomy.gradient_checkpointing == "off" and roomy.pack_tokens >= 3072


def test_plan_counts_the_norm_inputs_the_lean_norms_cannot_drop(fake_gpu):
    """Norms lean_norms leaves alone (here: zero weights) keep their inputs: the planner counts
    them, and 2,048-token rows then need a few layers checkpointed under 40 GiB."""
    from loraforge.fast.plan import _lean_bytes

    assert _lean_bytes(_phi4_sized()) == 25
    assert _lean_bytes(_phi4_sized(norm_weight=0.0)) == pytest.approx(25 + 2 * 81 / 40)
    fake_gpu(80)
    plan = plan_fast_path(_recipe(), _phi4_sized(norm_weight=0.0), 384, supervised_fraction=0.34)
    assert (plan.pack_tokens, plan.gradient_checkpointing) == (2048, "partial")


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
    monkeypatch.setattr("loraforge.fast.plan.liger_available", lambda: False)
    with pytest.raises(RecipeError, match=r"liger_kernels: 'on' needs the liger-kernel package"):
        plan_fast_path(
            LoraRecipe(model="m", data="d", liger_kernels="on"), build_tiny_model(TOK), 100
        )


def test_lighter_steps_still_puts_every_module_back_in_training_mode():
    from loraforge.training.trainer import _lighter_steps

    model = _lora(0.1)
    with _lighter_steps(model):
        model.train()
        _layers(model)[1].mlp.eval()  # e.g. a callback switched one part off
        model.train()
        assert all(m.training for m in model.modules())
        model.eval()
        assert not any(m.training for m in model.modules())
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_plan_counts_full_logits_when_the_loss_cannot_be_chunked(fake_gpu):
    fake_gpu(80)
    chunked = plan_fast_path(_recipe(), _phi4_sized(), 384, 1.0)
    full = plan_fast_path(_recipe(), _phi4_sized(), 384, 1.0, chunkable_head=False)
    assert full.checkpoint_layers > chunked.checkpoint_layers == 0


def test_trainer_flop_count_is_transformers_count_from_a_cached_parameter_count(tmp_path):
    from transformers import Trainer, TrainingArguments

    from loraforge.training.trainer import _make_trainer

    model = _lora(0.0)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    ours, theirs = _make_trainer(model=model, args=args), Trainer(model=model, args=args)
    inputs = {"input_ids": torch.zeros(2, 37, dtype=torch.long)}
    assert ours.floating_point_ops(inputs) == theirs.floating_point_ops(inputs) > 0
    assert ours._n_params is not None  # counted once, then reused
