"""Element-wise and row-wise kernels of the lean training path, with torch fallbacks.

On a CUDA device with Triton each operation is one kernel; elsewhere (the CPU tests, a machine
without Triton) the same function runs torch's operations. The kernels are built on first use and
tried once on a tiny tensor; if that fails, a warning says so and torch's operations are used.

Module-level state: :func:`triton_kernels` is memoised (``functools.cache``): its answer, the
compiled kernels or ``None``, depends only on the installed Triton and the GPU, which do not change
while the process runs. The other module-level names are constants. Nothing here is a flag that one
caller sets and a later caller reads; torch's generators are made per call.

* Dropout (:func:`drop`, :func:`dropout_mask`): on the GPU, each of the eight 16-bit numbers of
  Philox's draw ``(seed, g)`` decides one of the elements ``8g .. 8g + 7`` (a fixed order; see the
  kernel), which is kept when its number is at least ``p`` rounded to 1/65,536
  (:func:`effective_p`), and the keep-mask is returned packed into bits (one byte per eight
  elements, 1/16 of a bf16 copy), so the backward pass reads the mask instead of drawing it again.
  Elsewhere torch's generator draws a boolean mask from the seed, and the backward pass draws it
  again from the same seed.
* SwiGLU (:func:`swiglu`, :func:`swiglu_backward`) over a fused ``[gate | up]`` tensor.
* RMSNorm whose backward pass reads its *output* (:func:`rms_norm`,
  :func:`rms_norm_backward_from_output`): ``x / rms(x) = y / w``, so a norm followed by a layer that
  keeps its input anyway needs to keep nothing of its own but one float per row.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "apply_mask_bits",
    "current_device_of",
    "drop",
    "dropout_mask",
    "effective_p",
    "keep",
    "on_device_of",
    "rms_norm",
    "rms_norm_backward_from_output",
    "swiglu",
    "swiglu_backward",
    "swiglu_keep",
    "triton_kernels",
]

logger = logging.getLogger(__name__)

_LEVELS = 65536  # constant: the GPU dropout compares 16-bit random numbers with round(p * 65536)


def _kernels(x: torch.Tensor) -> Any:
    """The Triton kernels when ``x`` is on a CUDA device and they work there, else ``None``."""
    return triton_kernels() if x.is_cuda else None


def _on_triton(x: torch.Tensor) -> bool:
    return _kernels(x) is not None


@contextlib.contextmanager
def on_device_of(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block the current CUDA device is the one of ``module``'s first CUDA parameter
    (if any), where Triton launches: for the numeric checks run on a module at installation."""
    first = next((p for p in module.parameters() if p.is_cuda), None)
    with current_device_of(first) if first is not None else contextlib.nullcontext():
        yield


def current_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context that makes ``x``'s CUDA device the current one for the block, where Triton
    launches, if it is not already (a model on ``cuda:1`` called while ``cuda:0`` is current);
    else a context that does nothing (the CPU, or the current device). The installed forwards
    run the lean functions in it; autograd runs their backward passes, and any recomputation of
    a checkpointed layer, on its worker thread for that device, where the device is current
    already, so every pass takes the same path."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- dropout


def effective_p(p: float, x: torch.Tensor) -> float:
    """The drop probability :func:`drop` realises for ``x``: ``p`` rounded to 1/65,536 on the
    GPU kernel, ``p`` itself elsewhere (scale kept values by ``1 / (1 - effective_p)``)."""
    if p <= 0.0 or not _on_triton(x):
        return p
    return round(p * _LEVELS) / _LEVELS


