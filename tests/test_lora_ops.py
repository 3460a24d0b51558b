"""The lean LoRA functions and norms: equal to PEFT's forward, used only where admitted by the
allow-list and proven by the numeric check, and nothing process-wide (Liger included)."""

from __future__ import annotations

import copy
import itertools
import logging
import sys
import types

import pytest
import torch

from loraforge import RecipeError
from loraforge.fast import equivalence, fusion, lora_ops, lowrank
from loraforge.fast.kernels import swiglu_backward
from loraforge.fast.lora_ops import (
    apply_lean_functions,
    dropout_mask,
    fuse_lora_forward,
    lean_norms,
    remove_lean_functions,
    swiglu,
)
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer

TOK = build_tiny_tokenizer()
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
IDS = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))


def _lora(dropout: float, dtype: torch.dtype = torch.float32, **config):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(TOK).to(dtype)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=dropout,
            task_type="CAUSAL_LM",
            target_modules=TARGETS,
            **config,
        ),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _layers(model):
    return model.base_model.model.model.layers


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(plain, fused, ids=IDS, rtol=1e-5):
    a = plain(input_ids=ids, labels=ids).loss
    a.backward()
    b = fused(input_ids=ids, labels=ids).loss
    b.backward()
    torch.testing.assert_close(b, a, rtol=rtol, atol=0)
    ref = _grads(plain)
    for n, g in _grads(fused).items():
        torch.testing.assert_close(g, ref[n], rtol=rtol, atol=rtol * ref[n].abs().max().item())


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- equal to PEFT


def test_lean_lora_equals_peft_in_float32():
    plain = _lora(0.0)
    fused = copy.deepcopy(plain)
    report = fuse_lora_forward(fused)
    assert (report.fused_layers, len(report.layers)) == (8, 8)  # 4 module types x 2 layers
    assert report.fused_mlps == 2  # gate_up_proj -> SwiGLU -> down_proj run as one function
    assert report.norms == {}  # the LoRA half only
    _assert_same(plain, fused)


def _random_norm_weights(model) -> None:
    """Norm weights away from 1 (and some negative), so ``output / weight`` is exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                sign = torch.where(torch.rand(p.shape, generator=gen) < 0.2, -1.0, 1.0)
                p.copy_(sign * (0.3 + 1.5 * torch.rand(p.shape, generator=gen)))


def test_lean_norms_equal_the_model_norms_in_float32():
    """Norms that keep their output instead of their input: same loss and LoRA gradients."""
    plain = _lora(0.0)
    _random_norm_weights(plain)
    fused = copy.deepcopy(plain)
    fuse_lora_forward(fused)
    assert lean_norms(fused).lean_norms == 5  # two per decoder layer and the final norm
    _assert_same(plain, fused)


def test_lean_norm_gradient_equals_autograd_through_phi3_norm():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    norm = Phi3RMSNorm(96, eps=1e-5)
    _random_norm_weights(norm)
    norm.weight.requires_grad_(False)
    lean = copy.deepcopy(norm)
    assert lean_norms(lean).lean_norms == 1
    x = (torch.randn(3, 50, 96) * 4).requires_grad_()
    g = torch.randn(3, 50, 96)
    ref = norm(x)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    out = lean(x)
    (dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


class _SeededDropout(torch.nn.Module):
    """PEFT's dropout, drawing its mask the way the lean functions do."""

    def __init__(self, p: float, seeds) -> None:
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 * dropout_mask(x2, self.p, next(self.seeds)) / (1 - self.p)).view(x.shape)


def test_lean_lora_equals_peft_with_the_same_dropout_masks(monkeypatch):
    """Dropout 0.1: with PEFT's dropout drawing the same masks (same seeds, same order), loss and
    gradients agree; the lean backward redraws each mask from its seed."""
    plain = _lora(0.1)
    fused = copy.deepcopy(plain)
    fuse_lora_forward(fused)
    ref_seeds = itertools.count(1000)
    for m in plain.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = _SeededDropout(0.1, ref_seeds)
    seeds = itertools.count(1000)
    monkeypatch.setattr(lora_ops, "new_seed", lambda device=None: next(seeds))
    _assert_same(plain, fused)
    assert next(seeds) == next(ref_seeds) == 1008  # one mask per adapted layer


