"""Checks of loraforge's Triton kernels under Triton's CPU interpreter, run in a child process.

``tests/test_triton_interpret.py`` starts this file with ``TRITON_INTERPRET=1`` in the
environment: the variable must be set before Triton is imported (Triton's own library functions,
e.g. its Philox, are built for the interpreter at import), so these checks cannot run in the
pytest process. Prints one ``RESULT {json}`` line: each check's name and ``"ok"`` or its
traceback.
"""

from __future__ import annotations

import json
import os
import traceback

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from loraforge.fast import kernels, lowrank, nf4  # noqa: E402

_M = np.uint64(0xFFFFFFFF)
K = kernels._build_triton_kernels()
Q = nf4._build()
L = lowrank._build()


def philox4x32_10(seed: int, counters: np.ndarray) -> tuple[np.ndarray, ...]:
    """Philox-4x32 with 10 rounds for counters ``(c, 0, 0, 0)`` and key ``(seed_lo, seed_hi)``,
    as Triton's ``randint4x`` with 32-bit offsets computes it."""
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    ka, kb = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    c0 = counters.astype(np.uint64) & _M
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = b * c2, a * c0  # 32 x 32 -> 64 bits
        hi0, hi1 = p0 >> np.uint64(32), p1 >> np.uint64(32)
        c0, c2, c1, c3 = hi0 ^ c1 ^ k0, hi1 ^ c3 ^ k1, p0 & _M, p1 & _M
        k0, k1 = (k0 + ka) & _M, (k1 + kb) & _M
    return c0, c1, c2, c3


def reference_keep_mask(n: int, p: float, seed: int) -> torch.Tensor:
    """The documented dropout mask for ``n`` elements (True = kept): element ``8g + j``, with
    ``j = 4i + 2k + h``, is kept when half ``h`` (0: low) of word ``2k + i`` of the draw
    ``(seed, g)`` is at least ``round(p * 65536)``."""
    groups = (n + 7) // 8
    words = philox4x32_10(seed, np.arange(groups, dtype=np.uint64))
    halves = np.empty((groups, 8), dtype=np.int64)
    for i in range(2):
        for k in range(2):
            word = words[2 * k + i]
            halves[:, 4 * i + 2 * k] = (word & np.uint64(0xFFFF)).astype(np.int64)
            halves[:, 4 * i + 2 * k + 1] = (word >> np.uint64(16)).astype(np.int64)
    threshold = min(round(p * 65536), 65536)
    return torch.from_numpy(halves.reshape(-1)[:n] >= threshold)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bits[:, None] >> shifts) & 1).bool().reshape(-1)[:n]


def check_dropout(shape: tuple[int, int], p: float, seed: int) -> None:
    x = torch.randn(shape)
    n = x.numel()
    out, bits = kernels._triton_drop(K, x, p, seed)
    want = reference_keep_mask(n, p, seed)
    assert torch.equal(unpack_bits(bits, n), want), "mask differs from the documented one"
    assert torch.equal(out.reshape(-1), x.reshape(-1) * want), "output is not input x mask"
    again = kernels._triton_apply_bits(K, x, bits, inplace=False)
    assert torch.equal(again, out), "the bits do not give the mask back"
    groups = n // 8
    by_position = want[: groups * 8].view(-1, 8).float().mean(0)
    sigma = (p * (1 - p) / groups) ** 0.5  # each position keeps 1 - p: within 4.5 sigma
    assert (by_position - (1 - p)).abs().max().item() < 4.5 * sigma, by_position


def check_swiglu_and_rms() -> None:
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(6, 2 * 96, generator=gen) * 2
    g = torch.randn(6, 96, generator=gen)
    ref = gu.clone().requires_grad_()
    gate, up = ref.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    act.backward(g)
    torch.testing.assert_close(kernels._triton_swiglu(K, gu), act.detach())
    torch.testing.assert_close(kernels._triton_swiglu_backward(K, gu, g), ref.grad)
    x = torch.randn(5, 200, generator=gen) * 3
    w = torch.empty(200).uniform_(0.2, 2.0, generator=gen)
    xr = x.clone().requires_grad_()
    y_ref = w * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5))
    dy = torch.randn(5, 200, generator=gen)
    y_ref.backward(dy)
    y, rstd = kernels._triton_rms_norm(K, x, w, 1e-5)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(kernels._triton_rms_backward(K, y, dy, w, rstd), xr.grad)


