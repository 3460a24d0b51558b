"""Launch settings of the lean path's Triton kernels and of the NF4 dequantization, on one CUDA GPU
(not run in CI).

For Phi-4's shapes at ``--tokens`` tokens (1,024 by default: QLoRA's graphed rows under a 16 GiB
cap), prints the GPU time per call (20 calls captured in a CUDA graph and replayed, so launches
cost nothing) of each kernel under several programs sizes and warp counts, and marks with ``!``
a setting whose result differs from the shipped one:

* ``dequant``: loraforge's NF4 kernel (:mod:`loraforge.fast.nf4`) on the four weights of a decoder
  layer, with a plain copy of ``gate_up_proj``'s bf16 weight as the bandwidth reference;
* ``kernels``: the dropout kernel, the mask-reading kernel, SwiGLU forward and backward and the
  RMSNorm forward and backward (:mod:`loraforge.fast.kernels`).

Session 9 (docs/benchmarks.md) moved the dequantization to 2 warps from this sweep.

Usage: ``python benchmarks/launch_probe.py [--only dequant,kernels] [--tokens 1024]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

HIDDEN, INTER = 5120, 17920
WEIGHTS = {"qkv": (7680, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN)}
WEIGHTS["down"] = (HIDDEN, INTER)


def launch(kernel: Any, grid: tuple, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` (bound with ``functools.partial`` for :func:`graphed_time`)."""
    kernel[grid](*args, **meta)


def graphed_time(fn: Callable[[], Any], calls: int = 20, replays: int = 10) -> float:
    """GPU µs per call of ``fn``, from a CUDA graph of ``calls`` calls replayed ``replays`` times."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays) * 1e3


def dequant() -> None:
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    k = nf4._build()
    big = torch.empty(2 * INTER * HIDDEN, dtype=torch.bfloat16, device="cuda")
    t = graphed_time(lambda: big.clone())
    print(f"copy of gate_up_proj's bf16 weight: {t:.1f} us, {4 * big.numel() / t / 1e6:.2f} TB/s")
    settings = [(b, w) for b in (512, 1024, 2048, 4096) for w in (1, 2, 4, 8)]
    total = dict.fromkeys(settings, 0.0)
    for name, (rows, cols) in WEIGHTS.items():
        w = torch.randn(rows, cols, device="cuda").mul_(0.02).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8
        )
        ref = nf4.dequantize(packed, state, torch.bfloat16)
        line = [f"{name:8s}"]
        n, s2 = packed.numel(), state.state2
        offset = state.offset.reshape(1).to(device="cuda", dtype=torch.float32)
        tables = (state.absmax, s2.code, s2.absmax, offset, state.code)
        for b, warps in settings:
            out = torch.empty_like(ref)
            run = partial(
                launch, k.dequantize, ((n + b - 1) // b,), packed, *tables, out, n,
                NESTED=True, BLOCK2=s2.blocksize, BYTES=b, num_warps=warps, enable_fp_fusion=False,
            )  # fmt: skip
            t = graphed_time(run)
            total[(b, warps)] += t
            line.append(f"{b}/{warps} {t:.1f}{'' if torch.equal(out, ref) else '!'}")
        print("  ".join(line), flush=True)
    best = sorted(total.items(), key=lambda kv: kv[1])
    print(
        "a layer's four weights (bytes/warps: us): "
        + "  ".join(f"{b}/{w} {t:.0f}" for (b, w), t in best)
    )


def kernels(tokens: int) -> None:
    from loraforge.fast import kernels as lean

    k = lean.triton_kernels()
    if k is None:
        raise SystemExit("the lean path's Triton kernels are not available here")
    for width in (HIDDEN, INTER):
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
        n = x.numel()
        ref, bits = lean._triton_drop(k, x, 0.1, 7)
        out, got = torch.empty_like(x), torch.empty_like(bits)
        line = [f"dropout, {width} wide:"]
        for groups in (128, 256, 512):
            for warps in (2, 4, 8):
                grid = (k.cdiv(n, 8 * groups),)
                drop = partial(launch, k.drop, grid, x, out, got, n, 6554, 7, GROUPS=groups,
                               num_warps=warps)  # fmt: skip
                t = graphed_time(drop)
                same = torch.equal(out, ref) and torch.equal(got, bits)
                line.append(f"{groups}/{warps} {t:.1f}{'' if same else '!'}")
        print("  ".join(line), flush=True)
        masked = lean._triton_apply_bits(k, x, bits, inplace=False)
        line = [f"mask bits, {width} wide:"]
        for groups in (256, 512, 1024):
            for warps in (2, 4, 8):
                grid = (k.cdiv(n, 8 * groups),)
                apply = partial(launch, k.apply_bits, grid, x, out, bits, n, GROUPS=groups,
                                num_warps=warps)  # fmt: skip
                t = graphed_time(apply)
                line.append(f"{groups}/{warps} {t:.1f}{'' if torch.equal(out, masked) else '!'}")
        print("  ".join(line), flush=True)
    gu = torch.randn(tokens, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, INTER, device="cuda", dtype=torch.bfloat16)
    act, dgu = torch.empty_like(g), torch.empty_like(gu)
    ref_act, ref_dgu = lean.swiglu(gu), lean.swiglu_backward(gu, g)
    for name in ("forward", "backward"):
        line = [f"SwiGLU {name}:"]
        for block in (512, 1024, 2048, 4096):
            for warps in (2, 4, 8):
                grid = (tokens, k.cdiv(INTER, block))
                swiglu = (
                    partial(launch, k.swiglu_fwd, grid, gu, act, INTER, BLOCK=block,
                            num_warps=warps)
                    if name == "forward"
                    else partial(launch, k.swiglu_bwd, grid, gu, g, dgu, INTER, BLOCK=block,
                                 num_warps=warps)
                )  # fmt: skip
                t = graphed_time(swiglu)
                same = torch.equal(act, ref_act) if name == "forward" else torch.equal(dgu, ref_dgu)
                line.append(f"{block}/{warps} {t:.1f}{'' if same else '!'}")
        print("  ".join(line), flush=True)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    y, rstd = lean.rms_norm(x, weight, 1e-5)
    grad, dx = g[:, :HIDDEN].contiguous(), torch.empty_like(x)
    for name in ("forward", "backward"):
        line = [f"RMSNorm {name} (differences: the reduction's order):"]
        for warps in (4, 8, 16):
            rms = (
                partial(launch, k.rms_fwd, (tokens,), x, weight, y, rstd, HIDDEN, 1e-5,
                        BLOCK=8192, num_warps=warps)
                if name == "forward"
                else partial(launch, k.rms_bwd, (tokens,), y, grad, weight, rstd, dx, HIDDEN,
                             BLOCK=8192, num_warps=warps)
            )  # fmt: skip
            line.append(f"8192/{warps} {graphed_time(rms):.1f}")
        print("  ".join(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="dequant,kernels")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"card {torch.cuda.get_device_name()}; {args.tokens} tokens", flush=True)
    chosen = args.only.split(",")
    if "dequant" in chosen:
        dequant()
    if "kernels" in chosen:
        kernels(args.tokens)


if __name__ == "__main__":
    main()