def _saved_bytes(module, x) -> int:
    """Bytes autograd keeps for the backward pass of ``module(x)`` (distinct storages, parameters
    and the input itself excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(seen.values())


def test_lean_lora_keeps_less_for_the_backward_pass():
    """The SwiGLU MLP keeps its gate_up output and nothing else beyond its input (PEFT also keeps
    two dropped copies, two masks and the activation); an adapted linear keeps no dropped copy."""
    plain = _lora(0.1)
    fused = copy.deepcopy(plain)
    fuse_lora_forward(fused)
    hidden = plain.config.hidden_size
    x = torch.randn(1, 256, hidden, requires_grad=True)
    mlp, ref_mlp = _layers(fused)[0].mlp, _layers(plain)[0].mlp
    gate_up_out = 256 * 2 * plain.config.intermediate_size * 4
    kept, ref = _saved_bytes(mlp, x), _saved_bytes(ref_mlp, x)
    assert kept <= gate_up_out + 2 * 256 * 8 * 4 < 0.45 * ref, (kept, ref)
    o, ref_o = _layers(fused)[0].self_attn.o_proj, _layers(plain)[0].self_attn.o_proj
    kept, ref = _saved_bytes(o, x), _saved_bytes(ref_o, x)
    assert kept == 256 * 8 * 4 < ref, (kept, ref)  # the rank-r product only: x is the input


def test_lean_norms_keep_the_output_the_next_layer_keeps_anyway():
    """In a decoder layer each norm's output is the adapted projection's input, kept once, and
    the norm's input is not kept: one hidden-sized tensor less per norm. Here that shows for the
    second norm; the first one's input is the layer's input, which the count leaves out (in a
    model it is the previous layer's output, then freed as well)."""
    plain = _lora(0.1)
    fuse_lora_forward(plain)
    fused = copy.deepcopy(plain)
    lean_norms(fused)
    hidden, tokens = plain.config.hidden_size, 256
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    pos = torch.arange(tokens)[None]

    def layer_of(model):
        layer = _layers(model)[0]
        rope = model.base_model.model.model.rotary_emb
        emb = rope(x, pos)
        return lambda h: layer(h, position_embeddings=emb, position_ids=pos)

    class Wrap(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.f = model, layer_of(model)

        def forward(self, h):
            out = self.f(h)
            return out[0] if isinstance(out, tuple) else out

    kept, ref = _saved_bytes(Wrap(fused), x), _saved_bytes(Wrap(plain), x)
    assert ref - kept == tokens * hidden * 4, (kept, ref)


def test_lean_lora_dropout_survives_checkpoint_recomputation():
    """A checkpointed layer runs its forward again in the backward pass: the dropout seeds come from
    torch's CPU generator, which checkpointing restores, so the masks are the same."""
    from loraforge.models import enable_checkpointing

    fused = _lora(0.1)
    fuse_lora_forward(fused)
    ckpt = copy.deepcopy(fused)
    enable_checkpointing(ckpt.get_base_model())
    torch.manual_seed(7)
    a = fused(input_ids=IDS, labels=IDS).loss
    a.backward()
    torch.manual_seed(7)
    b = ckpt(input_ids=IDS, labels=IDS).loss
    b.backward()
    assert a.item() == b.item()
    ref = _grads(fused)
    for n, g in _grads(ckpt).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-6, atol=1e-9)


def test_dropout_mask_keeps_one_minus_p_and_depends_only_on_the_seed():
    x = torch.empty(1000, 1000)
    m = dropout_mask(x, 0.1, seed=5)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.9) < 0.005
    assert torch.equal(m, dropout_mask(x, 0.1, seed=5))
    assert not torch.equal(m, dropout_mask(x, 0.1, seed=6))


def test_kernels_keep_no_mutable_state_at_module_level():
    """Nothing one caller sets changes what a later caller gets: the module's globals are
    constants, functions and the memoised (functools.cache) kernel build; torch generators are
    made per call."""
    from loraforge.fast import kernels

    mutable = [
        name
        for name, value in vars(kernels).items()
        if not name.startswith("__")
        and isinstance(value, dict | list | set | torch.Generator | bool | type(None))
    ]
    assert mutable == []
    assert hasattr(kernels.triton_kernels, "cache_info")  # functools.cache


