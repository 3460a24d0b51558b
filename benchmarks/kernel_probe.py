"""Micro-benchmarks of single kernels of the lean path, on one CUDA GPU (not run in CI).

Prints, for Phi-4's shapes at 2,048 tokens, the GPU time (CUDA events around ``--reps``
back-to-back calls) and the CPU time to enqueue them (no synchronisation in between) of:

* ``dropout``: loraforge's dropout kernel (one Philox draw per eight elements, the random halves
  laid out with ``tl.join``, the mask kept as bits) as shipped, then a sweep of it (``join``) and
  of the kernel it replaced (``where``: the halves picked with ``tl.where``) over 10 or 7 Philox
  rounds and programs of 256 to 1,024 groups, with a plain copy and the bit-reading kernel as
  bandwidth references;
* ``dequant``: bitsandbytes' ``dequantize_4bit`` of a double-quantized NF4 weight, the same with
  the block scales already dequantized, and loraforge's one-kernel dequantization
  (:mod:`loraforge.fast.nf4`), with its largest difference from bitsandbytes' result.

Usage: ``python benchmarks/kernel_probe.py [--only dropout,dequant] [--reps 50]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

TOKENS = 2048
HIDDEN, INTER, QKV = 5120, 17920, 7680


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(GPU ms per call, CPU enqueue ms per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    cpu = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, cpu


def report(name: str, gpu: float, cpu: float, nbytes: int | None = None) -> None:
    bw = f"  {nbytes / gpu / 1e9:7.2f} TB/s" if nbytes else ""
    print(f"  {name:44s} GPU {gpu * 1e3:9.1f} us   CPU enqueue {cpu * 1e3:7.1f} us{bw}", flush=True)


def dropout_variants() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def drop_where(src_ptr, out_ptr, bits_ptr, n, threshold, seed, GROUPS: tl.constexpr,
                   ROUNDS: tl.constexpr):  # fmt: skip
        groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        r0, r1, r2, r3 = tl.randint4x(seed, groups.to(tl.int32), ROUNDS)
        j = tl.arange(0, 8)[None, :]
        word = tl.where(
            j < 2,
            r0[:, None],
            tl.where(j < 4, r1[:, None], tl.where(j < 6, r2[:, None], r3[:, None])),
        )
        half = tl.where(j % 2 == 0, word & 0xFFFF, (word >> 16) & 0xFFFF).to(tl.int32)
        offs = groups[:, None] * 8 + j
        inside = offs < n
        kept = (half >= threshold) & inside
        x = tl.load(src_ptr + offs, mask=inside, other=0)
        tl.store(out_ptr + offs, tl.where(kept, x, tl.zeros_like(x)), mask=inside)
        byte = tl.sum(kept.to(tl.int32) << j, axis=1)
        tl.store(bits_ptr + groups, byte.to(tl.uint8), mask=groups * 8 < n)

    @triton.jit
    def copy_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

    return {"where": drop_where, "copy": copy_kernel, "cdiv": triton.cdiv}


def probe_dropout(reps: int) -> None:
    from loraforge.fast import kernels as lk

    lk.triton_kernels()
    v = dropout_variants()
    launch = v["cdiv"]
    thr = round(0.1 * 65536)
    print("dropout (p=0.1), bf16:", flush=True)
    for cols in (HIDDEN, INTER):
        x = torch.randn(TOKENS, cols, device="cuda", dtype=torch.bfloat16)
        n = x.numel()
        nbytes = n * 4 + n // 8
        out = torch.empty_like(x)
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device="cuda")
        print(f" {TOKENS} x {cols}:", flush=True)
        report("loraforge drop (as shipped)", *timed(partial(lk.drop, x, 0.1, 12345), reps), nbytes)
        big = 2**61 + 12345  # seeds as training draws them: 64-bit
        report("  the same, a 64-bit seed", *timed(partial(lk.drop, x, 0.1, big), reps), nbytes)
        ref = lk.drop(x, 0.1, 12345)[1]
        shipped = lk.triton_kernels().drop  # the tl.join layout
        for name, kernel in (("where", v["where"]), ("join", shipped)):
            for rounds in (10, 7):
                for groups, warps in ((512, 4), (1024, 8), (256, 4)):
                    go = partial(
                        kernel[(launch(n, 8 * groups),)], x, out, bits, n, thr, 12345,
                        GROUPS=groups, ROUNDS=rounds, num_warps=warps,
                    )  # fmt: skip
                    label = f"{name} rounds={rounds} groups={groups} warps={warps}"
                    report(label, *timed(go, reps), nbytes)
        report(
            "apply_bits (reads the mask)", *timed(partial(lk.apply_mask_bits, x, ref), reps), nbytes
        )
        copy = partial(v["copy"][(launch(n, 4096),)], x, out, n, BLOCK=4096)
        report("plain copy (bandwidth)", *timed(copy, reps), n * 4)
        frac = 1.0 - float(lk.dropout_mask(x, 0.1, 7).float().mean())
        print(f"   shipped kernel drop fraction {frac:.5f} (p 0.1)", flush=True)


def probe_dequant(reps: int) -> None:
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    print("NF4 dequantization (double quantization, blocks of 64), to bf16:", flush=True)
    for rows, cols in ((QKV, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)):
        w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8
        )
        flat_state = bnbf.QuantState(
            absmax=bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset,
            shape=state.shape, dtype=state.dtype, blocksize=64, code=state.code, quant_type="nf4",
        )  # fmt: skip
        nbytes = rows * cols * 2 + rows * cols // 2
        print(f" {rows} x {cols}:", flush=True)
        ref = bnbf.dequantize_4bit(packed, state)
        theirs = partial(bnbf.dequantize_4bit, packed, state)
        report("bitsandbytes dequantize_4bit", *timed(theirs, reps), nbytes)
        flat = partial(bnbf.dequantize_4bit, packed, flat_state)
        report("bitsandbytes, scales pre-dequantized", *timed(flat, reps), nbytes)
        ours = partial(nf4.dequantize, packed, state, torch.bfloat16)
        report("loraforge nf4.dequantize", *timed(ours, reps), nbytes)
        mine = ours()
        diff = float((mine.float() - ref.float()).abs().max())
        print(f"   loraforge equal to bitsandbytes: {torch.equal(mine, ref)} (max diff {diff:.3g})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="dropout,dequant")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name in args.only.split(","):
        try:
            {"dropout": probe_dropout, "dequant": probe_dequant}[name](args.reps)
        except Exception as exc:  # one probe's failure must not hide the others
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
