"""GPU checks of the fast path (skipped without CUDA; run on an H100/H200 and noted in the docs).

bf16 equivalence of the packed fast path (varlen attention, lean LoRA functions, chunked
supervised-only loss, Liger where the lean functions leave something to it) with the plain
unpacked path; the numeric check of the lean functions passing on the GPU; the Triton kernels; a
short training run whose loss matches.
"""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _phi4_like(tokenizer, layers: int = 2):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
        use_cache=False,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).to("cuda", torch.bfloat16)


def _examples(tokenizer, n: int):
    from loraforge import SFTDatasetBuilder
    from loraforge.tiny import sample_data_path

    records = json.loads(sample_data_path().read_text(encoding="utf-8"))[:n]
    ds = SFTDatasetBuilder(tokenizer, system_prompt="sys").build(records)
    return [
        {"input_ids": list(a), "labels": list(b)}
        for a, b in zip(ds["input_ids"], ds["labels"], strict=True)
    ]


def _with_lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=dropout,
            task_type="CAUSAL_LM",
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
    )
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fast_path_matches_plain_path_in_bf16(capsys):
    from loraforge.fast.attention import register_varlen_attention, set_attention
    from loraforge.fast.liger import apply_liger, liger_available
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.fast.losses import detached_head, packed_loss
    from loraforge.fast.packing import PackedCollator
    from loraforge.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    examples = _examples(tok, 24)
    base = _phi4_like(tok)
    fast_base = copy.deepcopy(base)
    if liger_available():
        assert apply_liger(fast_base, skip_lean=True) == []  # the lean functions take it all
    set_attention(fast_base, register_varlen_attention())
    plain, fast = _with_lora(base), _with_lora(fast_base)
    fast.load_state_dict(plain.state_dict())
    report = apply_lean_functions(fast, autocast_dtype=torch.bfloat16)
    assert (report.fused_layers, report.fused_mlps, report.lean_norms) == (8, 2, 5)
    assert all(c.passed for c in report.checks), [c.describe() for c in report.checks]
    total = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    loss_plain = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)  # as Trainer(bf16=True) runs
    for e in examples:
        with autocast:
            out = plain(
                input_ids=torch.tensor([e["input_ids"]], device="cuda"),
                labels=torch.tensor([e["labels"]], device="cuda"),
                num_items_in_batch=torch.tensor(total, device="cuda"),
            )
        out.loss.backward()
        loss_plain += out.loss.item()
    batch = PackedCollator(tok.pad_token_id)([examples])
    labels = batch.pop("labels").cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    head = fast.get_output_embeddings()
    with autocast:  # as train() runs it: lm_head detached, applied by the chunked loss
        with detached_head(fast):
            out = fast(**batch)
        loss_fast = packed_loss(out, labels, torch.tensor(total, device="cuda"), lm_head=head)
    loss_fast.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    errs = [_rel(p.grad, grads[n]) for n, p in fast.named_parameters() if p.requires_grad]
    loss_err = abs(loss_fast.item() - loss_plain) / loss_plain
    with capsys.disabled():
        print(
            f"\nbf16 fast vs plain: loss rel err {loss_err:.2e}, LoRA grad rel err "
            f"median {sorted(errs)[len(errs) // 2]:.2e} max {max(errs):.2e} "
            f"(liger {'on' if liger_available() else 'off'})"
        )
    assert loss_err < 1e-2
    assert max(errs) < 5e-2
    assert not report.fallback_calls


def test_numeric_check_passes_with_the_triton_kernels(capsys):
    """The start-of-training check on a Phi-4-shaped layer stack in bf16 with dropout, under
    autocast, against PEFT's forward: every kind passes, with the Triton kernels."""
    from loraforge.fast import kernels
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.tiny import build_tiny_tokenizer

    assert kernels.triton_kernels() is not None, "triton kernels did not build"
    model = _with_lora(_phi4_like(build_tiny_tokenizer()), dropout=0.1)
    report = apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    with capsys.disabled():
        print()
        for c in report.checks:
            print(f"{c.kind}: {c.describe()}; dropout {c.dropout_sigmas}")
    assert all(c.passed for c in report.checks)
    assert (report.fused_layers, report.fused_mlps, report.lean_norms) == (8, 2, 5)