def test_swiglu_backward_matches_autograd():
    gu = torch.randn(5, 2 * 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 24, dtype=torch.float64)
    gate, up = gu.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up * g).sum().backward()
    torch.testing.assert_close(swiglu(gu.detach()), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(swiglu_backward(gu.detach(), g), gu.grad)


# --------------------------------------------------------------------------- the allow-list


def _adapters_in(dtype, model):
    for n, p in model.named_parameters():
        if "lora" in n:
            p.data = p.data.to(dtype)
    return model


def test_mixed_dtypes_without_autocast_keep_peft_and_under_autocast_are_fused():
    """bf16 base with PEFT's fp32 adapters: without autocast PEFT computes the adapter in fp32,
    so PEFT's forward runs; admitted for autocast to bf16, the lean functions run and agree."""
    plain = _lora(0.0, torch.bfloat16)
    assert next(p for n, p in plain.named_parameters() if "lora_A" in n).dtype == torch.float32
    fused = copy.deepcopy(plain)
    report = fuse_lora_forward(fused)
    assert report.fused_layers == 0
    assert set(report.layers.values()) == {
        "input bfloat16, base bfloat16, adapter float32/float32 without autocast"
    }
    torch.testing.assert_close(_logits(fused), _logits(plain))
    report = fuse_lora_forward(fused, autocast_dtype=torch.bfloat16)
    assert report.fused_layers == 8 and all(c.passed for c in report.checks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(plain, fused, rtol=3e-2)
    assert not report.fallback_calls
    # a call outside the admitted autocast state runs PEFT's forward, and is counted
    torch.testing.assert_close(_logits(fused), _logits(plain))
    assert report.fallback_calls["qkv_proj: no autocast (installed for bfloat16)"] == 2


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_lora_bias_dora_and_a_trained_base_keep_peft_with_their_reason(caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(TOK),
        LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["qkv_proj", "down_proj"]),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    fused = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="loraforge.fast.fusion"):
        report = fuse_lora_forward(fused)
    assert set(report.layers.values()) == {"lora_bias"}
    assert "fused 0 of 4 LoRA layers; PEFT forward for 4: down_proj x2 (lora_bias), " in caplog.text
    torch.testing.assert_close(_logits(fused), _logits(model))

    dora = _lora(0.0, use_dora=True)
    report = fuse_lora_forward(copy.deepcopy(dora))
    assert set(report.layers.values()) == {"DoRA"}
    assert set(report.mlps.values()) == {"a projection keeps PEFT's forward"}

    plain = _lora(0.0)
    _layers(plain)[0].self_attn.o_proj.base_layer.weight.requires_grad_(True)
    report = fuse_lora_forward(plain)
    assert report.layers["base_model.model.model.layers.0.self_attn.o_proj"] == (
        "trained base weight"
    )
    assert report.fused_layers == 7


def test_anything_peft_adds_later_keeps_peft_forward():
    """An allow-list, not a list of exclusions: an attribute loraforge does not know, a variant
    registered under another name, several active adapters, a hook: PEFT's forward."""
    model = _lora(0.0)
    layers = _layers(model)
    layers[0].self_attn.o_proj.lora_new_feature = {"default": True}  # a PEFT feature of tomorrow
    layers[0].self_attn.qkv_proj.lora_variant["default"] = object()  # a variant, by any name
    layers[1].self_attn.o_proj._adapter_variant = {"default": "x"}
    layers[1].mlp.down_proj.lora_B["default"].register_forward_hook(lambda m, i, o: None)
    layers[1].self_attn.qkv_proj.base_layer._hf_hook = object()  # accelerate's device hook
    report = fuse_lora_forward(model)
    paths = {k.removeprefix("base_model.model.model.layers."): v for k, v in report.layers.items()}
    assert paths == {
        "0.self_attn.qkv_proj": "LoRA variant object",
        "0.self_attn.o_proj": "unknown PEFT attribute 'lora_new_feature'",
        "0.mlp.gate_up_proj": "fused",
        "0.mlp.down_proj": "fused",
        "1.self_attn.qkv_proj": "hooks on base layer",
        "1.self_attn.o_proj": "variant attribute '_adapter_variant'",
        "1.mlp.gate_up_proj": "fused",
        "1.mlp.down_proj": "hooks on lora_B",
    }
    assert list(report.mlps.values()) == ["fused", "a projection keeps PEFT's forward"]

    two = _lora(0.0)
    from peft import LoraConfig

    two.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS))
    two.base_model.set_adapter(["default", "other"])
    assert set(fuse_lora_forward(two).layers.values()) == {"2 active adapters"}


def test_signature_check_recognises_peft_forward():
    from peft.tuners.lora.layer import Linear

    class Other:
        def forward(self, x, adapter_names=None):
            return x

    assert fusion._signature_ok(Linear)
    assert not fusion._signature_ok(Other)


