"""NF4 dequantization in one GPU kernel, bit for bit equal to bitsandbytes'.

The lean functions dequantize each frozen 4-bit weight in the forward pass and again in the
backward pass (:class:`~loraforge.fast.quant.FrozenNF4`), 320 times a step for Phi-4.
bitsandbytes' ``dequantize_4bit`` of a double-quantized weight runs three kernels (the 8-bit block
scales to float32, plus their offset, then the 4-bit values) with Python checks around each.
:func:`dequantize` does the same arithmetic in one Triton kernel:

    scale[b] = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset     (float32, two roundings)
    w[i]     = nf4[nibble(i)] * scale[i // 64]                            (float32, then the dtype)

with element ``2k`` in the high nibble of packed byte ``k``, as bitsandbytes packs them.

It is used only where it was proven equal: on the first call on each CUDA device, the kernel
dequantizes a random double-quantized weight and the result must equal bitsandbytes' bit for bit;
otherwise (and on the CPU, without Triton, for another quantization layout) bitsandbytes' own
function runs, and a warning says why. Nothing of bitsandbytes changes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

__all__ = ["dequantize", "kernel_available", "layout_fits"]

logger = logging.getLogger(__name__)

_BYTES = 1024  # constant: packed bytes (2,048 elements) per program
# constant: warps per program. On an H200 (session 9), Phi-4's four weights of a layer took 266 us
# with 2 warps against 286 with 4 (gate_up_proj 121 against 132); docs/benchmarks.md
_WARPS = 2


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight ``packed`` (bitsandbytes' packed ``uint8`` data and its ``QuantState``)
    dequantized to ``dtype``, shaped ``state.shape``: by loraforge's kernel where it applies and
    was checked on this device, else by bitsandbytes' ``dequantize_4bit``."""
    if _fits(packed, state, dtype) and kernel_available(packed.device):
        return _run(_build(), packed, state)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state).to(dtype)


def _fits(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> bool:
    """Whether the kernel covers this weight here: :func:`layout_fits`, on the current CUDA
    device (where Triton launches), with the quantization state on the same device."""
    if not packed.is_cuda or packed.device.index != torch.cuda.current_device():
        return False
    if not layout_fits(packed, state, dtype):
        return False
    tables = [state.absmax, state.code]
    if state.nested:
        tables += [state.state2.absmax, state.state2.code, state.offset]
    return all(isinstance(t, torch.Tensor) and t.device == packed.device for t in tables)


def layout_fits(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> bool:
    """Whether the kernel's arithmetic covers this weight, wherever it is: NF4 in blocks of 64
    packed two to a ``uint8`` (contiguous), its 16-entry float32 code book, double quantized with
    8-bit scales and a 256-entry float32 code book (or plain float32 scales), dequantized to the
    state's dtype (bfloat16, float16 or float32), fewer than 2**31 elements."""
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        return False
    if state.quant_type != "nf4" or state.blocksize != 64 or state.dtype != dtype:
        return False
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    code = state.code
    if not isinstance(code, torch.Tensor) or code.dtype != torch.float32 or code.numel() != 16:
        return False
    n = 1
    for s in state.shape:
        n *= int(s)
    if n % 64 or packed.numel() * 2 != n or n >= 2**31:
        return False
    if state.nested:
        s2 = state.state2
        return bool(
            state.absmax.dtype == torch.uint8
            and s2.absmax.dtype == torch.float32
            and s2.code.dtype == torch.float32
            and s2.code.numel() == 256
            and s2.blocksize > 0
        )
    return bool(state.absmax.dtype == torch.float32)


def _run(k: Any, packed: torch.Tensor, state: Any) -> torch.Tensor:
    out = torch.empty(tuple(state.shape), dtype=state.dtype, device=packed.device)
    n_bytes = packed.numel()
    grid = ((n_bytes + _BYTES - 1) // _BYTES,)
    if state.nested:
        s2 = state.state2
        offset = state.offset.reshape(1).to(device=packed.device, dtype=torch.float32)
        scales = (state.absmax, s2.code, s2.absmax, offset)
        block2 = s2.blocksize
    else:  # plain float32 scales; the second level's arguments are unused
        scales = (state.absmax,) * 4
        block2 = 1
    k.dequantize[grid](
        packed, *scales, state.code, out, n_bytes,
        NESTED=bool(state.nested), BLOCK2=block2, BYTES=_BYTES, num_warps=_WARPS,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


@functools.cache  # memoised: the kernels depend only on the installed Triton
def _build() -> Any:
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def dequantize(  # type: ignore[no-untyped-def]
        w,
        aq,
        c2,
        a2,
        off,
        nf4,
        out,
        n_bytes,
        NESTED: tl.constexpr,
        BLOCK2: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        # w: packed bytes; aq: the block scales (8-bit if NESTED, else float32); c2, a2: their
        # code book and float32 scales (one per BLOCK2 of them); off: their offset; nf4: the 16
        # NF4 values; out: the weight
        i = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        inside = i < n_bytes
        b = tl.load(w + i, mask=inside, other=0).to(tl.int32)
        blk = i // 32  # 64 elements = 32 bytes per block scale
        if NESTED:
            q = tl.load(aq + blk, mask=inside, other=0).to(tl.int32)
            scale = tl.load(c2 + q) * tl.load(a2 + blk // BLOCK2, mask=inside, other=0)
            scale = scale + tl.load(off)
        else:
            scale = tl.load(aq + blk, mask=inside, other=0)
        hi = tl.load(nf4 + (b >> 4)) * scale
        lo = tl.load(nf4 + (b & 15)) * scale
        o = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out + o, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=o < 2 * n_bytes)

    return types.SimpleNamespace(dequantize=dequantize)


@functools.cache  # memoised per device: the answer depends on Triton, bitsandbytes and the GPU
def kernel_available(device: torch.device) -> bool:
    """Whether :func:`dequantize` uses loraforge's kernel on ``device``: Triton compiles it and,
    on a random double-quantized and a plain weight in each dtype, its result equals
    bitsandbytes' ``dequantize_4bit`` bit for bit (checked once per device)."""
    if device.type != "cuda":
        return False
    try:
        import bitsandbytes.functional as bnbf

        k = _build()
        gen = torch.Generator(device=device).manual_seed(0)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(96, 640, device=device, generator=gen).to(dtype) * 0.05
            for nested in (True, False):
                packed, state = bnbf.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=nested,
                    quant_storage=torch.uint8,
                )  # fmt: skip
                ours, theirs = _run(k, packed, state), bnbf.dequantize_4bit(packed, state)
                if not torch.equal(ours, theirs):
                    diff = float((ours.float() - theirs.float()).abs().max())
                    raise ValueError(
                        f"{dtype} (double quantization {'on' if nested else 'off'}) differs "
                        f"from bitsandbytes' dequantize_4bit by up to {diff:.3g}"
                    )
    except Exception as exc:  # no Triton, a compile error, or a difference
        logger.warning(
            "loraforge's NF4 dequantization kernel is not used on %s (%s: %s); "
            "bitsandbytes' dequantize_4bit runs instead",
            device,
            type(exc).__name__,
            exc,
        )
        return False
    return True
