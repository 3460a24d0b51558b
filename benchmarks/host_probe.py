"""Host (CPU) cost per call of the operations a lean training step launches, on a CUDA GPU.

The fast path's step is bound by the CPU launching work (``docs/benchmarks.md``). This script
times, on tensors small enough that the GPU is never the bottleneck, how many microseconds of host
time one call of each operation costs: a torch element-wise op and matrix product for scale, each
Triton kernel of :mod:`loraforge.fast.kernels` and :mod:`loraforge.fast.nf4` through loraforge's
launch helpers, bitsandbytes' dequantization, and one forward and backward of the lean LoRA
functions on a 16-bit and on a 4-bit weight.

    python benchmarks/host_probe.py [--calls 2000]

Each line: the operation, host microseconds per call (median of 5 rounds of ``--calls`` calls,
the device synchronised once per round, after the timer stops; the GPU's own time per call
printed beside it shows it stayed ahead of the host).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host us per call, GPU us per call): median over 5 rounds."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        host.append((t1 - t0) / calls * 1e6)
        gpu.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(host), statistics.median(gpu)


def _module_rows(x: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """One PEFT LoRA layer on a bf16 and on an NF4 base, through loraforge's installed forward
    (guards included): forward only, and forward + backward."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from loraforge.fast.lora_ops import fuse_lora_forward

    class Holder(nn.Module):
        def __init__(self, proj: nn.Module) -> None:
            super().__init__()
            self.proj = proj

    dense = nn.Linear(512, 512, bias=False)
    q = bnb.nn.Linear4bit(
        512, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
        compress_statistics=True,
    )  # fmt: skip
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)  # fmt: skip
    rows: list[tuple[str, Callable[[], object]]] = []
    for label, base in (("bf16", dense.to(torch.bfloat16)), ("nf4", q)):
        model = Holder(base).cuda()
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["proj"])
        peft_model = get_peft_model(model, cfg)
        fuse_lora_forward(peft_model, verify=False)
        layer = peft_model.base_model.model.proj
        xg = x.clone().requires_grad_()

        def fwd(layer: nn.Module = layer) -> object:
            with torch.no_grad():
                return layer(x)

        def both(layer: nn.Module = layer, xg: torch.Tensor = xg) -> object:
            out = layer(xg)
            out.sum().backward()
            return out

        rows.append((f"PEFT layer ({label} base) via loraforge, forward no grad", fwd))
        rows.append((f"PEFT layer ({label} base) via loraforge, fwd+bwd", both))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    from loraforge.fast import kernels, lora_ops, nf4

    dev = torch.device("cuda")
    dt = torch.bfloat16
    x = torch.randn(64, 512, device=dev, dtype=dt)
    gu = torch.randn(64, 1024, device=dev, dtype=dt)
    w = torch.randn(512, 512, device=dev, dtype=dt)
    norm_w = torch.rand(512, device=dev, dtype=dt) + 0.5
    k = kernels.triton_kernels()
    _, bits = kernels.drop(x, 0.1, 3)
    y, rstd = kernels.rms_norm(x, norm_w, 1e-5)
    rows: list[tuple[str, Callable[[], object]]] = [
        ("torch x.mul_(1.0)", lambda: x.mul_(1.0)),
        ("torch x.to(float32)", lambda: x.to(torch.float32)),
        ("torch mm 64x512 @ 512x512", lambda: x.mm(w)),
        ("torch.randint().item() (new_seed)", lora_ops.new_seed),
        ("triton swiglu", lambda: kernels.swiglu(gu)),
        ("triton swiglu_backward", lambda: kernels.swiglu_backward(gu, x)),
        ("triton drop (p=0.1)", lambda: kernels.drop(x, 0.1, 3)),
        ("triton keep from bits", lambda: kernels.keep(x, 0.1, 3, bits)),
        ("triton rms_norm", lambda: kernels.rms_norm(x, norm_w, 1e-5)),
        ("triton rms backward", lambda: kernels.rms_norm_backward_from_output(x, y, norm_w, rstd)),
    ]
    if k is not None:  # the same kernel launched straight from Triton's JIT object
        n = gu.shape[-1] // 2
        out = torch.empty(64, n, device=dev, dtype=dt)
        rows.append(
            (
                "triton swiglu_fwd[grid](...) bare",
                lambda: k.swiglu_fwd[(64, 1)](gu, out, n, BLOCK=1024),
            )
        )
    a = (torch.randn(8, 512, device=dev, dtype=dt) * 0.1).requires_grad_()
    b = (torch.randn(512, 8, device=dev, dtype=dt) * 0.1).requires_grad_()
    xg = x.clone().requires_grad_()

    def lora(weight: object) -> Callable[[], object]:
        def step() -> object:
            out = lora_ops.LoraLinearFunction.apply(xg, weight, None, a, b, 2.0, 0.1, 5)
            out.sum().backward()
            return out

        return step

    def lora_fwd(weight: object) -> Callable[[], object]:
        def step() -> object:
            with torch.no_grad():
                return lora_ops.LoraLinearFunction.apply(x, weight, None, a, b, 2.0, 0.1, 5)

        return step

    rows.append(("LoraLinearFunction fwd+bwd bf16 weight (+sum, backward)", lora(w)))
    rows.append(("LoraLinearFunction forward, no grad, bf16 weight", lora_fwd(w)))
    try:
        import bitsandbytes.functional as bnbf

        from loraforge.fast.quant import FrozenNF4

        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        rows.append(
            ("bitsandbytes dequantize_4bit (nested)", lambda: bnbf.dequantize_4bit(packed, state))
        )
        rows.append(
            ("loraforge nf4.dequantize (nested)", lambda: nf4.dequantize(packed, state, dt))
        )
        frozen = FrozenNF4(packed, state, dt)
        rows.append(("FrozenNF4.dense()", frozen.dense))
        rows.append(("LoraLinearFunction fwd+bwd nf4 weight", lora(frozen)))
        rows.append(("LoraLinearFunction forward, no grad, nf4 weight", lora_fwd(frozen)))

        class Cached:  # a 4-bit-like weight whose dense() dequantizes nothing
            def dense(self) -> torch.Tensor:
                return w

        rows.append(("LoraLinearFunction forward, no grad, object giving w", lora_fwd(Cached())))
        rows.append(("F.linear(x, w)", lambda: torch.nn.functional.linear(x, w)))
        rows.append(
            (
                "F.linear(x, FrozenNF4.dense())",
                lambda: torch.nn.functional.linear(x, frozen.dense()),
            )
        )
        rows.append(("lora_ops._lora_down (p=0.1)", lambda: lora_ops._lora_down(x, a, 2.0, 0.1, 5)))
        rows += _module_rows(x)
    except ImportError as exc:
        print(f"bitsandbytes rows skipped: {exc}")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    for name, fn in rows:
        host, gpu = _time(fn, args.calls)
        print(f"{name:58s} host {host:8.1f} us/call   gpu {gpu:8.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