def test_calls_outside_what_was_admitted_run_peft_forward_and_are_counted():
    """adapter_names (PEFT's mixed batches), disabled adapters, a hook added after installation,
    an unfrozen base: PEFT's forward for that call, counted in the report."""
    plain = _lora(0.0).eval()  # PEFT takes adapter_names only in eval mode
    fused = copy.deepcopy(plain)
    report = apply_lean_functions(fused)
    names = ["default", "__base__"]
    with torch.no_grad():
        want = plain(input_ids=IDS, adapter_names=names).logits
        got = fused(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(got, want)
    assert report.fallback_calls["qkv_proj: extra arguments"] == 2
    with plain.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(_logits(fused), _logits(plain))
    assert report.fallback_calls["o_proj: adapters disabled"] == 2
    seen = []
    _layers(fused)[0].self_attn.o_proj.lora_A["default"].register_forward_hook(
        lambda m, i, o: seen.append(o.shape)
    )
    torch.testing.assert_close(_logits(fused), _logits(plain))
    assert seen == [torch.Size([2, 40, 8])]  # PEFT's forward ran, so the hook did
    assert report.fallback_calls["o_proj: hooks added"] == 1


def test_reinstalling_replaces_and_removing_restores_the_class_forwards():
    from peft.tuners.lora.layer import Linear
    from transformers.models.phi3 import modeling_phi3

    classes = (Linear, modeling_phi3.Phi3MLP, modeling_phi3.Phi3RMSNorm)
    before = [dict(vars(c)) for c in classes]
    model = _lora(0.1)
    first = apply_lean_functions(model)
    second = apply_lean_functions(model)
    assert (second.fused_layers, second.fused_mlps, second.lean_norms) == (8, 2, 5)
    assert first.layers == second.layers and first.norms == second.norms
    installed = [
        m for m in model.modules() if isinstance(vars(m).get("forward"), fusion._Installed)
    ]
    assert len(installed) == 15 and all(m.forward.report is second for m in installed)
    assert remove_lean_functions(model) == 15
    assert not any("forward" in vars(m) for m in model.modules())
    assert [dict(vars(c)) for c in classes] == before  # no class was touched


def test_the_check_leaves_the_global_random_state_alone():
    model = _lora(0.1)
    state = torch.get_rng_state()
    report = apply_lean_functions(model)
    assert torch.equal(torch.get_rng_state(), state)
    rates = [c.dropout_sigmas for c in report.checks if c.kind.startswith("LoRA linear")]
    assert len(rates) == 4 and all(s is not None and s < 6 for s in rates)


# --------------------------------------------------------------------------- the numeric check


def test_numeric_check_passes_in_float32_and_bfloat16():
    for dtype, regime in (
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.bfloat16, torch.bfloat16),
    ):
        model = _lora(0.1, dtype)
        if regime is None:
            _adapters_in(dtype, model)
        report = apply_lean_functions(model, autocast_dtype=regime)
        kinds = [c.kind for c in report.checks]
        assert len(kinds) == 6, kinds  # four linear shapes, the MLP, the norm
        assert all(c.passed for c in report.checks), [c.describe() for c in report.checks]
        assert max(c.worst for c in report.checks) < equivalence.TOLERANCES[dtype] / 3
        assert (report.fused_layers, report.fused_mlps, report.lean_norms) == (8, 2, 5)


def test_a_wrong_lean_linear_is_caught_and_peft_forward_runs(monkeypatch, caplog):
    """The lean up-projection made 0.1% wrong: every linear kind fails the check, every layer
    keeps PEFT's forward (and so every MLP), and the model computes exactly what PEFT computes."""
    plain = _lora(0.0)
    fused = copy.deepcopy(plain)
    project = lora_ops._project
    monkeypatch.setattr(lora_ops, "_project", lambda *args: project(*args) * 1.001)
    with caplog.at_level(logging.WARNING):
        report = apply_lean_functions(fused)
    assert set(report.layers.values()) == {"numeric check failed"}
    assert set(report.mlps.values()) == {"a projection keeps PEFT's forward"}
    assert report.lean_norms == 5
    assert "differs from the model's own forward on base_model.model.model.layers.0" in caplog.text
    assert "output: relative error 1.0e-03 > 1.0e-04" in caplog.text
    torch.testing.assert_close(_logits(fused), _logits(plain), rtol=0, atol=0)


def test_a_wrong_gradient_alone_is_caught(monkeypatch):
    plain = _lora(0.0)
    backward = lora_ops._lora_backward

    def wrong(*args):
        gx, ga, gb = backward(*args)
        return gx, None if ga is None else ga * 1.01, gb

    monkeypatch.setattr(lora_ops, "_lora_backward", wrong)
    report = fuse_lora_forward(plain)
    assert report.fused_layers == 0
    failed = [c for c in report.checks if not c.passed]
    assert failed and all(c.errors["output"] == 0 for c in failed)
    assert all("grad lora_A: relative error" in c.describe() for c in failed)