def test_triton_kernels_match_torch_in_bf16():
    from loraforge.fast import kernels

    assert kernels.triton_kernels() is not None, "triton kernels did not build"
    torch.manual_seed(0)
    gu = torch.randn(3000, 2 * 1792, device="cuda", dtype=torch.bfloat16) * 3
    g = torch.randn(3000, 1792, device="cuda", dtype=torch.bfloat16)
    ref = gu.float().requires_grad_()
    gate, up = ref.chunk(2, dim=-1)
    out = torch.nn.functional.silu(gate) * up
    out.backward(g.float())
    assert _rel(kernels.swiglu(gu), out) < 5e-3
    assert _rel(kernels.swiglu_backward(gu, g), ref.grad) < 5e-3
    # dropout: one pass, the same mask as dropout_mask, kept with probability 1 - p; the mask's
    # bits give it back exactly
    mask = kernels.dropout_mask(gu, 0.1, seed=7)
    assert abs(mask.float().mean().item() - 0.9) < 2e-3
    by_position = mask.flatten().view(-1, 8).float().mean(0)  # the 8 elements of one Philox draw
    assert (by_position - 0.9).abs().max().item() < 5e-3, by_position
    dropped, bits = kernels.drop(gu, 0.1, seed=7)
    assert torch.equal(dropped, gu * mask)
    assert bits is not None and bits.numel() == gu.numel() // 8
    assert torch.equal(kernels.keep(g.repeat(1, 2), 0.1, 7, bits), g.repeat(1, 2) * mask)
    assert torch.equal(kernels.keep(gu, 0.1, seed=7), gu * mask)  # drawn again from the seed
    assert not torch.equal(mask, kernels.dropout_mask(gu, 0.1, seed=8))
    inplace = gu.clone()
    kernels.keep(inplace, 0.1, 7, bits, inplace=True)
    assert torch.equal(inplace, gu * mask)
    # the backward's SwiGLU and mask in one kernel (Phi-4's MLP width, a seed drawn on the
    # device): bit for bit the SwiGLU kernel's output after the dropout kernel
    wide = torch.randn(1024, 2 * 17920, device="cuda", dtype=torch.bfloat16) * 3
    seed = torch.randint(0, 2**62, (1,), device="cuda")
    want, wide_bits = kernels.drop(kernels.swiglu(wide), 0.1, seed)
    assert torch.equal(kernels.swiglu_keep(wide, 0.1, seed, wide_bits), want)
    # RMSNorm: Phi-3's norm, and the input gradient from the output, against float32 autograd
    # (not Phi3RMSNorm itself: once Liger has patched transformers, that name is Liger's norm,
    # whose backward overwrites the incoming gradient in place)
    w = torch.empty(5120, device="cuda").uniform_(0.2, 2.0).to(torch.bfloat16)
    x = (torch.randn(2048, 5120, device="cuda") * 3).to(torch.bfloat16)
    dy = torch.randn(2048, 5120, device="cuda", dtype=torch.bfloat16)
    xr = x.float().requires_grad_()
    y_ref = w.float() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5))
    y_ref.backward(dy.float())
    y, rstd = kernels.rms_norm(x, w, 1e-5)
    assert _rel(y, y_ref) < 5e-3
    dx = kernels.rms_norm_backward_from_output(dy, y, w, rstd)
    assert _rel(dx, xr.grad) < 1e-2


