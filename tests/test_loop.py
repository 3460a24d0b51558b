"""The Trainer as loraforge runs it: its one subclass, the step trims, the detached head, and
what a run says one optimizer step holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.fast.losses import detached_head, head_is_detachable
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer, sample_data_path
from loraforge.training.loop import build_hf_trainer, lighter_steps

TOK = build_tiny_tokenizer()
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _lora(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_tiny_model(TOK, hidden_size=32, num_layers=2, intermediate_size=64)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    return get_peft_model(model, config)


def test_lighter_steps_still_puts_every_module_back_in_training_mode():
    model = _lora(0.1)
    layers = model.get_base_model().model.layers
    with lighter_steps(model):
        model.train()
        layers[1].mlp.eval()  # e.g. a callback switched one part off
        model.train()
        assert all(m.training for m in model.modules())
        model.eval()
        assert not any(m.training for m in model.modules())
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_lighter_zero_grad_clears_only_what_the_adapter_has():
    model = _lora()
    ids = torch.tensor([[1, 2, 3, 4]])
    with lighter_steps(model):
        model(input_ids=ids, labels=ids).loss.backward()
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())


def test_trainer_flop_count_is_transformers_count_from_a_cached_parameter_count(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _lora()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    ours, theirs = build_hf_trainer(model=model, args=args), Trainer(model=model, args=args)
    inputs = {"input_ids": torch.zeros(2, 37, dtype=torch.long)}
    assert ours.floating_point_ops(inputs) == theirs.floating_point_ops(inputs) > 0
    assert ours._n_params is not None  # counted once, then reused


def test_detached_head_passes_hidden_states_and_restores_the_head():
    model = _lora()
    head = model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=keep).logits
        with detached_head(model) as real:
            hidden = model(input_ids=ids, logits_to_keep=keep).logits
        assert real is head and model.get_output_embeddings() is head
    assert hidden.shape[-1] == model.config.hidden_size
    torch.testing.assert_close(head(hidden), logits)


def test_head_is_detachable_only_when_the_logits_are_the_heads_output():
    model = _lora()
    ids = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    ok, why = head_is_detachable(model, ids)
    assert ok, why
    assert model.training  # the check's eval mode is undone
    inner = model.get_base_model()
    plain_forward = inner.forward

    def capped(*args, **kwargs):  # a model that soft-caps its logits after the head (Gemma 2)
        out = plain_forward(*args, **kwargs)
        out.logits = 0.5 * torch.tanh(out.logits / 0.5)
        return out

    inner.forward = capped
    ok, why = head_is_detachable(model, ids)
    assert not ok and "differ from lm_head(hidden)" in why
    del inner.forward
    trained_head = _lora()
    trained_head.get_output_embeddings().weight.requires_grad_(True)
    ok, why = head_is_detachable(trained_head, ids)
    assert not ok and "not a frozen nn.Linear" in why


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return prepare_tiny_base(root / "base", hidden_size=32), root


@pytest.mark.integration
@pytest.mark.parametrize("packing", ["off", "on"])
def test_the_run_says_what_one_optimizer_step_holds(tiny_base, packing, caplog):
    from loraforge import train

    base, root = tiny_base
    records = json.loads(sample_data_path().read_text(encoding="utf-8"))
    recipe = demo_recipe(
        base,
        root / f"out-{packing}",
        num_epochs=1,
        batch_size=3 if packing == "off" else None,  # a packed micro-step is one row
        grad_accum=2,
        packing=packing,
        pack_tokens=256 if packing == "on" else None,
    )
    with caplog.at_level("INFO", logger="loraforge"):
        result = train(recipe)
    step = json.loads(Path(result.output_dir, "loraforge.json").read_text("utf-8"))["metrics"][
        "step"
    ]
    assert step == result.metrics["step"]
    n = result.metrics["train_examples"]
    assert n == len(records)
    assert step["packed"] is (packing == "on")
    assert step["micro_batches_per_step"] == 2
    assert step["total_steps"] == step["steps_per_epoch"] == result.metrics["steps"]
    assert step["examples_per_step"] == pytest.approx(n / step["steps_per_epoch"])
    if packing == "off":
        assert step["micro_batch"] == "3 examples (padded)"
        assert step["steps_per_epoch"] == -(-n // 6)
    else:
        assert step["micro_batch"] == "<= 256 tokens (packed row)"
        assert step["examples_per_step"] > 2  # each of the 2 rows holds several examples
    assert step["tokens_per_step"] > step["supervised_tokens_per_step"] > 0
    assert "one optimizer step = 2 x" in caplog.text


def test_chunked_head_check_runs_under_the_training_autocast(monkeypatch):
    """The start-of-run check of the chunked head runs the model as training will: under its
    mixed precision, so the lean functions installed for that precision run (before, it ran
    without autocast and each fused layer logged a hand-back to PEFT's forward)."""
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.fast.packing import PackedCollator
    from loraforge.training import steps
    from loraforge.training.distributed import Ranks

    model = _lora().to(torch.bfloat16)
    report = apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    assert report.fused_layers == 8
    example = {"input_ids": list(range(5, 25)), "labels": list(range(5, 25))}
    batches = steps.Batches(
        train=[[example]], eval=None, collator=PackedCollator(TOK.pad_token_id), layout=None
    )
    monkeypatch.setattr(steps, "training_autocast", lambda m: None)  # as on the CPU
    assert steps.head_detachable(model, batches, Ranks())
    assert report.fallback_calls  # without autocast, the fused layers hand calls back to PEFT
    report.fallback_calls.clear()
    monkeypatch.setattr(steps, "training_autocast", lambda m: torch.bfloat16)  # as on a GPU
    assert steps.head_detachable(model, batches, Ranks())
    assert not report.fallback_calls  # the check ran the lean functions training runs


def test_fused_adamw_gives_way_to_the_multi_tensor_form_under_float16_loss_scaling(caplog):
    """Under fp16 the fused optimizer applies the grad scaler's skips itself, so the Trainer
    would advance the learning-rate schedule on a skipped step (huggingface/accelerate#4242):
    ``adamw_torch`` runs there instead, and the log says so; elsewhere the recipe's choice."""
    from loraforge import LoraRecipe
    from loraforge.training.steps import optimizer_name

    fused = LoraRecipe(model="m", data="d.json")
    assert fused.optimizer == "adamw_torch_fused"
    with caplog.at_level("INFO", logger="loraforge"):
        assert optimizer_name(fused, torch.float16) == "adamw_torch"
    assert "instead of adamw_torch_fused under float16" in caplog.text
    assert optimizer_name(fused, torch.bfloat16) == "adamw_torch_fused"
    assert optimizer_name(fused, None) == "adamw_torch_fused"
    for other in ("adamw_torch", "sgd"):
        assert optimizer_name(fused.replace(optimizer=other), torch.float16) == other
