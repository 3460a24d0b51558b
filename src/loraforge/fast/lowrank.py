"""A LoRA layer's wide rank-r product in one Triton kernel, which writes its output once.

A LoRA layer of rank ``r`` (8 for the recipes measured) around a frozen ``K -> M`` projection
runs thin products besides the base one. Two of them produce a wide tensor from ``r`` terms an
element, so their cost is writing that tensor: the forward's ``z B^T`` (``T x M``) and the
backward's ``keep(gz A)`` (``T x K``, times the dropout mask). :func:`up` does either in one
kernel that writes the output once with the mask's bits applied. cuBLAS wrote it at about half
the memory bandwidth of an H200 (``docs/benchmarks.md``, session 10), and the mask kernel then
read and wrote it again.

The sum runs in float32 as cuBLAS's does and is rounded once, so a result differs from cuBLAS's
only by the order of the ``r`` terms. The kernel runs where it was checked: on its first use on
each CUDA device (outside a CUDA graph capture) it runs on random problems (bfloat16 and
float16; ranks 5, 8, 16, 24, 32, 40 and 64; ragged tiles and tiles of whole multiples of 16;
a strided ``B^T``; with and without a mask) and must agree with torch's product to within that
rounding. Elsewhere torch's product (and the mask kernel) runs: on the CPU, in float32 (whose
Triton product would round its inputs to TF32), for a rank over 64, mixed dtypes or devices, a
device other than the current one, a masked width that is not a whole number of mask bytes, an
output of 2**31 elements or more or of more than 65,535 column tiles, during a capture before
the check has run, or after a failed check. Mask bits that cannot be the mask of a ``T x M``
tensor (not ``uint8``, another device, another number of bytes) are an error. :func:`up` is
called inside the lean functions' autograd functions: the kernel's result has no autograd
history.

Tried and not kept (``docs/benchmarks.md``, session 11): drawing the dropout mask inside the
forward's ``dropout(x) A^T`` product (slower than the dropout kernel and cuBLAS), and A's
gradient ``gz^T keep(x)`` reading ``x`` through the mask's bits (no faster than the mask kernel
and cuBLAS at Phi-4's 5,120-wide inputs).
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch

from loraforge.fast import kernels

__all__ = ["kernel_available", "scaled_mm", "up"]

logger = logging.getLogger(__name__)

_RANK = 64  # constant: the largest rank the kernel takes
# constant: the tile (rows, columns, warps), the fastest of six benchmarks/lowrank_probe.py swept on
# an H200 for Phi-4's four projections at 1,024 tokens (session 11, docs/benchmarks.md): 75.9 us a
# layer for z B^T and keep(gz A) against 131.9 for cuBLAS and the mask kernel
_UP_TILE = (32, 256, 4)
_GRID = 65535  # constant: the most programs along a grid's second axis


def scaled_mm(a: torch.Tensor, b: torch.Tensor, coef: float) -> torch.Tensor:
    """``(a @ b) * coef`` as one matrix product on the CPU and CUDA (the scale applied by the
    product's ``alpha``, with one rounding, instead of a second kernel; ``beta=0`` never reads
    the fresh output there, as ``mm`` itself does not); elsewhere (e.g. MPS, whose ``addmm``
    has propagated NaN from the output with ``beta=0``) the product, then the scale."""
    if a.device.type not in ("cpu", "cuda"):
        return a.mm(b).mul_(coef)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=coef)


def up(z: torch.Tensor, w: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """``z @ w`` for a thin ``z`` (``T x r``) and a wide ``w`` (``r x M``, any strides, e.g.
    ``B^T``), times the keep-mask in ``bits`` (from :func:`~loraforge.fast.kernels.drop` of a
    ``T x M`` tensor) when given. A new contiguous tensor.

    Raises:
        ValueError: ``bits`` are not ``uint8``, not on ``z``'s device, or not ``ceil(T * M / 8)``
            bytes.
    """
    if bits is not None:
        _check_bits(bits, z, w)
    if _fits(z, w, bits):
        return _run_up(_build(), z.contiguous(), w, bits)
    out = z.mm(w)
    return out if bits is None else kernels.apply_mask_bits(out, bits.contiguous(), inplace=True)


def _check_bits(bits: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> None:
    cells = z.shape[0] * w.shape[-1]
    if bits.dtype != torch.uint8 or bits.device != z.device or bits.numel() != (cells + 7) // 8:
        raise ValueError(
            f"lowrank.up: the mask bits of a {z.shape[0]} x {w.shape[-1]} product are "
            f"{(cells + 7) // 8} uint8 bytes on {z.device} (from kernels.drop); got "
            f"{bits.numel()} {bits.dtype} on {bits.device}"
        )


def _fits(z: torch.Tensor, w: torch.Tensor, bits: torch.Tensor | None) -> bool:
    """Whether the kernel computes ``z @ w`` (times ``bits``) here (see the module's text)."""
    if not (z.is_cuda and w.is_cuda) or z.device != w.device or z.dim() != 2 or w.dim() != 2:
        return False
    if z.dtype != w.dtype or z.dtype not in (torch.bfloat16, torch.float16):
        return False
    rows, rank = z.shape
    width = w.shape[1]
    if w.shape[0] != rank or not 0 < rank <= _RANK or rows <= 0 or width <= 0:
        return False
    extent = (rank - 1) * w.stride(0) + (width - 1) * w.stride(1)  # w's elements, from its start
    if rows * width >= 2**31 or extent >= 2**31 or -(-width // _UP_TILE[1]) > _GRID:
        return False
    # bits passed _check_bits (type, device, size); the kernel also needs whole bytes a row
    if bits is not None and (width % 8 or not bits.is_contiguous()):
        return False
    if z.device.index != torch.cuda.current_device():
        return False
    return kernel_available(z.device)


def _run_up(k: Any, z: torch.Tensor, w: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
    rows, rank = z.shape
    width = w.shape[1]
    out = torch.empty((rows, width), dtype=z.dtype, device=z.device)
    bt, bm, warps = _UP_TILE
    grid = (k.cdiv(rows, bt), k.cdiv(width, bm))
    k.up[grid](
        z, w, out, bits if bits is not None else out, rows, width, rank, w.stride(0), w.stride(1),
        RP=max(16, kernels._next_pow2(rank)),  # a tensor-core product's smallest side
        BT=bt, BM=bm, MASKED=bits is not None, num_warps=warps,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- building


@functools.cache  # memoised: the kernel depends only on the installed Triton
def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def up(  # type: ignore[no-untyped-def]
        u_ptr,
        w_ptr,
        out_ptr,
        bits_ptr,
        T,
        M,
        R,
        stride_wr,
        stride_wm,
        RP: tl.constexpr,
        BT: tl.constexpr,
        BM: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        # out[t, m] = sum_j u[t, j] * w[j, m] (u: T x R contiguous; w: R x M with strides),
        # one tensor-core product of the tile with the rank padded to RP >= 16 by zeros; with
        # MASKED, times the keep-bits of elements t * M + m (M a multiple of 8: a row's bits are
        # whole bytes, BM // 8 of them a tile, each expanded to its eight elements)
        rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
        cols = tl.program_id(1).to(tl.int64) * BM + tl.arange(0, BM)
        r = tl.arange(0, RP).to(tl.int64)
        rin, cin, kin = rows < T, cols < M, r < R
        u = tl.load(
            u_ptr + rows[:, None] * R + r[None, :], mask=rin[:, None] & kin[None, :], other=0
        )
        w = tl.load(
            w_ptr + r[:, None] * stride_wr + cols[None, :] * stride_wm,
            mask=kin[:, None] & cin[None, :],
            other=0,
        )
        acc = tl.dot(u, w)
        if MASKED:
            groups = tl.program_id(1).to(tl.int64) * (BM // 8) + tl.arange(0, BM // 8)
            byte = tl.load(
                bits_ptr + rows[:, None] * (M // 8) + groups[None, :],
                mask=rin[:, None] & (groups * 8 < M)[None, :],
                other=0,
            ).to(tl.int32)
            j = tl.arange(0, 8)
            kept = tl.reshape((byte[:, :, None] >> j[None, None, :]) & 1, (BT, BM))
            acc = tl.where(kept != 0, acc, 0.0)
        tl.store(
            out_ptr + rows[:, None] * M + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=rin[:, None] & cin[None, :],
        )

    return types.SimpleNamespace(up=up, cdiv=triton.cdiv)


def kernel_available(device: torch.device) -> bool:
    """Whether :func:`up` uses the kernel on ``device``: Triton compiles it and, on random
    bfloat16 and float16 problems of ranks 5 to 64 with ragged tiles, with and without a mask,
    its result agrees with torch's product to within a rounding of its terms (checked once per
    device). The check synchronises, so during a CUDA graph capture a device not checked yet
    answers ``False`` (and is checked at its next call outside one); the lean functions run it in
    the warm-up passes that precede their capture (:mod:`loraforge.fast.graphs`)."""
    if device.type != "cuda":
        return False
    try:
        return _checked(torch.cuda.current_device() if device.index is None else device.index)
    except _Capturing:
        return False


class _Capturing(Exception):
    """The check was asked for during a CUDA graph capture (raised, so not memoised)."""


@functools.cache  # memoised per device: the answer depends on Triton and the GPU
def _checked(index: int) -> bool:
    if torch.cuda.is_current_stream_capturing():
        raise _Capturing
    device = torch.device("cuda", index)
    if kernels.triton_kernels() is None:
        return False
    try:
        with torch.cuda.device(device):
            _check(_build(), device)
    except Exception as exc:  # no Triton, a compile error, or a difference
        logger.warning(
            "loraforge's LoRA product kernel is not used on %s (%s: %s); torch's product and "
            "the mask kernel run instead",
            device,
            type(exc).__name__,
            exc,
        )
        return False
    return True


def _check(k: Any, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for rows, rank, width in (
            (77, 8, 2056),  # ragged tiles
            (64, 8, 1024),  # whole tiles, sizes of multiples of 16 (Triton specialises on them)
            (300, 5, 264),
            (40, 16, 520),
            (48, 24, 256),
            (33, 32, 96),
            (32, 40, 128),
            (50, 64, 1032),
        ):
            z, a, b = (
                torch.randn(shape, device=device, generator=gen).to(dtype)
                for shape in ((rows, rank), (rank, width), (width, rank))
            )
            _, bits = kernels.drop(torch.ones(rows, width, device=device, dtype=dtype), 0.3, 1234)
            if bits is None:
                raise ValueError("the dropout kernel gave no bits")
            mask = kernels.keep(torch.ones(rows, width, device=device), 0.3, 1234, bits)
            _close("z @ w", _run_up(k, z, a, None), z, a)
            _close("z @ B^T", _run_up(k, z, b.t(), None), z, b.t())
            _close("z @ w with the mask", _run_up(k, z, a, bits), z, a, mask)


def _close(
    name: str, got: torch.Tensor, u: torch.Tensor, w: torch.Tensor, mask: Any = None
) -> None:
    """``got`` (16-bit) is ``u @ w`` (times ``mask``) summed exactly and rounded once, up to the
    order of the terms: within one unit of the result's type at the size of the terms."""
    exact = u.double().mm(w.double())
    scale = u.double().abs().mm(w.double().abs())
    if mask is not None:
        exact, scale = exact * mask.double(), scale * mask.double()
    unit = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-10
    err = (got.double() - exact).abs()
    if got.shape != exact.shape or not bool((err <= scale * unit + 1e-6).all()):
        raise ValueError(f"{name} ({got.dtype}) differs from torch's by up to {err.max():.3g}")