def dropout_mask(like: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """The keep-mask of :func:`drop` for a tensor shaped like ``like`` (``True`` = kept, with
    probability ``1 - effective_p(p)``); a function of ``seed`` and the device kind."""
    k = _kernels(like)
    if k is not None:
        ones = torch.ones(like.shape, dtype=torch.int8, device=like.device)
        kept, _ = _triton_drop(k, ones, p, seed, out=ones)
        return kept.bool()
    if isinstance(seed, torch.Tensor):  # drawn on a GPU for its kernel (lora_ops.new_seed)
        raise ValueError("a seed tensor is read by the GPU kernel only; use an int here")
    gen = torch.Generator(device=like.device)  # a fresh one: no state shared between callers
    gen.manual_seed(seed)
    mask = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    return mask.bernoulli_(1.0 - p, generator=gen)


def drop(
    x: torch.Tensor, p: float, seed: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` times its keep-mask (unscaled), and the mask packed into bits where the GPU kernel
    made it (``None`` elsewhere: :func:`keep` draws it again from ``seed``)."""
    if p <= 0.0:
        return x, None
    k = _kernels(x)
    if k is not None:
        return _triton_drop(k, x.contiguous(), p, seed)
    return x * dropout_mask(x, p, seed), None


def keep(
    x: torch.Tensor,
    p: float,
    seed: int | torch.Tensor,
    bits: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``x`` times the keep-mask of ``seed`` (unscaled): read from ``bits`` when :func:`drop`
    returned them, else drawn again; one pass on a GPU."""
    if p <= 0.0:
        return x
    if bits is not None:
        return apply_mask_bits(x, bits, inplace=inplace)
    k = _kernels(x)
    if k is not None and x.is_contiguous():
        return _triton_drop(k, x, p, seed, out=x if inplace else None)[0]
    mask = dropout_mask(x, p, seed)
    return x.mul_(mask) if inplace else x * mask


def apply_mask_bits(x: torch.Tensor, bits: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``x`` with the elements whose bit is clear in ``bits`` (from :func:`drop`, elements in
    row-major order) set to zero."""
    k = _kernels(x)
    if k is None:
        raise RuntimeError("apply_mask_bits: packed dropout masks exist only on the GPU kernel")
    return _triton_apply_bits(k, x, bits, inplace=inplace)


def _triton_apply_bits(
    k: Any, x: torch.Tensor, bits: torch.Tensor, *, inplace: bool
) -> torch.Tensor:
    n = x.numel()
    src = x.contiguous()
    out = src if inplace and src is x else torch.empty_like(src)
    grid = (k.cdiv(n, 8 * _GROUPS),)
    k.apply_bits[grid](src, out, bits, n, GROUPS=_GROUPS, num_warps=_GROUPS_WARPS)
    if inplace and out is not x:
        return x.copy_(out)
    return out


_GROUPS = 256  # constant: eight-element groups per program of the mask-reading kernel, and
_GROUPS_WARPS = 8  # its warps: the fastest of 9 settings on an H200 for Phi-4's widths, 4.0 us
# against 4.8 for the former 512/4 at 1,024 x 5,120 elements (benchmarks/launch_probe.py)
_DROP_GROUPS = 256  # constant: eight-element groups per program of the dropout kernel (fastest
# of 256, 512 and 1,024 on an H200: benchmarks/kernel_probe.py)


def _triton_drop(
    k: Any, x: torch.Tensor, p: float, seed: int | torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``seed``: an int, or a one-element int64 tensor on ``x``'s device that the kernel reads
    (a seed drawn on the device, e.g. inside a CUDA graph; the same value gives the same mask)."""
    n = x.numel()
    if n >= 2**31:
        raise ValueError(f"dropout on {n} elements: more than the kernel's 2**31 offsets")
    out = torch.empty_like(x) if out is None else out
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    threshold = min(round(p * _LEVELS), _LEVELS)
    grid = (k.cdiv(n, 8 * _DROP_GROUPS),)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
            raise ValueError("a tensor seed must be one int64 element on the input's device")
        k.drop[grid](x, out, bits, n, threshold, seed, GROUPS=_DROP_GROUPS, SEED_PTR=True)
    else:
        k.drop[grid](x, out, bits, n, threshold, int(seed) & (2**63 - 1), GROUPS=_DROP_GROUPS)
    return out, bits


# --------------------------------------------------------------------------- SwiGLU


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    k = _kernels(gate_up)
    if k is not None:
        return _triton_swiglu(k, gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``gate_up`` of ``swiglu(gate_up)``, given ``grad``."""
    k = _kernels(gate_up)
    if k is not None:
        return _triton_swiglu_backward(k, gate_up.contiguous(), grad.contiguous())
    gate, up = gate_up.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * gate * sig], dim=-1).to(gate_up.dtype)


def _triton_swiglu(k: Any, gu: torch.Tensor) -> torch.Tensor:
    n = gu.shape[-1] // 2
    out = torch.empty((*gu.shape[:-1], n), dtype=gu.dtype, device=gu.device)
    k.swiglu_fwd[(gu.numel() // (2 * n), k.cdiv(n, _BLOCK))](gu, out, n, BLOCK=_BLOCK)
    return out


def _triton_swiglu_backward(k: Any, gu: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = gu.shape[-1] // 2
    out = torch.empty_like(gu)
    k.swiglu_bwd[(gu.numel() // (2 * n), k.cdiv(n, _BLOCK))](gu, g, out, n, BLOCK=_BLOCK)
    return out


_BLOCK = 1024  # constant: columns per program of the SwiGLU kernels


def swiglu_keep(
    gate_up: torch.Tensor, p: float, seed: int | torch.Tensor, bits: torch.Tensor | None
) -> torch.Tensor:
    """``keep(swiglu(gate_up), p, seed, bits)``: the SwiGLU output times its keep-mask. On the
    GPU, with ``bits``, one kernel that does not write the SwiGLU output itself."""
    k = _kernels(gate_up)
    if p <= 0.0 or bits is None or k is None or not _fused_swiglu_fits(gate_up):
        return keep(swiglu(gate_up), p, seed, bits, inplace=True)
    return _triton_swiglu_keep(k, gate_up.contiguous(), bits)


def _triton_swiglu_keep(k: Any, gu: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    n_cols = gu.shape[-1] // 2
    out = torch.empty((*gu.shape[:-1], n_cols), dtype=gu.dtype, device=gu.device)
    n = out.numel()
    grid = (k.cdiv(n, 8 * _GROUPS),)
    k.swiglu_keep[grid](gu, out, bits, n, n_cols, GROUPS=_GROUPS, num_warps=_GROUPS_WARPS)
    return out


def _fused_swiglu_fits(gate_up: torch.Tensor) -> bool:
    """Whether :func:`swiglu_keep`'s kernel takes ``gate_up``: an even last dimension (gate and
    up halves; the kernel finds each output element's row itself, so a group of eight may span
    two rows)."""
    return gate_up.shape[-1] % 2 == 0


# --------------------------------------------------------------------------- RMSNorm


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x / rms(x)).to(x.dtype)`` over the last dimension (the Llama/Phi-3 RMSNorm,
    statistics in float32), and the float32 ``1 / rms`` of each row."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    k = _kernels(x2)
    if k is not None and x2.is_contiguous():
        y, rstd = _triton_rms_norm(k, x2, weight, eps)
        return y.view(shape), rstd
    xf = x2.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = weight * (xf * rstd[:, None]).to(x.dtype)
    return y.view(shape), rstd


def rms_norm_backward_from_output(
    grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The gradient with respect to the input of :func:`rms_norm`, from its output ``y``:
    with ``xh = y / weight`` (the normalised input), ``dx = rstd * (g w - xh * mean(g w xh))``.
    ``weight`` must have no zero."""
    shape = y.shape
    y2, g2 = y.reshape(-1, shape[-1]), grad.reshape(-1, shape[-1])
    k = _kernels(y2)
    if k is not None and y2.is_contiguous():
        return _triton_rms_backward(k, y2, g2.contiguous(), weight, rstd).view(shape)
    w = weight.float()
    xh = y2.float() / w
    gw = g2.float() * w
    c = (gw * xh).mean(-1, keepdim=True)
    return (rstd[:, None] * (gw - xh * c)).to(y.dtype).view(shape)


def _triton_rms_norm(
    k: Any, x2: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    block = max(_next_pow2(n), 128)
    k.rms_fwd[(rows,)](x2, weight, y, rstd, n, eps, BLOCK=block, num_warps=_warps(block))
    return y, rstd


def _triton_rms_backward(
    k: Any, y2: torch.Tensor, g2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    rows, n = y2.shape
    dx = torch.empty_like(y2)
    block = max(_next_pow2(n), 128)
    k.rms_bwd[(rows,)](y2, g2, weight, rstd, dx, n, BLOCK=block, num_warps=_warps(block))
    return dx


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# --------------------------------------------------------------------------- building


@functools.cache  # memoised: the answer depends on the installed Triton and the GPU only
def triton_kernels() -> Any:
    """The Triton kernels, built and tried once on a tiny tensor of the current CUDA device;
    ``None`` (torch's operations are used) when Triton is missing or cannot compile them."""
    try:
        k = _build_triton_kernels()
        _try_kernels(k)
    except Exception as exc:  # no triton, or it cannot compile here
        logger.warning(
            "Triton kernels unavailable (%s: %s); using torch's operations",
            type(exc).__name__,
            exc,
        )
        return None
    return k


def _try_kernels(k: Any) -> None:
    """Run each kernel once on a tiny CUDA tensor (compiles them; raises if one cannot run)."""
    probe = torch.ones(8, 2 * 64, device="cuda", dtype=torch.bfloat16)
    n = probe.shape[-1] // 2
    act = torch.empty(8, n, device="cuda", dtype=torch.bfloat16)
    k.swiglu_fwd[(8, k.cdiv(n, _BLOCK))](probe, act, n, BLOCK=_BLOCK)
    grad = torch.empty_like(probe)
    k.swiglu_bwd[(8, k.cdiv(n, _BLOCK))](probe, act, grad, n, BLOCK=_BLOCK)
    _, bits = _triton_drop(k, probe, 0.5, 1)
    _triton_apply_bits(k, probe, bits, inplace=False)
    _triton_swiglu_keep(k, probe, bits)  # reads the first 8 * n // 8 bytes
    y = torch.empty_like(probe)
    rstd = torch.empty(8, dtype=torch.float32, device="cuda")
    block = max(_next_pow2(2 * n), 128)
    k.rms_fwd[(8,)](probe, probe[0], y, rstd, 2 * n, 1e-6, BLOCK=block, num_warps=_warps(block))
    k.rms_bwd[(8,)](y, y, probe[0], rstd, grad, 2 * n, BLOCK=block, num_warps=_warps(block))
    torch.cuda.synchronize()


def _build_triton_kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_fwd(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        a = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=inside, other=0).to(tl.float32)
        b = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=inside, other=0).to(tl.float32)
        c = a * tl.sigmoid(a) * b
        tl.store(out_ptr + row * n_cols + cols, c.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def swiglu_bwd(gu_ptr, g_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        a = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=inside, other=0).to(tl.float32)
        b = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=inside, other=0).to(tl.float32)
        g = tl.load(g_ptr + row * n_cols + cols, mask=inside, other=0).to(tl.float32)
        sig = tl.sigmoid(a)
        da = g * b * sig * (1 + a * (1 - sig))
        db = g * a * sig
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * 2 * n_cols + cols, da.to(dt), mask=inside)
        tl.store(out_ptr + row * 2 * n_cols + n_cols + cols, db.to(dt), mask=inside)

    @triton.jit
    def drop_kernel(  # type: ignore[no-untyped-def]
        src,
        out,
        bits,
        n,
        thr,
        seed,
        GROUPS: tl.constexpr,
        ROUNDS: tl.constexpr = 10,
        SEED_PTR: tl.constexpr = False,
    ):
        # one Philox draw, 128 bits = eight 16-bit halves, decides eight elements: element 8g + j
        # with j = 4i + 2k + h is kept when half h (0: low, 1: high) of word 2k + i of draw
        # (seed, g) is >= thr; byte g of bits holds their keep-bits (bit j: element 8g + j).
        # The halves are laid out with tl.join, which keeps each group's eight in one thread
        # (2.1-3.1x faster on an H200 than selecting them with tl.where: benchmarks/kernel_probe.py;
        # ROUNDS: Philox rounds, 10 as Triton's default; other values only for that benchmark;
        # SEED_PTR: seed is a pointer to one int64, read here, not the seed itself)
        if SEED_PTR:
            seed = tl.load(seed)
        groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        # 32-bit offsets: with 64-bit ones, Triton before 3.4 runs 64-bit Philox (64-bit words)
        r0, r1, r2, r3 = tl.randint4x(seed, groups.to(tl.int32), ROUNDS)
        lo = tl.join(tl.join(r0 & 0xFFFF, r1 & 0xFFFF), tl.join(r2 & 0xFFFF, r3 & 0xFFFF))
        hi = tl.join(tl.join(r0 >> 16, r1 >> 16), tl.join(r2 >> 16, r3 >> 16))
        half = tl.reshape(tl.join(lo, hi), (GROUPS, 8)).to(tl.int32)
        j = tl.arange(0, 8)[None, :]
        offs = groups[:, None] * 8 + j
        inside = offs < n
        kept = (half >= thr) & inside
        x = tl.load(src + offs, mask=inside, other=0)
        tl.store(out + offs, tl.where(kept, x, tl.zeros_like(x)), mask=inside)
        byte = tl.sum(kept.to(tl.int32) << j, axis=1)
        tl.store(bits + groups, byte.to(tl.uint8), mask=groups * 8 < n)

    @triton.jit
    def swiglu_keep(gu_ptr, out_ptr, bits_ptr, n, n_cols, GROUPS: tl.constexpr):  # type: ignore[no-untyped-def]
        # swiglu_fwd, then apply_bits on its output, in one pass (the output itself not written)
        groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        byte = tl.load(bits_ptr + groups, mask=groups * 8 < n, other=0).to(tl.int32)
        j = tl.arange(0, 8)[None, :]
        kept = ((byte[:, None] >> j) & 1) != 0
        offs = groups[:, None] * 8 + j
        inside = offs < n
        src = offs + (offs // n_cols) * n_cols  # row * 2 * n_cols + col: the gate, then the up
        a = tl.load(gu_ptr + src, mask=inside, other=0).to(tl.float32)
        b = tl.load(gu_ptr + src + n_cols, mask=inside, other=0).to(tl.float32)
        c = (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty)  # as swiglu_fwd
        tl.store(out_ptr + offs, tl.where(kept, c, tl.zeros_like(c)), mask=inside)

    @triton.jit
    def apply_bits(src_ptr, out_ptr, bits_ptr, n, GROUPS: tl.constexpr):  # type: ignore[no-untyped-def]
        groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        byte = tl.load(bits_ptr + groups, mask=groups * 8 < n, other=0).to(tl.int32)
        j = tl.arange(0, 8)[None, :]
        kept = ((byte[:, None] >> j) & 1) != 0
        offs = groups[:, None] * 8 + j
        inside = offs < n
        x = tl.load(src_ptr + offs, mask=inside, other=0)
        tl.store(out_ptr + offs, tl.where(kept, x, tl.zeros_like(x)), mask=inside)

    @triton.jit
    def rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        dt = y_ptr.dtype.element_ty
        xh = (x * rstd).to(dt).to(tl.float32)  # the input's dtype before the weight, as Llama
        w = tl.load(w_ptr + cols, mask=inside, other=0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (xh * w).to(dt), mask=inside)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def rms_bwd(y_ptr, g_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        y = tl.load(y_ptr + row * n_cols + cols, mask=inside, other=0).to(tl.float32)
        g = tl.load(g_ptr + row * n_cols + cols, mask=inside, other=0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=inside, other=1).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xh = tl.where(inside, y / w, 0.0)
        gw = g * w
        c = tl.sum(gw * xh, axis=0) / n_cols
        dx = rstd * (gw - xh * c)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)

    return types.SimpleNamespace(
        swiglu_fwd=swiglu_fwd,
        swiglu_bwd=swiglu_bwd,
        drop=drop_kernel,
        apply_bits=apply_bits,
        swiglu_keep=swiglu_keep,
        rms_fwd=rms_fwd,
        rms_bwd=rms_bwd,
        cdiv=triton.cdiv,
    )
