"""CPU tests of ``loraforge.fast.lowrank``'s dispatch (the kernel itself: tests/_triton_child.py
under Triton's interpreter, tests/test_gpu.py on a GPU)."""

from __future__ import annotations

import pytest
import torch

from loraforge.fast import lowrank


def test_up_is_torch_product_off_the_gpu():
    z, w = torch.randn(5, 3), torch.randn(3, 16)
    assert not lowrank._fits(z, w, None)
    assert torch.equal(lowrank.up(z, w), z.mm(w))


@pytest.mark.parametrize(
    "bits",
    [
        torch.zeros(9, dtype=torch.uint8),  # one byte short of a 5 x 16 mask
        torch.zeros(10, dtype=torch.int8),  # the right size, another type
    ],
)
def test_mask_bits_that_cannot_be_the_products_mask_are_an_error(bits):
    with pytest.raises(ValueError, match=r"mask bits of a 5 x 16 product are 10 uint8 bytes"):
        lowrank.up(torch.randn(5, 3), torch.randn(3, 16), bits)


def test_no_check_runs_during_a_graph_capture_and_none_is_remembered(monkeypatch):
    """The device check synchronises: asked during a CUDA graph capture it answers False
    without running, and does not memoise that answer."""
    lowrank._checked.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert lowrank.kernel_available(torch.device("cuda", 0)) is False
    assert lowrank._checked.cache_info().currsize == 0