def test_a_wrong_swiglu_is_caught_in_bfloat16_and_only_the_mlps_fall_back(monkeypatch):
    plain = _lora(0.0, torch.bfloat16)
    fused = copy.deepcopy(plain)
    monkeypatch.setattr(lora_ops, "swiglu", lambda gu: swiglu(gu) * 1.1)
    report = apply_lean_functions(fused, autocast_dtype=torch.bfloat16)
    assert (report.fused_layers, report.fused_mlps, report.lean_norms) == (8, 0, 5)
    assert set(report.mlps.values()) == {"numeric check failed"}
    (failed,) = [c for c in report.checks if not c.passed]
    assert failed.kind.startswith("SwiGLU MLP 64->128->64 base bfloat16 adapter float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(plain, fused, rtol=3e-2)


def test_a_wrong_lean_norm_is_caught(monkeypatch):
    model = _lora(0.0)
    norm = lora_ops.rms_norm
    monkeypatch.setattr(lora_ops, "rms_norm", lambda x, w, eps: norm(x, w, eps * 1e4))
    report = lean_norms(model)
    assert set(report.norms.values()) == {"numeric check failed"}
    assert not any(isinstance(vars(m).get("forward"), fusion._LeanNorm) for m in model.modules())


def test_a_dropout_other_than_peft_given_the_same_mask_is_caught(monkeypatch):
    """The lean function drawing another mask than the one PEFT's dropout is given for the check
    (here: half the drop rate) fails it; so does a wrong keep rate on its own."""
    drop = lora_ops.drop
    monkeypatch.setattr(lora_ops, "drop", lambda x, p, seed: drop(x, p / 2, seed))
    report = fuse_lora_forward(_lora(0.1))
    assert report.fused_layers == 0
    assert all(c.dropout_sigmas > 6 for c in report.checks)
    assert all("dropout keep rate" in c.describe() for c in report.checks)


# --------------------------------------------------------------------------- norms


def test_norms_are_identified_by_value_not_by_class_name():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    zero = Phi3RMSNorm(8)
    with torch.no_grad():
        zero.weight[3] = 0.0
    assert lean_norms(zero).norms == {"Phi3RMSNorm": "a zero weight element"}
    trained = Phi3RMSNorm(8)
    assert lean_norms(trained).lean_norms == 1
    x = torch.randn(2, 8)
    trained(x).sum().backward()  # requires_grad: the model's own forward, with a weight gradient
    assert trained.weight.grad is not None

    class GemmaLike(Phi3RMSNorm):  # (1 + weight): output / weight no longer recovers the input
        def forward(self, x):
            return super().forward(x) / self.weight * (1.0 + self.weight)

    class AnyName(torch.nn.Module):  # the Llama norm under a name no list holds
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            xf = x.float()
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))

    (reason,) = lean_norms(GemmaLike(8)).norms.values()
    assert reason.startswith("not the Llama RMSNorm (relative error")
    assert lean_norms(AnyName()).lean_norms == 1
    layer_norm = torch.nn.LayerNorm(8, bias=False)
    assert equivalence.rms_norm_refusal(layer_norm).startswith("not the Llama RMSNorm")


