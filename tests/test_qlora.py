"""QLoRA: a base quantized by bitsandbytes (NF4), the lean functions on it, and the merge.

bitsandbytes' 4-bit quantize/dequantize and ``Linear4bit`` run on the CPU (bitsandbytes >= 0.48),
so these run in CI (the ``dev`` extra installs it); the bf16 GPU twin of the equivalence test is in
``tests/test_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install '.[qlora]')")

from conftest import PHI4_SIZES

from loraforge import LoraRecipe, ModelError, RecipeError, load_for_inference, train
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.fast import quant
from loraforge.fast.lora_ops import apply_lean_functions
from loraforge.fast.plan import check_environment
from loraforge.fast.shape import ModelShape
from loraforge.models import load_model
from loraforge.tiny import sample_data_path

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random Phi-3 model saved in float32 (dimensions multiples of bitsandbytes' 64)."""
    return prepare_tiny_base(tmp_path_factory.mktemp("qlora") / "base", hidden_size=64)


def qlora_model(base: Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    """The tiny model loaded NF4 with PEFT LoRA on every linear layer, ``lora_B`` non-zero."""
    from peft import LoraConfig, get_peft_model

    model = load_model(str(base), dtype=dtype, quantization="nf4", device=device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()  # bitsandbytes repacks 4-bit weights for its CPU kernel in eval mode


def loss_and_grads(model, ids: torch.Tensor, autocast: torch.dtype | None = None):
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_nf4_loading_quantizes_the_linear_layers(base):
    import bitsandbytes as bnb

    model = load_model(str(base), dtype=torch.float32, quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 8  # qkv, o, gate_up, down in two decoder layers
    w = layers[0].weight
    assert w.quant_type == "nf4" and w.quant_state.nested  # double quantization
    assert layers[0].compute_dtype == torch.float32
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head stays 16/32-bit
    assert quant.model_quantization(model) == "nf4"


def test_lean_functions_on_nf4_equal_peft_qlora(base):
    """Same loss and LoRA gradients as PEFT's own QLoRA forward and backward (float32, CPU)."""
    model = qlora_model(base)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)  # on a GPU machine the quantized model loads onto the GPU
    want_loss, want = loss_and_grads(model, ids)
    report = apply_lean_functions(model)
    assert report.fused_layers == 8 and report.fused_mlps == 2, report.summary()
    assert all(c.passed for c in report.checks)
    assert any("nf4->float32" in c.kind for c in report.checks)
    got_loss, got = loss_and_grads(model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not report.fallback_calls


def test_recomputed_mlps_on_nf4_give_the_same_gradients_bit_for_bit(base):
    """On a 4-bit base the recomputed MLP dequantizes ``gate_up``'s weight in its backward pass
    and computes the output again: the same loss and gradients as the MLP that keeps it."""
    from loraforge.fast.fusion import recompute_mlps

    model = qlora_model(base)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)  # on a GPU machine the quantized model loads onto the GPU
    apply_lean_functions(model)
    want_loss, want = loss_and_grads(model, ids)
    assert recompute_mlps(model, 2) == 2
    got_loss, got = loss_and_grads(model, ids)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_backward_dequantizes_again_and_keeps_no_dense_weight(base):
    """The 4-bit function keeps the packed weight, never a dequantized copy, for backward."""
    from loraforge.fast.lora_ops import lora_linear

    model = qlora_model(base)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    adapter = "default"
    # on a GPU machine the quantized model loads onto the GPU
    x = torch.randn(2, 8, layer.in_features, device=model.device, requires_grad=True)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_linear(layer, adapter, None, x, a, b, 0.0, 0)
    dense_shape = (layer.out_features, layer.in_features)
    assert not [t for t in kept if tuple(t.shape) == dense_shape]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_allow_list_names_what_it_refuses(base):
    """A lora.Linear around a 4-bit layer (PEFT not told the model is quantized) and an int8
    base keep PEFT's forward, and the report says why."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from loraforge.fast.fusion import FUSED

    model = load_model(str(base), dtype=torch.float32, quantization="int8")
    assert quant.model_quantization(model) == "int8"
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS)).train()
    report = apply_lean_functions(model)
    assert report.fused_layers == 0
    assert all("Linear8bitLt" in why for why in report.layers.values()), report.layers
    ids = torch.randint(0, 1000, (1, 16), device=model.device)  # the GPU, on a GPU machine
    loss, grads = loss_and_grads(model, ids)  # int8 trains on PEFT's path
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())

    plain = load_model(str(base), dtype=torch.float32)
    layer = plain.model.layers[0].mlp.down_proj
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4").to("cpu")
    q.compute_dtype = torch.float32
    plain.model.layers[0].mlp.down_proj = q
    peft_model = get_peft_model(plain, LoraConfig(r=4, target_modules=["down_proj"])).train()
    report = apply_lean_functions(peft_model)
    why = report.layers["base_model.model.model.layers.0.mlp.down_proj"]
    assert why == "Linear on a base layer Linear4bit", report.layers
    assert report.layers["base_model.model.model.layers.1.mlp.down_proj"] == FUSED


def test_planner_counts_4bit_weights_and_their_scales(base):
    from transformers import AutoConfig

    model = load_model(str(base), dtype=torch.float32, quantization="nf4")
    shape = ModelShape.from_model(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert shape.weight_bytes > params  # the block scales and code books of the 4-bit weights
    full = ModelShape.from_model(load_model(str(base), dtype=torch.float32))
    assert shape.weight_bytes < full.weight_bytes
    assert shape.dequant_bytes == 2 * 256 * 64 * 4  # two float32 copies of gate_up (256 x 64)
    config = AutoConfig.from_pretrained(str(base))
    estimate = ModelShape.from_config(config, torch.float32, quantization="nf4")
    assert abs(estimate.weight_bytes - shape.weight_bytes) / shape.weight_bytes < 0.02
    # Phi-4's shape: 14.7B parameters, 29 GB in bf16; NF4 leaves the embeddings and head 16-bit
    phi4 = dict(PHI4_SIZES, model_type="phi3", hidden_act="silu")
    cfg = type("Cfg", (), phi4)()
    bf16 = ModelShape.from_config(cfg, "bfloat16")
    nf4 = ModelShape.from_config(cfg, "bfloat16", quantization="nf4")
    assert 27 < bf16.weight_bytes / 2**30 < 28
    assert 8 < nf4.weight_bytes / 2**30 < 9, nf4.weight_bytes / 2**30


def test_recipe_and_environment_errors(monkeypatch, base):
    with pytest.raises(RecipeError, match="quantization: must be one of 'none', 'nf4', 'int8'"):
        LoraRecipe(model="m", data="d.json", quantization="nf5")
    recipe = LoraRecipe(model="m", data="d.json", quantization="nf4")
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    with pytest.raises(RecipeError, match=r"bitsandbytes.*pip install 'loraforge\[qlora\]'"):
        check_environment(recipe, None)
    with pytest.raises(ModelError, match=r"loraforge\[qlora\]"):
        load_model(str(base), dtype=torch.float32, quantization="nf4")
    monkeypatch.undo()
    check_environment(recipe, None)  # bitsandbytes present: nothing to refuse on the CPU


def test_an_already_quantized_folder_is_refused(tmp_path, base):
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"already quantized.*gptq"):
        load_model(str(folder), dtype=torch.float32, quantization="nf4")


@pytest.mark.integration
def test_qlora_run_merges_onto_the_16bit_base_with_the_same_replies(tmp_path, base):
    """Train on the NF4 base; the run records it; merged onto the float32 weights, the adapter
    gives the trained replies the adapter gives on its 4-bit base."""
    (tmp_path / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    recipe = demo_recipe(
        base,
        tmp_path / "run",
        data=str(tmp_path / "data.json"),
        num_epochs=60,
        lora_r=8,
        logging_steps=10,
        quantization="nf4",
    )
    result = train(recipe)
    m = result.metrics
    assert m["last_loss"] < 0.3 * m["first_loss"], m
    run = json.loads((result.output_dir / "loraforge.json").read_text())
    recorded = run["base_model"]["quantization"]
    assert recorded["method"] == "nf4" and recorded["double_quant"] is True
    assert recorded["compute_dtype"] == "float32"

    on_4bit = load_for_inference(result.output_dir, device="cpu", quantization="nf4")
    assert quant.model_quantization(on_4bit.model) == "nf4"
    merged = load_for_inference(result.output_dir, device="cpu", merge=True)
    assert quant.model_quantization(merged.model) == "none"
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    replies = [on_4bit.chat(rec["instruction"]) for rec in RECORDS]
    learned = sum(reply == rec["output"] for reply, rec in zip(replies, RECORDS, strict=True))
    assert learned >= 6, replies  # the trained answers, on the base it was trained on
    same = [merged.chat(rec["instruction"]) == r for rec, r in zip(RECORDS, replies, strict=True)]
    # the 16-bit weights differ from the NF4 ones the adapter was trained on by the quantization
    # error; on this tiny random model that flips at most one of the eight greedy replies
    assert sum(same) >= 7, same

    with pytest.raises(ModelError, match="16-bit base weights only"):
        load_for_inference(result.output_dir, device="cpu", merge=True, quantization="nf4")
    with pytest.raises(ModelError, match="16-bit base weights only"):
        on_4bit.merge_and_save(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    out = merged.merge_and_save(tmp_path / "merged16")
    assert (out / "model.safetensors").is_file()


def test_a_given_model_must_match_the_recipe(tmp_path, base):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    recipe = demo_recipe(
        base, tmp_path / "run", data=str(tmp_path / "data.json"), quantization="nf4", max_steps=1
    )
    from loraforge.tiny import build_tiny_tokenizer

    plain = load_model(str(base), dtype=torch.float32)
    with pytest.raises(ModelError, match="no linear layer of the model is quantized"):
        train(recipe, model=plain, tokenizer=build_tiny_tokenizer())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_functions_on_nf4_equal_peft_qlora_in_bf16_on_gpu(base):
    """The GPU twin: NF4 computing in bfloat16 under the Trainer's bf16 autocast, against PEFT's
    ``lora.bnb.Linear4bit`` forward and backward."""
    from loraforge.fast.equivalence import relative_error

    model = qlora_model(base, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    want_loss, want = loss_and_grads(model, ids, autocast=torch.bfloat16)
    report = apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    assert report.fused_layers == 8 and report.fused_mlps == 2, report.summary()
    assert all(c.passed for c in report.checks), [c.describe() for c in report.checks]
    got_loss, got = loss_and_grads(model, ids, autocast=torch.bfloat16)
    assert abs(got_loss.item() - want_loss.item()) < 1e-2 * abs(want_loss.item())
    errors = {name: relative_error(got[name], want[name]) for name in want}
    assert max(errors.values()) < 3e-2, errors
    assert not report.fallback_calls


def _quantized(shape, nested: bool, dtype=torch.bfloat16, device: str = "cpu"):
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)
    return bnbf.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=nested, quant_storage=torch.uint8
    )


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_arithmetic_of_the_kernel_equals_bitsandbytes(nested):
    """The arithmetic loraforge's dequantization kernel does (written here in torch), bit for bit
    equal to bitsandbytes' dequantize_4bit: high nibble first, scales code2[q] * absmax2 + offset
    in float32 (two roundings), then nf4[nibble] * scale rounded once to the dtype."""
    import bitsandbytes.functional as bnbf

    packed, state = _quantized((96, 640), nested)
    b = packed.view(-1).to(torch.int64)
    if nested:
        s2 = state.state2
        scale2 = s2.absmax.repeat_interleave(s2.blocksize)[: state.absmax.numel()]
        scale = s2.code[state.absmax.to(torch.int64)] * scale2 + state.offset
    else:
        scale = state.absmax
    values = torch.stack([state.code[b >> 4], state.code[b & 15]], dim=1).reshape(-1)
    ours = (values * scale.repeat_interleave(64)).to(state.dtype).view(state.shape)
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


def test_nf4_dequantize_off_the_gpu_is_bitsandbytes():
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    packed, state = _quantized((64, 128), nested=True)
    assert not nf4.kernel_available(torch.device("cpu"))
    want = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(nf4.dequantize(packed, state, torch.bfloat16), want)
    # another dtype than the state's: bitsandbytes' result, cast
    got = nf4.dequantize(packed, state, torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state).float())


def test_nf4_kernel_takes_only_the_layout_it_was_checked_on():
    """What the one-kernel dequantization covers (else bitsandbytes' function runs): NF4 in
    blocks of 64 packed in contiguous uint8, dequantized to the state's dtype."""
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def quantized(**kw):
        args = {"blocksize": 64, "quant_type": "nf4", "compress_statistics": True}
        return bnbf.quantize_4bit(w, quant_storage=kw.pop("storage", torch.uint8), **{**args, **kw})

    packed, state = quantized()
    assert nf4.layout_fits(packed, state, torch.bfloat16)
    assert nf4.layout_fits(*quantized(compress_statistics=False), torch.bfloat16)
    assert not nf4.layout_fits(packed, state, torch.float16)  # another dtype than the state's
    assert not nf4.layout_fits(*quantized(quant_type="fp4"), torch.bfloat16)
    assert not nf4.layout_fits(*quantized(blocksize=128), torch.bfloat16)
    assert not nf4.layout_fits(*quantized(storage=torch.bfloat16), torch.bfloat16)
    strided = torch.empty(packed.numel() * 2, 1, dtype=torch.uint8)[::2]
    strided.copy_(packed)
    assert not strided.is_contiguous() and not nf4.layout_fits(strided, state, torch.bfloat16)
    assert not nf4._fits(packed, state, torch.bfloat16)  # not on a CUDA device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_kernel_equals_bitsandbytes_on_phi4_shapes(nested, dtype):
    """loraforge's one-kernel dequantization on the GPU, on each of Phi-4's four weight shapes,
    bit for bit equal to bitsandbytes' dequantize_4bit (and it is the one used)."""
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    assert nf4.kernel_available(torch.device("cuda", torch.cuda.current_device()))
    for shape in [(7680, 5120), (5120, 5120), (35840, 5120), (5120, 17920)]:
        packed, state = _quantized(shape, nested, dtype=dtype, device="cuda")
        assert nf4._fits(packed, state, dtype)
        want = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(nf4.dequantize(packed, state, dtype), want)