def check_nf4(nested: bool, dtype: torch.dtype) -> None:
    import bitsandbytes.functional as bnbf

    w = (torch.randn(96, 640, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=nested, quant_storage=torch.uint8
    )
    ours, theirs = nf4._run(Q, packed, state), bnbf.dequantize_4bit(packed, state)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if dtype == torch.float32 or _interpreter_rounds(dtype):
        assert torch.equal(ours, theirs), "differs from bitsandbytes"
    else:  # this interpreter truncates to 16 bits where a GPU rounds to nearest: one unit in
        # the last place at most (on a GPU test_qlora.py checks every bit)
        step = theirs.float().abs() * 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert ((ours.float() - theirs.float()).abs() <= step).all(), "beyond one unit"


def _interpreter_rounds(dtype: torch.dtype) -> bool:
    """Whether Triton's interpreter here converts float32 to ``dtype`` rounding to nearest (as a
    GPU does): a value just above the midpoint of two neighbours goes to the upper one."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(src, dst):  # type: ignore[no-untyped-def]
        tl.store(dst, tl.load(src).to(dst.dtype.element_ty))

    bits = 7 if dtype == torch.bfloat16 else 10
    x = torch.tensor([1.0 + 2.0 ** -(bits + 1) + 2.0 ** -(bits + 3)])
    y = torch.empty(1, dtype=dtype)
    convert[(1,)](x, y)
    return bool(y.item() == x.to(dtype).item())


def check_seed_from_a_tensor() -> None:
    """A seed handed to the dropout kernel as a one-element int64 tensor (drawn on the device,
    as inside a CUDA graph) gives the mask of the same seed handed as an int."""
    x = torch.randn(7, 333)
    for seed in (12345, 2**61 + 7):
        out_a, bits_a = kernels._triton_drop(K, x, 0.3, seed)
        out_b, bits_b = kernels._triton_drop(K, x, 0.3, torch.tensor([seed], dtype=torch.int64))
        assert torch.equal(bits_a, bits_b) and torch.equal(out_a, out_b), seed
    try:
        kernels._triton_drop(K, x, 0.3, torch.tensor([1], dtype=torch.int32))
    except ValueError as exc:
        assert "one int64 element" in str(exc)
    else:
        raise AssertionError("an int32 seed tensor was taken")


def check_swiglu_keep() -> None:
    """The backward's fused kernel (SwiGLU times the dropout mask read from the bits) equals
    SwiGLU followed by the mask kernel exactly (a row width that is not a whole number of
    programs; a tensor seed for the mask)."""
    gen = torch.Generator().manual_seed(4)
    tensor_seed = torch.tensor([2**60 + 3], dtype=torch.int64)
    # width 13: groups of eight elements span two rows
    for rows, width, seed in ((6, 96, 77), (5, 40, tensor_seed), (7, 13, 5)):
        gu = torch.randn(rows, 2 * width, generator=gen) * 2
        act = kernels._triton_swiglu(K, gu)
        dropped, bits = kernels._triton_drop(K, act, 0.3, seed)
        assert int((dropped == 0).sum()) > 0 and int((dropped != 0).sum()) > 0
        assert torch.equal(kernels._triton_swiglu_keep(K, gu, bits), dropped)


def check_lowrank() -> None:
    """The rank-r product kernel (float32 here) against torch's product: ranks 5, 8, 16, 17 and
    64 (padded to 16, 16, 16, 32 and 64), ragged tiles, a contiguous ``w``, ``B^T`` and a sliced
    ``w``; with the dropout mask's bits, the product times the mask."""
    gen = torch.Generator().manual_seed(5)
    for rows, rank, width in ((70, 8, 600), (33, 5, 264), (40, 16, 520), (9, 17, 40), (50, 64, 72)):
        z = torch.randn(rows, rank, generator=gen)
        a = torch.randn(rank, width, generator=gen)
        b = torch.randn(width, rank, generator=gen)
        wide = torch.randn(rank, 2 * width, generator=gen)
        sums = {"atol": 1e-4, "rtol": 1e-4}  # up to 64 terms, summed in another order
        torch.testing.assert_close(lowrank._run_up(L, z, a, None), z.mm(a), **sums)
        torch.testing.assert_close(lowrank._run_up(L, z, b.t(), None), z.mm(b.t()), **sums)
        sliced = wide[:, 3 : 3 + width]
        torch.testing.assert_close(lowrank._run_up(L, z, sliced, None), z.mm(sliced), **sums)
        _, bits = kernels._triton_drop(K, torch.ones(rows, width), 0.3, 99)
        mask = kernels._triton_apply_bits(K, torch.ones(rows, width), bits, inplace=False)
        masked = lowrank._run_up(L, z, a, bits)
        torch.testing.assert_close(masked, z.mm(a) * mask, **sums)
        assert int((mask == 0).sum()) > 0 and bool((masked[mask == 0] == 0).all())


def check_lora_backward_through_the_kernels() -> None:
    """The lean functions' backward (``lora_ops._lora_backward``) with the rank-r product kernel
    taken wherever it is called (here under the interpreter, in float32) and the dropout kernels
    drawing the masks: all gradients, the input's alone, and the adapter's alone equal the
    formulas ``grad_x = keep(coef * grad B A) + grad W``, ``grad_A = (coef * grad B)^T keep(x)``,
    ``grad_B = grad^T zs`` with the mask's bits, without dropout, with ``x`` given masked, and
    with the mask drawn again from its seed (no bits); the input is wider than one column tile
    of the kernel."""
    from loraforge.fast import lora_ops

    taken: list[bool] = []
    run_up, fits, find = lowrank._run_up, lowrank._fits, kernels._kernels

    def counted(*args: object) -> torch.Tensor:
        taken.append(True)
        return run_up(*args)  # type: ignore[arg-type]

    lowrank._fits, lowrank._run_up = (lambda z, w, bits: True), counted
    kernels._kernels = lambda x: K
    try:
        gen = torch.Generator().manual_seed(7)
        rows, width_in, width_out, rank = 37, 264, 48, 8
        x = torch.randn(rows, width_in, generator=gen)
        w = torch.randn(width_out, width_in, generator=gen)
        a = torch.randn(rank, width_in, generator=gen)
        b = torch.randn(width_out, rank, generator=gen)
        grad = torch.randn(rows, width_out, generator=gen)
        sums = {"atol": 1e-4, "rtol": 1e-4}
        for p, masked, with_bits in ((0.3, False, True), (0.0, False, True), (0.3, True, True),
                                     (0.3, False, False)):  # fmt: skip
            dropped, bits = kernels.drop(x, p, 11)
            ones = torch.ones_like(x)
            mask = ones if bits is None else kernels.keep(ones, p, 11, bits)
            zs = dropped.mm(a.t()) * 1.5
            given = dropped if masked else x
            mask_arg = (p, 11, bits if with_bits else None)
            for need in ((True, True, True), (True, False, False), (False, True, True)):
                before = len(taken)
                got = lora_ops._lora_backward(
                    grad, given, zs, w, a, b, 1.5, mask_arg, need, masked=masked
                )
                # the kernel computes keep(gz A) whenever the input's gradient is asked for,
                # except where the mask must be drawn again (no bits)
                assert len(taken) - before == int(need[0] and (with_bits or p == 0.0))
                gz = grad.mm(b) * 1.5
                want = (gz.mm(a) * mask + grad.mm(w), gz.t().mm(x * mask), grad.t().mm(zs))
                for g, ref, asked in zip(got, want, need, strict=True):
                    assert (g is not None) == asked, (p, masked, need)
                    if asked:
                        torch.testing.assert_close(g, ref, **sums)
    finally:
        lowrank._fits, lowrank._run_up, kernels._kernels = fits, run_up, find


CHECKS = {
    "dropout_p0.1": lambda: check_dropout((96, 640), 0.1, 12345),
    "dropout_p0.5_64bit_seed_ragged": lambda: check_dropout((7, 333), 0.5, 2**61 + 7),
    "swiglu_and_rms": check_swiglu_and_rms,
    "dropout_seed_from_a_tensor": check_seed_from_a_tensor,
    "swiglu_keep": check_swiglu_keep,
    "lowrank": check_lowrank,
    "lora_backward_through_the_kernels": check_lora_backward_through_the_kernels,
}
for _nested in (True, False):
    for _dtype in (torch.float16, torch.float32, torch.bfloat16):
        name = f"nf4_{'nested' if _nested else 'flat'}_{str(_dtype).removeprefix('torch.')}"
        CHECKS[name] = lambda n=_nested, d=_dtype: check_nf4(n, d)


if __name__ == "__main__":
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print("RESULT " + json.dumps(results), flush=True)