def _rounded_once(got: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> bool:
    """``got`` is ``u @ w`` summed exactly and rounded once to its 16-bit type, up to the order of
    the terms (near zero the roundings of two orders differ by more than a unit of the result,
    not of the terms' size)."""
    exact = u.double().mm(w.double())
    scale = u.double().abs().mm(w.double().abs())  # the terms' size: the rounding's scale
    unit = 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-11
    return got.shape == exact.shape and bool(
        ((got.double() - exact).abs() <= scale * unit + 1e-6).all()
    )


def test_lowrank_kernel_on_phi4_shapes():
    """The wide rank-r products of Phi-4's LoRA layers at 1,024 tokens
    (``loraforge.fast.lowrank.up``), as the lean functions call them: z B^T of gate_up_proj, and
    keep(gz A) of down_proj's input from the dropout mask's bits, each within a rounding of the
    exact product (cuBLAS's within the same bound), the masked one exactly the mask kernel on the
    unmasked one; other ranks and float16; where torch's product runs instead, and that it is
    the same there; malformed mask bits refused."""
    from loraforge.fast import kernels, lowrank

    assert lowrank.kernel_available(torch.device("cuda")), "the kernel failed its check"
    torch.manual_seed(0)
    seed = torch.randint(0, 2**62, (1,), device="cuda")
    z = torch.randn(1024, 8, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(35840, 8, device="cuda", dtype=torch.bfloat16)
    assert lowrank._fits(z, b.t(), None), "z B^T would not take the kernel"
    got = lowrank.up(z, b.t())
    assert got.is_contiguous() and _rounded_once(got, z, b.t())
    assert _rounded_once(z.mm(b.t()), z, b.t())  # cuBLAS's, by the same measure
    a = torch.randn(8, 17920, device="cuda", dtype=torch.bfloat16)
    _, bits = kernels.drop(torch.ones(1024, 17920, device="cuda", dtype=torch.bfloat16), 0.1, seed)
    assert bits is not None and lowrank._fits(z, a, bits)
    plain = lowrank.up(z, a)
    assert _rounded_once(plain, z, a)
    assert torch.equal(lowrank.up(z, a, bits), kernels.keep(plain, 0.1, seed, bits))
    for dtype in (torch.bfloat16, torch.float16):
        for rank in (5, 16, 32, 64):
            u = torch.randn(300, rank, device="cuda", dtype=dtype)
            w = torch.randn(rank, 1000, device="cuda", dtype=dtype)
            assert lowrank._fits(u, w, None) and _rounded_once(lowrank.up(u, w), u, w)
    # torch's product instead: float32 (the kernel would round to TF32), a rank over 64, a
    # masked width that is not whole bytes (then the mask kernel applies the same bits), no rows
    assert not lowrank._fits(z.float(), a.float(), None)
    exact32 = z.double().mm(a.double())
    assert (lowrank.up(z.float(), a.float()).double() - exact32).abs().max() < 1e-3
    wide = torch.randn(1024, 65, device="cuda", dtype=torch.bfloat16)
    assert not lowrank._fits(wide, torch.randn(65, 64, device="cuda", dtype=torch.bfloat16), None)
    ragged = a[:, :17915]
    _, ragged_bits = kernels.drop(torch.ones(1024, 17915, device="cuda"), 0.1, seed)
    assert ragged_bits is not None and not lowrank._fits(z, ragged, ragged_bits)
    want = kernels.keep(z.mm(ragged), 0.1, seed, ragged_bits)
    assert torch.equal(lowrank.up(z, ragged, ragged_bits), want)
    assert not lowrank._fits(z[:0], a, None)
    assert lowrank.up(z[:0], a).shape == (0, 17920)
    with pytest.raises(ValueError, match="mask bits"):
        lowrank.up(z, a, bits[:-1])
    with pytest.raises(ValueError, match="mask bits"):
        lowrank.up(z, a, bits.to(torch.int8))
    # one check per device, however the device is named
    lowrank.kernel_available(torch.device("cuda", torch.cuda.current_device()))
    assert lowrank._checked.cache_info().currsize == 1


def test_lean_lora_matches_peft_with_dropout_in_bf16(monkeypatch, capsys):
    """The lean LoRA functions (dropout 0.1, masks drawn on the GPU from seeds) against PEFT's
    forward drawing the same masks, under autocast as the Trainer runs."""
    import itertools

    from loraforge.fast import lora_ops
    from loraforge.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    plain = _with_lora(_phi4_like(tok), dropout=0.1)
    fast = copy.deepcopy(plain)
    assert lora_ops.fuse_lora_forward(fast, autocast_dtype=torch.bfloat16).fused_layers == 8
    ref_seeds, seeds = itertools.count(1), itertools.count(1)

    class Seeded(torch.nn.Module):
        def forward(self, x):
            x2 = x.reshape(-1, x.shape[-1])
            mask = lora_ops.dropout_mask(x2, 0.1, next(ref_seeds))
            return (x2 * mask / 0.9).view(x.shape)

    for m in plain.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = Seeded()
    monkeypatch.setattr(lora_ops, "new_seed", lambda device=None: next(seeds))
    ids = torch.randint(0, len(tok), (1, 2048), device="cuda")
    losses = []
    for model in (plain, fast):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    errs = [_rel(p.grad, grads[n]) for n, p in fast.named_parameters() if p.requires_grad]
    with capsys.disabled():
        print(
            f"\nbf16 lean LoRA vs PEFT (dropout 0.1, same masks): loss {losses[1]:.5f} vs "
            f"{losses[0]:.5f}; grad rel err median {sorted(errs)[len(errs) // 2]:.2e} "
            f"max {max(errs):.2e}"
        )
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2
    assert max(errs) < 5e-2


@pytest.mark.integration
def test_short_training_run_matches_plain_path(tmp_path, capsys):
    """Same data, epochs and learning rate; packed fast path vs unpacked plain path in bf16: the
    final training losses agree."""
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base", hidden_size=256)
    losses = {}
    for packing in ("off", "on"):
        recipe = demo_recipe(
            base,
            tmp_path / packing,
            packing=packing,
            pack_tokens=512 if packing == "on" else None,
            dtype="bfloat16",
            num_epochs=20,
            batch_size=8 if packing == "off" else None,
            learning_rate=5e-3,
            logging_steps=1,
        )
        res = train(recipe)
        losses[packing] = [h["loss"] for h in res.log_history if "loss" in h]
    with capsys.disabled():
        print(
            f"\nplain: {losses['off'][0]:.3f} -> {losses['off'][-1]:.3f} in {len(losses['off'])} steps; "
            f"packed: {losses['on'][0]:.3f} -> {losses['on'][-1]:.3f} in {len(losses['on'])} steps"
        )
    assert losses["on"][0] == pytest.approx(losses["off"][0], rel=0.05)
    assert losses["on"][-1] < 0.5 * losses["on"][0]
    assert losses["on"][-1] == pytest.approx(losses["off"][-1], rel=0.35, abs=0.15)


# --------------------------------------------------------------------------- LoRA variants
# Written for the GPU but not yet run on one (no device time in the session that added them).


def _with_variant(model, **variant):
    from peft import get_peft_model

    from loraforge import LoraRecipe
    from loraforge.variants import lora_config

    recipe = LoraRecipe(model="m", data="d", lora_dropout=0.0, **variant)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    model = get_peft_model(model, lora_config(recipe, targets))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n and not variant.get("lora_init"):
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@pytest.mark.parametrize(
    "variant", [{"use_rslora": True}, {"lora_init": "pissa"}, {"lora_init": "olora"}]
)
def test_variants_on_the_lean_functions_match_peft_in_bf16(variant, capsys):
    """rsLoRA (another scaling), PiSSA and OLoRA (other starting weights) run the lean functions:
    the start-of-training check passes and loss and gradients match PEFT's forward in bf16."""
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    plain = _with_variant(_phi4_like(tok), **variant)
    fast = copy.deepcopy(plain)
    report = apply_lean_functions(fast, autocast_dtype=torch.bfloat16)
    assert (report.fused_layers, report.fused_mlps) == (8, 2), report.summary()
    assert all(c.passed for c in report.checks), [c.describe() for c in report.checks]
    ids = torch.randint(0, len(tok), (1, 2048), device="cuda")
    losses = []
    for model in (plain, fast):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    errs = [_rel(p.grad, grads[n]) for n, p in fast.named_parameters() if p.requires_grad]
    with capsys.disabled():
        print(
            f"\n{variant}: loss {losses[1]:.5f} vs {losses[0]:.5f}; grad rel err max {max(errs):.2e}"
        )
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-2
    assert max(errs) < 5e-2


def test_dora_falls_back_to_peft_visibly_on_the_gpu(caplog):
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.tiny import build_tiny_tokenizer

    model = _with_variant(_phi4_like(build_tiny_tokenizer()), use_dora=True)
    with caplog.at_level("INFO", logger="loraforge"):
        report = apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    assert report.fused_layers == 0 and set(report.layers.values()) == {"DoRA"}
    assert "PEFT forward for 8" in caplog.text and "(DoRA)" in caplog.text
    assert report.lean_norms == 5  # the norms still take the lean path


@pytest.mark.integration
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"lora_init": "pissa"}])
def test_variant_trains_on_the_packed_path(variant, tmp_path):
    """A packed bf16 run per variant learns, and its saved adapter loads in plain PEFT on the
    original base (the CPU tests compare the logits exactly)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base", hidden_size=256)
    recipe = demo_recipe(
        base,
        tmp_path / "run",
        packing="on",
        pack_tokens=512,
        dtype="bfloat16",
        num_epochs=20,
        learning_rate=5e-3,
        logging_steps=1,
        **variant,
    )
    res = train(recipe)
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(model, str(res.output_dir)).eval()
    ids = torch.randint(3, 200, (1, 32), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_cuda_graphs_train_the_same_steps(tmp_path, caplog, capsys, monkeypatch, quantization):
    """``cuda_graphs: on``, dropout 0: the decoder layers are captured once and replayed, and
    every step's loss and the final adapter equal those of the same padded rows run eagerly
    (the dispatch turned off), and stay close to ``cuda_graphs: off`` (unpadded rows; bf16, and
    an NF4 base)."""
    from safetensors.torch import load_file

    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base
    from loraforge.fast.graphs import LayerGraphs

    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    base = prepare_tiny_base(tmp_path / "base", hidden_size=256)
    losses, adapters = {}, {}
    for run in ("off", "padded-eager", "on"):
        caplog.clear()
        recipe = demo_recipe(
            base,
            tmp_path / run,
            packing="on",
            pack_tokens=512,
            dtype="bfloat16",
            max_steps=8,
            logging_steps=1,
            cuda_graphs="off" if run == "off" else "on",
            quantization=quantization,
        )
        with monkeypatch.context() as m:
            if run == "padded-eager":
                m.setattr(LayerGraphs, "_call", lambda self, *a: None)
            with caplog.at_level(logging.INFO, logger="loraforge"):
                res = train(recipe)
        log = caplog.text
        assert ("decoder layers captured as one graph" in log) == (run == "on"), log[-3000:]
        if run == "on":  # every step replayed, none fell back
            assert res.metrics["cuda_graphs"] == "captured; 8 steps replayed", log[-3000:]
            # the float32 adapters (4 projections x A, B of each layer) cast at once per pass
            assert re.search(r"each pass casts [1-9]\d* adapter weights and draws 0 ", log), log
        losses[run] = [h["loss"] for h in res.log_history if "loss" in h]
        adapters[run] = load_file(str(res.output_dir / "adapter_model.safetensors"))
    with capsys.disabled():
        for run, values in losses.items():
            print(f"\n[{quantization}] {run}: {[round(v, 5) for v in values]}")
    assert len(losses["on"]) == len(losses["padded-eager"]) == len(losses["off"]) == 8
    assert losses["on"] == pytest.approx(losses["padded-eager"], rel=1e-4, abs=1e-5)
    for name, w in adapters["padded-eager"].items():
        assert _rel(adapters["on"][name], w) < 1e-3, name
    assert losses["on"] == pytest.approx(losses["off"], rel=0.05)


def test_cuda_graphs_with_dropout_capture_and_learn(tmp_path, capsys, caplog):
    """``lora_dropout: 0.1`` (the default recipe's): the capture takes the dropout kernel's
    device-seed variant (compiled in the warm-up), every step replays, and the adapter learns as
    the eager run does (the masks differ, so the losses are compared loosely)."""
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base", hidden_size=256)
    losses = {}
    caplog.set_level(logging.INFO, logger="loraforge")
    for graphs in ("off", "on"):
        recipe = demo_recipe(
            base,
            tmp_path / graphs,
            packing="on",
            pack_tokens=512,
            dtype="bfloat16",
            lora_dropout=0.1,
            max_steps=20,
            logging_steps=1,
            cuda_graphs=graphs,
        )
        res = train(recipe)
        if graphs == "on":
            assert res.metrics["cuda_graphs"] == "captured; 20 steps replayed"
            # each pass draws all its dropout seeds (4 a layer) in one draw
            assert re.search(r"and draws [1-9]\d* dropout seeds at once", caplog.text)
        losses[graphs] = [h["loss"] for h in res.log_history if "loss" in h]
    with capsys.disabled():
        print(f"\ndropout 0.1: eager {losses['off'][::5]}; graphs {losses['on'][::5]}")
    assert losses["on"][-1] < 0.7 * losses["on"][0]
    assert losses["on"][-1] == pytest.approx(losses["off"][-1], rel=0.25)


def test_graphed_nf4_steps_with_recomputed_mlps_and_host_embeddings_train_the_same(
    tmp_path, caplog, capsys, monkeypatch
):
    """A 4-bit base with the layers graphed: with every MLP recomputing its gate_up output and
    the input embeddings in host memory (the plan forced so), every step's loss and the adapter
    equal the run without either (flash attention's backward adds in no fixed order, hence the
    tolerance). Dropout 0, as the NF4 case of ``test_cuda_graphs_train_the_same_steps``: with
    dropout 0.1 this test's first (plain) run failed its capture on an H200 under pytest
    (session 13), while the same recipe captured in a plain Python process; the CPU tests check
    the recomputation with dropout bit for bit."""
    import dataclasses

    from safetensors.torch import load_file

    import loraforge.training.steps as steps
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    pytest.importorskip("bitsandbytes")
    base = prepare_tiny_base(tmp_path / "base", hidden_size=256)
    real = steps.plan_fast_path
    losses, adapters = {}, {}
    for run in ("keep", "recompute"):
        caplog.clear()
        recipe = demo_recipe(
            base, tmp_path / run, packing="on", pack_tokens=512, dtype="bfloat16",
            max_steps=8, logging_steps=1, cuda_graphs="on", quantization="nf4",
        )  # fmt: skip
        with monkeypatch.context() as m:
            if run == "recompute":
                m.setattr(
                    steps,
                    "plan_fast_path",
                    lambda *a, **k: dataclasses.replace(
                        real(*a, **k), recompute_mlps=2, host_embeddings=True
                    ),
                )
            with caplog.at_level(logging.INFO, logger="loraforge"):
                res = train(recipe)
        log = caplog.text
        assert res.metrics["cuda_graphs"] == "captured; 8 steps replayed", log[-3000:]
        if run == "recompute":
            assert "MLPs: 2 recompute their gate_up output" in log, log[-3000:]
            assert "input embeddings: in host memory for the fit" in log
        losses[run] = [h["loss"] for h in res.log_history if "loss" in h]
        adapters[run] = load_file(str(res.output_dir / "adapter_model.safetensors"))
    with capsys.disabled():
        for run, values in losses.items():
            print(f"\n[nf4] {run}: {[round(v, 5) for v in values]}")
    assert len(losses["keep"]) == len(losses["recompute"]) == 8
    assert losses["recompute"] == pytest.approx(losses["keep"], rel=1e-4, abs=1e-5)
    for name, w in adapters["keep"].items():
        assert _rel(adapters["recompute"][name], w) < 1e-3, name
