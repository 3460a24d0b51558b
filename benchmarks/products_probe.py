"""Micro-benchmarks of a LoRA layer's matrix products on one CUDA GPU (not run in CI).

For Phi-4's four adapted shapes (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``), at
1,024 and 2,048 tokens, prints the GPU time (CUDA events around 30 calls after 5) of:

* the base product alone; loraforge's NF4 dequantization of the same weight alone
  (:mod:`loraforge.fast.nf4`; for the small weights this loop is bound by the CPU's launch of
  the Triton kernel, so the time is an upper bound); the two one after the other; and the
  dequantization on a side stream while the product runs, with how much of the dequantization
  that hid (session 8: none, reliably: the products fill the GPU);
* the adapter's up-projection added to the base product two ways: the base product first and the
  rank-r term added by a second product (``F.linear(x, W).addmm_(z, B^T)``, what loraforge did
  before session 8), and the rank-r term first with the base product added by its epilogue
  (``z.mm(B^T).addmm_(x, W^T)``, what it does now), with each one's largest error against a
  float32 reference.

Usage: ``python benchmarks/products_probe.py`` (needs bitsandbytes and Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (7680, 5120), "o": (5120, 5120), "gate_up": (35840, 5120), "down": (5120, 17920)}


def gpu_us(fn, reps: int = 30, warm: int = 5) -> float:
    """Mean GPU time of ``fn`` in microseconds (CUDA events around ``reps`` calls)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def main() -> None:
    import bitsandbytes.functional as bnbf

    from loraforge.fast import nf4

    dev = torch.device("cuda")
    torch.manual_seed(0)
    weights, quantized = {}, {}
    for name, (out_f, in_f) in SHAPES.items():
        w = (torch.randn(out_f, in_f, device=dev) * 0.02).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8
        )
        quantized[name] = (packed, state)
        weights[name] = nf4.dequantize(packed, state, torch.bfloat16)
    print("loraforge's dequantization kernel in use:", nf4.kernel_available(dev))
    side = torch.cuda.Stream()
    for tokens in (1024, 2048):
        x = {
            k: torch.randn(tokens, i, device=dev, dtype=torch.bfloat16)
            for k, (_, i) in SHAPES.items()
        }
        print(f"--- {tokens} tokens")
        for name in SHAPES:
            packed, state = quantized[name]
            xs, w = x[name], weights[name]
            product = gpu_us(lambda xs=xs, w=w: F.linear(xs, w))
            dequant = gpu_us(lambda p=packed, s=state: nf4.dequantize(p, s, torch.bfloat16))
            moved = packed.numel() * 5  # one byte read, four written, per packed byte

            def both(p=packed, s=state, xs=xs, w=w):
                nf4.dequantize(p, s, torch.bfloat16)
                F.linear(xs, w)

            def overlapped(p=packed, s=state, xs=xs, w=w):
                current = torch.cuda.current_stream()
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    nf4.dequantize(p, s, torch.bfloat16)
                F.linear(xs, w)
                current.wait_stream(side)

            seq, conc = gpu_us(both), gpu_us(overlapped)
            print(
                f"{name:8s} product {product:7.1f} us  dequantize {dequant:7.1f} us "
                f"({moved / dequant / 1e6:4.2f} TB/s)  one after the other {seq:7.1f}  "
                f"side stream {conc:7.1f}  hidden {100 * (product + dequant - conc) / dequant:5.1f}%"
            )
        for name in ("qkv", "gate_up"):
            out_f, _ = SHAPES[name]
            xs, w = x[name], weights[name]
            z = torch.randn(tokens, 8, device=dev, dtype=torch.bfloat16)
            b = torch.randn(out_f, 8, device=dev, dtype=torch.bfloat16)
            ref = xs.float() @ w.float().t() + z.float() @ b.float().t()
            before = gpu_us(lambda xs=xs, w=w, z=z, b=b: F.linear(xs, w).addmm_(z, b.t()))
            now = gpu_us(lambda xs=xs, w=w, z=z, b=b: z.mm(b.t()).addmm_(xs, w.t()))
            err_before = (F.linear(xs, w).addmm_(z, b.t()).float() - ref).abs().max().item()
            err_now = (z.mm(b.t()).addmm_(xs, w.t()).float() - ref).abs().max().item()
            print(
                f"up-projection {name}: base product, then the rank-r term {before:.1f} us "
                f"(error {err_before:.3g}); the rank-r term, then the base product by its epilogue "
                f"{now:.1f} us (error {err_now:.3g})"
            )


if __name__ == "__main__":
    main()
