"""Work a graphed pass does once for all layers (:mod:`loraforge.fast.batched`): the adapter
weights cast together give the numbers of the per-layer casts bit for bit (values and widened
gradients); a copy is read only inside its pass and only while its weight is unchanged; the
dropout seeds of a pass come from one draw, one element each, and a pass asks for what it needs."""

from __future__ import annotations

import pytest
import torch

from loraforge.fast import lora_ops
from loraforge.fast.batched import PassInputs, adapter_weight, pooled_seed


def _weights(n: int = 5) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 32), (48, 4), (4, 48), (96, 4), (4, 7)][:n]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _loss(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A scalar that reads every weight (bf16 products, as a lean layer computes)."""
    total = torch.zeros((), dtype=torch.float32)
    for w in ws:
        total = total + (x[: w.shape[0], : w.shape[1]] * w).float().square().sum()
    return total


def test_the_pass_casts_each_weight_as_the_layer_would_and_widens_its_gradient_back():
    weights = _weights()
    x = torch.randn(96, 48, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    inputs = PassInputs(weights, torch.bfloat16, torch.device("cpu"))
    with inputs.active():
        copies = [adapter_weight(w) for w in weights]
        for c, w in zip(copies, weights, strict=True):
            assert c is not w and c.dtype == torch.bfloat16
            assert torch.equal(c, w.to(torch.bfloat16))
        _loss(copies, x).backward()
    batched = [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    _loss([w.to(torch.bfloat16) for w in weights], x).backward()
    for w, g in zip(weights, batched, strict=True):
        assert w.grad is not None and w.grad.dtype == g.dtype == torch.float32
        assert torch.equal(w.grad, g)


def test_a_weight_unused_in_the_pass_gets_no_gradient():
    weights = _weights(3)
    with PassInputs(weights, torch.bfloat16, torch.device("cpu")).active():
        adapter_weight(weights[0]).float().sum().backward()
    assert weights[0].grad is not None and weights[1].grad is None and weights[2].grad is None


def test_copies_are_read_only_inside_the_pass_and_only_while_the_weight_is_unchanged():
    weights = _weights(2)
    inputs = PassInputs(weights, torch.bfloat16, torch.device("cpu"))
    assert adapter_weight(weights[0]) is weights[0]  # no pass running
    with inputs.active():
        assert adapter_weight(weights[0]) is not weights[0]
        with torch.no_grad():
            weights[0].add_(1.0)  # changed in place: its copy is stale
        assert adapter_weight(weights[0]) is weights[0]
        assert adapter_weight(weights[1]) is not weights[1]
        stranger = torch.zeros(3, requires_grad=True)
        assert adapter_weight(stranger) is stranger  # not one of the pass's weights
    assert adapter_weight(weights[1]) is weights[1]  # the pass ended


def test_weights_already_in_the_compute_dtype_or_without_mixed_precision_are_not_copied():
    half = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.ones(2, 2))
    assert PassInputs([half, full], torch.bfloat16, torch.device("cpu")).weights == [full]
    none = PassInputs([half, full], None, torch.device("cpu"))
    assert none.weights == []
    with none.active():
        assert adapter_weight(full) is full


def test_without_gradients_the_copies_need_no_autograd():
    weights = _weights(2)
    with torch.no_grad(), PassInputs(weights, torch.bfloat16, torch.device("cpu")).active():
        copy = adapter_weight(weights[0])
    assert copy.grad_fn is None and not copy.requires_grad


def test_seeds_of_a_pass_come_from_one_draw_sized_by_the_first_pass():
    cpu = torch.device("cpu")
    inputs = PassInputs([], None, cpu)
    with inputs.active():
        assert [pooled_seed(cpu) for _ in range(3)] == [None, None, None]  # learning the count
    assert inputs.seeds == 3
    torch.manual_seed(5)
    with inputs.active():
        seeds = [pooled_seed(cpu) for _ in range(3)]
        assert all(s is not None and s.shape == (1,) and s.dtype == torch.int64 for s in seeds)
        pool = seeds[0]._base
        assert pool is not None and all(s._base is pool for s in seeds)  # views of one draw
        assert pool.numel() == 3 and len({int(s) for s in seeds}) == 3
        assert pooled_seed(cpu) is None  # more than the pass drew before: the caller draws
        assert pooled_seed(torch.device("meta")) is None  # another device
    assert inputs.seeds == 4  # the next pass draws four
    with inputs.active():
        again = [int(pooled_seed(cpu)) for _ in range(4)]
    assert again[:3] != [int(s) for s in seeds]  # a new draw each pass
    assert pooled_seed(cpu) is None  # outside a pass


def test_new_seed_takes_the_pooled_seed_only_where_it_draws_on_the_device(monkeypatch):
    cpu = torch.device("cpu")
    inputs = PassInputs([], None, cpu)
    inputs.seeds = 2
    with inputs.active():
        assert isinstance(lora_ops.new_seed(cpu), int)  # the CPU path draws ints, as before
    if not torch.cuda.is_available():
        pytest.skip("the device-seed path needs CUDA")
    cuda = torch.device("cuda", torch.cuda.current_device())
    inputs = PassInputs([], None, cuda)
    inputs.seeds = 2
    with lora_ops.device_seeds(), inputs.active():
        a, b, c = (lora_ops.new_seed(cuda) for _ in range(3))
    assert isinstance(a, torch.Tensor) and a._base is b._base and a._base is not None
    assert isinstance(c, torch.Tensor) and c._base is None  # beyond the pool: its own draw


def test_a_frozen_weight_is_copied_without_autograd_and_a_trained_one_with_it():
    trained, frozen = _weights(2)
    frozen.requires_grad_(False)
    with PassInputs([trained, frozen], torch.bfloat16, torch.device("cpu")).active():
        t, f = adapter_weight(trained), adapter_weight(frozen)
        assert t.requires_grad and t.grad_fn is not None
        assert not f.requires_grad and f.grad_fn is None  # no gradient computed for it
        assert torch.equal(f, frozen.to(torch.bfloat16))


def test_a_pass_cannot_be_entered_again_and_a_failed_pass_leaves_nothing_behind():
    weights = _weights(2)
    inputs = PassInputs(weights, torch.bfloat16, torch.device("cpu"))
    with inputs.active(), pytest.raises(RuntimeError, match="entered again"), inputs.active():
        pass
    with pytest.raises(ValueError, match="boom"), inputs.active():
        pooled_seed(torch.device("cpu"))
        raise ValueError("boom")
    assert adapter_weight(weights[0]) is weights[0] and inputs._copies == {}
    assert inputs.seeds == 1  # what the failed pass drew still sizes the next one
    with inputs.active():  # usable again
        assert adapter_weight(weights[0]) is not weights[0]