def test_lean_norms_only_where_the_next_layer_keeps_the_output():
    """q_norm/k_norm-like norms feed RoPE, which may overwrite their output in place: left alone.
    The decoder layer's two norms and the final norm are taken."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    attn = torch.nn.Module()
    attn.q_norm, attn.k_norm = Phi3RMSNorm(8), Phi3RMSNorm(8)
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight.requires_grad_(False)
    assert lean_norms(attn).norms == {}
    model = _lora(0.0)
    assert len(lora_ops.lean_norm_candidates(model)) == 5


# --------------------------------------------------------------------------- Liger


def test_apply_liger_without_the_package_is_a_clear_error(monkeypatch):
    from loraforge.fast.liger import apply_liger

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(RecipeError, match=r"liger_kernels: Liger-Kernel cannot be imported"):
        apply_liger(build_tiny_model(TOK))


def _fake_liger(monkeypatch, wrong_norm: bool = False):
    """A stand-in for liger_kernel.transformers with torch versions of its modules."""

    class LigerRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", in_place=True):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.variance_epsilon, self.offset, self.in_place = eps, offset, in_place

        def forward(self, x):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight + (0.5 if wrong_norm else self.offset)) * y.to(x.dtype)

    class LigerPhi3SwiGLUMLP(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            h, i = config.hidden_size, config.intermediate_size
            self.gate_up_proj = torch.nn.Linear(h, 2 * i, bias=False)
            self.down_proj = torch.nn.Linear(i, h, bias=False)

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(torch.nn.functional.silu(gate) * up)

    package = types.ModuleType("liger_kernel")
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerRMSNorm = LigerRMSNorm
    module.LigerPhi3SwiGLUMLP = LigerPhi3SwiGLUMLP
    package.transformers = module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    return module


def test_apply_liger_swaps_this_instances_modules_and_nothing_else(monkeypatch):
    from transformers.models.phi3 import modeling_phi3

    from loraforge.fast.liger import apply_liger

    liger = _fake_liger(monkeypatch)
    transformers_state = dict(vars(modeling_phi3))
    classes = [dict(vars(c)) for c in (modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP)]
    model, other = build_tiny_model(TOK), build_tiny_model(TOK)
    _random_norm_weights(model)
    want = _logits(model)
    assert apply_liger(model) == []  # the default path: lean norms and lean SwiGLU take it all

    weights = [model.model.norm.weight, model.model.layers[0].mlp.gate_up_proj]
    replaced = apply_liger(model, skip_lean=False)
    assert sorted(replaced) == [
        "model.layers.0.input_layernorm",
        "model.layers.0.mlp",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.mlp",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]
    assert type(model.model.norm) is liger.LigerRMSNorm
    assert type(model.model.layers[1].mlp) is liger.LigerPhi3SwiGLUMLP
    assert model.model.norm.weight is weights[0]  # the same parameter, moved in
    assert model.model.layers[0].mlp.gate_up_proj is weights[1]
    torch.testing.assert_close(_logits(model), want)
    # nothing outside this instance: transformers' module and classes, another model
    assert vars(modeling_phi3) == transformers_state
    assert all(vars(modeling_phi3)[k] is v for k, v in transformers_state.items())
    assert [dict(vars(c)) for c in (modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP)] == classes
    assert type(other.model.norm) is modeling_phi3.Phi3RMSNorm

    zero = build_tiny_model(TOK)
    with torch.no_grad():
        zero.model.norm.weight[0] = 0.0  # the lean norm cannot take it: Liger's does
    assert apply_liger(zero) == ["model.norm"]


def test_apply_liger_keeps_a_module_liger_computes_differently(monkeypatch, caplog):
    from loraforge.fast.liger import apply_liger

    _fake_liger(monkeypatch, wrong_norm=True)
    model = build_tiny_model(TOK)
    with caplog.at_level(logging.WARNING, logger="loraforge.fast.liger"):
        replaced = apply_liger(model, skip_lean=False)
    assert replaced == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "LigerRMSNorm 64 torch.float32 (Phi3RMSNorm) differs from the module" in caplog.text
    assert "it would replace on model.norm (output: relative error 5.0e-01" in caplog.text


def test_partial_checkpointing_checkpoints_the_first_layers_and_keeps_the_gradients():
    from loraforge.models import enable_checkpointing

    fused = _lora(0.1)
    lora_ops.fuse_lora_forward(fused)
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


def test_selective_checkpointing_keeps_the_gradients_of_the_lean_functions():
    """``gradient_checkpointing: selective`` keeps large products' outputs; the lean functions
    add the LoRA term into their base product in place, which torch refuses for a kept output
    (it crashed every selective run). Products inside them are recomputed instead: same loss and
    gradients as without checkpointing, dropout on, with ``down_proj``'s 256-wide input (the
    policy keeps products over inputs of 256 and more)."""
    from peft import LoraConfig, get_peft_model

    from loraforge.models import enable_selective_checkpointing

    base = build_tiny_model(TOK, hidden_size=64, intermediate_size=256)
    base.config.use_cache = False
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS)
    fused = get_peft_model(base, config)
    lora_ops.fuse_lora_forward(fused)
    selective = copy.deepcopy(fused)
    enable_selective_checkpointing(selective.get_base_model())
    assert all(layer.gradient_checkpointing for layer in _layers(selective))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (fused, selective):
        model.train()
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    ref = _grads(fused)
    for n, g in _grads(selective).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-5, atol=1e-8)


def test_current_device_of_switches_only_for_another_cuda_device(monkeypatch):
    from loraforge.fast import kernels

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib_null())
    with kernels.current_device_of(torch.ones(2)):  # the CPU
        pass
    on = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    off = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with kernels.current_device_of(on):  # type: ignore[arg-type]
        pass
    assert entered == []
    with kernels.current_device_of(off):  # type: ignore[arg-type]
        pass
    assert entered == [torch.device("cuda", 1)]


def contextlib_null():
    import contextlib

    return contextlib.nullcontext()


def test_installed_forwards_run_the_lean_functions_with_the_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device: each installed forward (LoRA layer, MLP, norm,
    fused RoPE) runs its lean function inside ``current_device_of(input)``, and the numeric
    checks at installation inside ``on_device_of(module)``; the values are unchanged."""
    from transformers.models.phi3 import modeling_phi3

    from loraforge.fast import kernels, rope

    reference_rope = modeling_phi3.apply_rotary_pos_emb  # transformers' RoPE as the "fused" one

    plain = _lora(0.0)
    fused = copy.deepcopy(plain)
    checked = []
    on_device_of = kernels.on_device_of

    def recording_check(module):
        checked.append(type(module).__name__)
        return on_device_of(module)

    monkeypatch.setattr(fusion, "on_device_of", recording_check)
    monkeypatch.setattr(rope, "on_device_of", recording_check)
    report = apply_lean_functions(fused)
    assert report.fused_layers == 8 and report.fused_mlps == 2 and report.lean_norms == 5
    assert rope.install_fused_rope(fused, rope=reference_rope)[0] == 2
    assert len(checked) == len(report.checks) + 1  # each kind's check, and the RoPE check
    calls = []

    def recording(x):
        calls.append(tuple(x.shape))
        return kernels.current_device_of(x)

    monkeypatch.setattr(fusion, "current_device_of", recording)
    monkeypatch.setattr(rope, "current_device_of", recording)
    _assert_same(plain, fused, rtol=1e-5)
    # a layer: input norm, attention (RoPE), qkv_proj, o_proj, post-attention norm, MLP; final norm
    assert len(calls) == 2 * 6 + 1
    assert not report.fallback_calls


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_model_on_the_second_gpu_trains_with_the_current_device_on_the_first(checkpointed):
    from loraforge.models import enable_checkpointing

    torch.cuda.set_device(0)
    plain = _lora(0.0).to("cuda:1")
    fused = copy.deepcopy(plain)
    report = apply_lean_functions(fused)
    assert report.fused_layers == 8 and all(c.passed for c in report.checks)
    if checkpointed:  # the recomputation runs on autograd's thread for cuda:1
        enable_checkpointing(plain.get_base_model())
        enable_checkpointing(fused.get_base_model())
    assert torch.cuda.current_device() == 0
    _assert_same(plain, fused, ids=IDS.to("cuda:1"))
    assert not report.fallback_calls


