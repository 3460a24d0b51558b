"""The fused-RoPE attention forward equals transformers' Phi-3 attention, or is not used."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.phi3 import modeling_phi3

from loraforge.fast.rope import install_fused_rope, remove_fused_rope
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer

TOK = build_tiny_tokenizer()


def _model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_tiny_model(TOK, hidden_size=64, num_layers=2, intermediate_size=128)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"])
    model = get_peft_model(model, config)
    for n, p in model.named_parameters():  # non-zero B: the adapters take part
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def reference_rope(q, k, cos, sin):
    """transformers' own RoPE, called as a function (as a fused kernel would be)."""
    return modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def test_installed_forward_trains_the_same_function():
    plain, fused = _model(), _model()
    n, why = install_fused_rope(fused, rope=reference_rope)
    assert n == 2 and "checked" in why
    ids = torch.tensor([[3, 8, 13, 21, 34, 55, 89, 144]])
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_a_wrong_rope_is_caught_and_nothing_is_installed(caplog):
    model = _model()

    def off_by_a_little(q, k, cos, sin):
        q, k = reference_rope(q, k, cos, sin)
        return q * 1.01, k

    with caplog.at_level(logging.WARNING, logger="loraforge"):
        n, why = install_fused_rope(model, rope=off_by_a_little)
    assert n == 0 and "output differs" in why
    assert "fused RoPE not used" in caplog.text
    assert not any(
        "forward" in vars(m) for m in model.modules() if type(m).__name__.endswith("Attention")
    )


def test_cached_generation_uses_the_class_forward_and_removal_restores_it():
    model = _model().eval()
    ids = torch.tensor([[3, 8, 13, 21]])
    before = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert install_fused_rope(model, rope=reference_rope)[0] == 2
    after = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)
    assert remove_fused_rope(model) == 2
    assert not any(
        isinstance(vars(m).get("forward"), object) and "forward" in vars(m) for m in model.modules()
    )


def test_without_liger_the_model_keeps_transformers_rope():
    pytest.importorskip("torch")
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        n, why = install_fused_rope(_model())
        assert n == 0 and "liger-kernel is not installed" in why
    else:  # pragma: no cover - only where liger-kernel is installed
        pytest.skip("liger-kernel is installed here")


def _qkv_consumers(attention, x, cos_sin) -> list[str]:
    """The kinds of backward nodes that read ``qkv_proj``'s output in one attention call."""
    seen_fn = []
    hook = attention.qkv_proj.register_forward_hook(lambda m, a, out: seen_fn.append(out.grad_fn))
    try:
        out = attention(x, cos_sin, None)[0]
    finally:
        hook.remove()
    qkv_fn, consumers, stack, seen = seen_fn[0], [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if any(n is qkv_fn for n, _ in node.next_functions):
            consumers.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(consumers)


def test_the_fused_qkv_output_is_split_once_not_sliced_three_times():
    """The installed forward splits ``qkv_proj``'s output with one ``split`` (its backward pass
    concatenates the three gradients) instead of three slices (three zero-filled full-size
    gradients and two additions); the class's forward slices."""
    model = _model()
    attention = model.base_model.model.model.layers[0].self_attn
    rotary = model.base_model.model.model.rotary_emb
    x = torch.randn(1, 8, 64, requires_grad=True)
    cos_sin = rotary(x, torch.arange(8)[None])
    assert _qkv_consumers(attention, x, cos_sin) == ["SliceBackward0"] * 3
    assert install_fused_rope(model, rope=reference_rope)[0] == 2
    assert _qkv_consumers(attention, x, cos_sin) == ["SplitWithSizesBackward0"]


def test_the_check_runs_under_the_training_autocast_and_the_lean_layers_take_it():
    """Checked under the autocast training uses, the attention's adapted projections run the lean
    functions installed for it (no hand-back to PEFT's forward, no log line saying so)."""
    from loraforge.fast.lora_ops import apply_lean_functions

    model = _model().to(torch.bfloat16)
    report = apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    report.fallback_calls.clear()
    n, why = install_fused_rope(model, rope=reference_rope, autocast_dtype=torch.bfloat16)
    assert n == 2, why
    assert not report.fallback_calls
    remove_fused_rope(model)
    assert install_fused_rope(model, rope=reference_rope)[0] == 2  # no autocast: PEFT's forward
    assert any("no autocast" in k for k in report.fallback_calls)
