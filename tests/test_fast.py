"""Partial activation checkpointing (the planner's tests are in ``test_plan.py``, the lean LoRA
functions' in ``test_lora_ops.py``)."""

from __future__ import annotations

import copy

import torch

from loraforge.fast.lora_ops import dropout_mask, fuse_lora_forward
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


class _SeededDropout(torch.nn.Module):
    """PEFT's dropout, drawing its mask the way the lean functions do."""

    def __init__(self, p: float, seeds) -> None:
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 * dropout_mask(x2, self.p, next(self.seeds)) / (1 - self.p)).view(x.shape)


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
