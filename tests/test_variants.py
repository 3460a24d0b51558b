"""LoRA variants through PEFT (DoRA, rsLoRA, PiSSA, OLoRA, LoRA+): the recipe's checks, what the
fast path's allow-list does with each, and a CPU run of each whose saved adapter, loaded in plain
PEFT on the original base model, gives the logits the trained model gave."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from loraforge import LoraRecipe, RecipeError, load_for_inference, train
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.fast.lora_ops import apply_lean_functions
from loraforge.tiny import sample_data_path
from loraforge.variants import INITIAL_ADAPTER, describe_variant, lora_config

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]


def _recipe(**changes) -> LoraRecipe:
    return LoraRecipe(model="m", data="d.jsonl", **changes)


# --------------------------------------------------------------------------- the recipe


def test_dora_with_pissa_or_olora_is_an_error_naming_both():
    for init in ("pissa", "olora"):
        with pytest.raises(RecipeError, match=rf"use_dora and lora_init: '{init}'"):
            _recipe(use_dora=True, lora_init=init)
    _recipe(use_dora=True, lora_init="gaussian")  # fine
    _recipe(use_dora=True, use_rslora=True)  # PEFT composes them


@pytest.mark.parametrize("ratio", [0, -1, float("nan"), True, "x"])
def test_loraplus_ratio_must_be_a_positive_number(ratio):
    with pytest.raises(RecipeError, match="loraplus_lr_ratio: must be None"):
        _recipe(loraplus_lr_ratio=ratio)


def test_unknown_init_lists_the_valid_ones(tmp_path):
    with pytest.raises(RecipeError, match="lora_init: must be one of 'default', 'gaussian'"):
        LoraRecipe.from_dict({"model": "m", "data": "d.jsonl", "lora_init": "loftq"})
    r = LoraRecipe.from_dict(
        {"model": "m", "data": "d", "use_dora": "true", "loraplus_lr_ratio": 16}
    )
    assert r.use_dora is True and r.loraplus_lr_ratio == 16.0
    assert describe_variant(r) == "DoRA, LoRA+ x16"


def test_lora_config_is_peft_s():
    c = lora_config(_recipe(use_rslora=True, lora_init="olora", lora_r=4), ["qkv_proj"])
    assert c.use_rslora and not c.use_dora and c.init_lora_weights == "olora" and c.r == 4
    assert lora_config(_recipe(), ["o_proj"]).init_lora_weights is True


# --------------------------------------------------------------------------- the fast path


def _peft(tiny_model, **changes):
    from peft import get_peft_model

    recipe = _recipe(lora_dropout=0.0, **changes)
    return get_peft_model(
        tiny_model, lora_config(recipe, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    )


def test_dora_keeps_peft_forward_and_says_so(tiny_model, caplog):
    model = _peft(tiny_model, use_dora=True)
    with caplog.at_level("INFO", logger="loraforge"):
        report = apply_lean_functions(model)
    assert report.fused_layers == 0 and set(report.layers.values()) == {"DoRA"}
    assert "PEFT forward for 8: " in caplog.text and "(DoRA)" in caplog.text


@pytest.mark.parametrize(
    "changes",
    [
        {"use_rslora": True},
        {"lora_init": "pissa"},
        {"lora_init": "olora"},
        {"lora_init": "gaussian"},
    ],
)
def test_rslora_pissa_olora_run_the_lean_functions_equal_to_peft(tiny_model, changes):
    torch.manual_seed(0)
    model = _peft(tiny_model, lora_r=4, lora_alpha=16, **changes)
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    if changes.get("use_rslora"):
        assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(4))
    for p in model.parameters():  # B is zero at init for some: make every adapter matter
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    want = model(input_ids=ids).logits
    want.float().pow(2).mean().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    report = apply_lean_functions(model)  # checked numerically against PEFT's forward first
    assert report.fused_layers == len(report.layers) == 8, report.summary()
    assert all(c.passed for c in report.checks)
    got = model(input_ids=ids).logits
    got.float().pow(2).mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    prepare_tiny_base(root / "base", hidden_size=64)
    return root


class _Logits(TrainerCallback):
    """The trained model's logits on fixed ids, taken in memory at the end of training."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.logits = ids, None

    def on_train_end(self, args, state, control, model=None, **kw):
        was = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.ids).logits.clone()
        model.train(was)


def _plain_peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True, lora_alpha=8),  # scaling 8 / sqrt(16) = 2, as alpha/r=32/16
    "pissa": dict(lora_init="pissa", save_steps=40),  # checkpoint-40: the unconverted adapter
    "olora": dict(lora_init="olora", save_steps=40),
    "loraplus": dict(loraplus_lr_ratio=4.0, learning_rate=5e-3),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_learns_and_its_adapter_loads_in_plain_peft(workdir, name):
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = _Logits(ids)
    recipe = demo_recipe(
        workdir / "base",
        workdir / name,
        data=str(workdir / "data.json"),
        num_epochs=40,
        logging_steps=5,
        **VARIANTS[name],
    )
    result = train(recipe, callbacks=[logits])
    m = result.metrics
    assert m["last_loss"] < 0.4 * m["first_loss"], m
    out = result.output_dir
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    plain = _plain_peft_logits(workdir / "base", out, ids)
    torch.testing.assert_close(plain, logits.logits, rtol=1e-4, atol=1e-4)
    if name in ("pissa", "olora"):  # converted: a plain LoRA of twice the rank, on the original
        assert config["r"] == 32 and config["init_lora_weights"] is True
        assert (out / INITIAL_ADAPTER / "adapter_model.safetensors").is_file()
        base = _plain_peft_logits(workdir / "base", out / INITIAL_ADAPTER, ids)
        assert not torch.allclose(base, plain, atol=1e-3)  # the run changed the model
        # a checkpoint keeps the unconverted adapter (resume needs it); PEFT loads it onto the
        # original base by running the same initialisation again
        ckpt = out / "checkpoints" / "checkpoint-40"
        assert json.loads((ckpt / "adapter_config.json").read_text())["init_lora_weights"] == name
        torch.testing.assert_close(
            _plain_peft_logits(workdir / "base", ckpt, ids), logits.logits, rtol=1e-4, atol=1e-4
        )
    else:
        assert config["r"] == 16 and not (out / INITIAL_ADAPTER).exists()
        assert config["use_dora"] is (name == "dora")
        assert config["use_rslora"] is (name == "rslora")
    chat = load_for_inference(out, device="cpu")
    learned = sum(chat.chat(rec["instruction"]) == rec["output"] for rec in RECORDS)
    assert learned >= 6, f"{name}: {learned} of {len(RECORDS)} answers reproduced"


@pytest.mark.integration
def test_loraplus_gives_b_its_own_learning_rate(workdir):
    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            seen["lrs"] = sorted({g["lr"] for g in optimizer.param_groups if g["params"]})

    recipe = demo_recipe(
        workdir / "base",
        workdir / "loraplus-groups",
        data=str(workdir / "data.json"),
        max_steps=1,
        loraplus_lr_ratio=16,
        learning_rate=1e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
    )
    train(recipe, callbacks=[Groups()])
    assert seen["lrs"] == pytest.approx([1e-3, 16e-3])