def test_seeds_are_ints_outside_a_cuda_graph_capture_and_tensors_are_for_the_kernel_only():
    from loraforge.fast import kernels

    assert isinstance(lora_ops.new_seed(), int)
    assert isinstance(lora_ops.new_seed(torch.device("cpu")), int)
    with pytest.raises(ValueError, match="read by the GPU kernel only"):
        kernels.dropout_mask(torch.ones(4, 8), 0.5, torch.tensor([3], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_lora_products_equal_their_plain_forms(dtype):
    """The scaled product (``alpha`` of one matrix product) and the projection (the base product
    added onto the rank-r term by the product's epilogue, with and without a bias) equal the plain
    ``(a @ b) * coef`` and ``F.linear(x, W, bias) + z @ B^T`` within the dtype's rounding; the
    scaled product's output memory is never read (``beta=0``): with fresh memory filled with NaN
    (torch's deterministic mode) the product is still finite."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=gen), torch.randn(12, 16, generator=gen)
    z, b = torch.randn(6, 4, generator=gen), torch.randn(12, 4, generator=gen)
    bias = torch.randn(12, generator=gen)
    x, w, z, b, bias = (t.to(dtype) for t in (x, w, z, b, bias))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    ref = (x.float() @ w.float().t() * 2.5).to(dtype)
    torch.testing.assert_close(lowrank.scaled_mm(x, w.t(), 2.5), ref, **tol)
    for bias_ in (None, bias):
        plain_bias = None if bias_ is None else bias_.float()
        want = torch.nn.functional.linear(x.float(), w.float(), plain_bias)
        want = (want + z.float() @ b.float().t()).to(dtype)
        torch.testing.assert_close(lora_ops._project(x, w, bias_, z, b), want, **tol)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:  # torch.empty now returns NaN-filled memory
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.isnan(torch.empty(3, dtype=dtype)).all()
        out = lowrank.scaled_mm(x, w.t(), 2.5)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.testing.assert_close(out, ref, **tol)
    # off the CPU and CUDA (e.g. MPS): the plain product, then the scale (no beta=0 product)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for device, want in (
        ("meta", ["mm", "mul_"]),
        ("cpu", ["empty", "addmm_"]),
    ):
        a, b_ = x.to(device), w.t().to(device)
        with Ops() as ops:
            got = lowrank.scaled_mm(a, b_, 2.5)
        assert ops.names == want and got.shape == ref.shape, (device, ops.names)


@pytest.mark.parametrize("regime", [None, torch.bfloat16])
def test_recomputed_mlps_keep_less_and_give_the_same_gradients_bit_for_bit(regime):
    """``recompute_mlps``: the first MLPs recompute their gate_up output in the backward pass;
    they keep it no longer (only x, the rank-r products and the dropout's seeds), and the loss
    and every gradient equal the run that keeps it, bit for bit (same dropout seeds), in float32
    and under bfloat16 autocast (the Trainer's bf16)."""
    fused = _lora(0.1, torch.bfloat16 if regime else torch.float32)
    lora_ops.fuse_lora_forward(fused, autocast_dtype=regime)
    part = copy.deepcopy(fused)
    assert fusion.recompute_mlps(part, 1) == 1
    flags = [vars(layer.mlp)["forward"].recompute for layer in _layers(part)]
    assert flags == [True, False]
    assert fusion.recompute_mlps(copy.deepcopy(fused), 5) == 2  # as many as there are
    with pytest.raises(ValueError, match="count must be >= 0"):
        fusion.recompute_mlps(part, -1)

    def mixed():
        return torch.autocast("cpu", dtype=regime, enabled=regime is not None)

    hidden, inter = fused.config.hidden_size, fused.config.intermediate_size
    x = torch.randn(1, 256, hidden, dtype=regime or torch.float32, requires_grad=True)
    with mixed():
        kept = _saved_bytes(_layers(fused)[0].mlp, x)
        lighter = _saved_bytes(_layers(part)[0].mlp, x)
    e = 2 if regime else 4
    assert kept - lighter == 256 * 2 * inter * e, (kept, lighter)  # the gate_up output
    for model in (fused, part):  # the measurement's own gradients (other dropout seeds) dropped
        model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (fused, part):
        torch.manual_seed(11)
        with mixed():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    ref = _grads(fused)
    for n, g in _grads(part).items():
        assert torch.equal(g, ref[n]), n
    assert fusion.recompute_mlps(part, 0) == 0
    assert not any(vars(layer.mlp)["forward"].recompute for layer in _layers(part))


def test_train_recomputes_the_mlps_its_plan_names(tmp_path, monkeypatch, caplog):
    """``train()`` applies the plan's ``recompute_mlps`` to the model it trains (logged), before
    its first step, and the run's losses and adapter equal those of the run without it."""
    import dataclasses
    import logging

    from safetensors.torch import load_file

    import loraforge.training.steps as steps
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base", hidden_size=64)
    real_plan, real_recompute = steps.plan_fast_path, steps.recompute_mlps
    set_on: list[tuple[int, list[bool]]] = []

    def recompute(model, count):
        done = real_recompute(model, count)
        flags = [
            vars(m)["forward"].recompute
            for m in model.modules()
            if "mlp" in type(m).__name__.lower()
        ]
        set_on.append((done, flags))
        return done

    results = {}
    for run in ("keep", "recompute"):
        with monkeypatch.context() as m:
            if run == "recompute":
                m.setattr(
                    steps,
                    "plan_fast_path",
                    lambda *a, **k: dataclasses.replace(real_plan(*a, **k), recompute_mlps=1),
                )
                m.setattr(steps, "recompute_mlps", recompute)
            recipe = demo_recipe(
                base, tmp_path / run, packing="on", pack_tokens=256, max_steps=3, logging_steps=1
            )
            with caplog.at_level(logging.INFO, logger="loraforge"):
                results[run] = train(recipe)
    assert set_on == [(1, [True, False])]
    assert "MLPs: 1 recompute their gate_up output in the backward pass (planned 1)" in caplog.text
    assert "1 MLPs recompute gate_up" in results["recompute"].metrics["fast_path"]
    losses = {r: [h["loss"] for h in res.log_history if "loss" in h] for r, res in results.items()}
    assert len(losses["keep"]) == 3 and losses["keep"] == losses["recompute"]
    adapters = {
        r: load_file(str(res.output_dir / "adapter_model.safetensors"))
        for r, res in results.items()
    }
    for name, w in adapters["keep"].items():
        assert torch.equal(adapters["recompute"][name], w), name
