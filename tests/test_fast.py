"""The fast path's pieces that run on the CPU: the lean LoRA functions.

The planner's tests are in ``test_plan.py``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from loraforge.fast import lora_ops
from loraforge.fast.kernels import swiglu_backward
from loraforge.fast.lora_ops import dropout_mask, fuse_lora_forward, lean_norms, swiglu
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


def _assert_same(plain, fused, ids, rtol=1e-5):
    a = plain(input_ids=ids, labels=ids).loss
    a.backward()
    b = fused(input_ids=ids, labels=ids).loss
    b.backward()
    torch.testing.assert_close(b, a, rtol=rtol, atol=0)
    ref = _grads(plain)
    for n, g in _grads(fused).items():
        torch.testing.assert_close(g, ref[n], rtol=rtol, atol=rtol * ref[n].abs().max().item())


def test_lean_lora_equals_peft_in_float32():
    plain = _lora(0.0)
    fused = copy.deepcopy(plain)
    assert fuse_lora_forward(fused) == 8  # 4 module types x 2 layers
    mlps = [m for m in fused.modules() if hasattr(m, "_loraforge_unfused_forward")]
    assert len(mlps) == 2  # gate_up_proj -> SwiGLU -> down_proj run as one function
    _assert_same(plain, fused, torch.randint(0, 1000, (2, 40)))


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
    assert lean_norms(fused) == 5  # two per decoder layer and the final norm
    _assert_same(plain, fused, torch.randint(0, 1000, (2, 40)))


def test_lean_norm_gradient_equals_autograd_through_phi3_norm():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    norm = Phi3RMSNorm(96, eps=1e-5)
    _random_norm_weights(norm)
    norm.weight.requires_grad_(False)
    lean = copy.deepcopy(norm)
    assert lean_norms(lean) == 1
    x = (torch.randn(3, 50, 96) * 4).requires_grad_()
    g = torch.randn(3, 50, 96)
    ref = norm(x)
    (dx_ref,) = torch.autograd.grad(ref, x, g)
    out = lean(x)
    (dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


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


def test_lean_norms_leave_zero_and_trained_weights_to_the_model():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    zero = Phi3RMSNorm(8)
    with torch.no_grad():
        zero.weight[3] = 0.0
    assert lean_norms(zero) == 0  # output / weight cannot recover that element
    trained = Phi3RMSNorm(8)
    assert lean_norms(trained) == 1
    x = torch.randn(2, 8)
    trained(x).sum().backward()  # requires_grad: the model's own forward, with a weight gradient
    assert trained.weight.grad is not None
    liger = type("LigerRMSNorm", (Phi3RMSNorm,), {})  # Liger's norm, as it patches Phi-3
    gemma_like = liger(8)
    gemma_like.offset = 1.0  # weight + 1: output / weight no longer recovers the input
    assert lean_norms(gemma_like) == 0
    assert lean_norms(liger(8)) == 1


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
    monkeypatch.setattr(lora_ops, "_new_seed", lambda: next(seeds))
    _assert_same(plain, fused, torch.randint(0, 1000, (2, 40)))
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


def _layers(model):
    return model.base_model.model.model.layers


def test_lean_lora_dropout_survives_checkpoint_recomputation():
    """A checkpointed layer runs its forward again in the backward pass: the dropout seeds come from
    torch's CPU generator, which checkpointing restores, so the masks are the same."""
    from loraforge.models import enable_checkpointing

    fused = _lora(0.1)
    fuse_lora_forward(fused)
    ckpt = copy.deepcopy(fused)
    enable_checkpointing(ckpt.get_base_model())
    ids = torch.randint(0, 1000, (2, 40))
    torch.manual_seed(7)
    a = fused(input_ids=ids, labels=ids).loss
    a.backward()
    torch.manual_seed(7)
    b = ckpt(input_ids=ids, labels=ids).loss
    b.backward()
    assert a.item() == b.item()
    ref = _grads(fused)
    for n, g in _grads(ckpt).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-6, atol=1e-9)


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


def test_dropout_mask_keeps_one_minus_p_and_depends_only_on_the_seed():
    x = torch.empty(1000, 1000)
    m = dropout_mask(x, 0.1, seed=5)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.9) < 0.005
    assert torch.equal(m, dropout_mask(x, 0.1, seed=5))
    assert not torch.equal(m, dropout_mask(x, 0.1, seed=6))


def test_swiglu_backward_matches_autograd():
    gu = torch.randn(5, 2 * 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 24, dtype=torch.float64)
    gate, up = gu.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up * g).sum().backward()
    torch.testing.assert_close(swiglu(gu.detach()), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(swiglu_backward(gu.detach(), g), gu.grad)


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


def test_lean_norms_only_where_the_next_layer_keeps_the_output():
    """q_norm/k_norm-like norms feed RoPE, which may overwrite their output in place: left alone.
    The decoder layer's two norms and the final norm are taken."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    attn = torch.nn.Module()
    attn.q_norm, attn.k_norm = Phi3RMSNorm(8), Phi3RMSNorm(8)
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight.requires_grad_(False)
    assert lean_norms(attn) == 0
    model = _lora(0.0)
    assert len(lora_ops.lean_norm_candidates(model)) == 5


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_lean_lora_hands_a_lora_bias_and_a_trained_base_back_to_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model(TOK),
        LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["qkv_proj", "down_proj"]),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    fused = copy.deepcopy(model)
    fuse_lora_forward(fused)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)
    layer = _layers(fused)[0].self_attn.qkv_proj
    assert lora_ops._plain_lora(layer) is None  # the bias
    plain = _lora(0.0)
    proj = _layers(plain)[0].self_attn.o_proj
    assert lora_ops._plain_lora(proj) == "default"
    proj.base_layer.weight.requires_grad_(True)
    assert lora_ops._plain_lora(proj) is None  # a trained base weight needs its gradient
