"""The wide rank-r products of one Phi-4 decoder layer (its four projections) at 1,024 tokens:
cuBLAS and the mask kernel, as the lean functions ran them before :mod:`loraforge.fast.lowrank`,
against its kernel at several tiles. GPU only; bf16; graphed timing, us a call.

    python benchmarks/lowrank_probe.py [--tokens 1024] [--best FILE]

Per projection: the forward's ``z B^T`` and the backward's ``keep(gz A)`` (the mask from the
dropout kernel's bits). Each tile's results are checked first (against the exact product, at a
rounding of the terms' size; the masked one against the mask kernel applied to the unmasked one,
exactly), and each call is checked to take the kernel. The last line names the fastest tile (also
written to ``--best`` as JSON)."""

from __future__ import annotations

import argparse
import json

import torch
from launch_probe import graphed_time  # this folder's: GPU us a call, from a CUDA graph

from loraforge.fast import kernels, lowrank

_PROJECTIONS = (
    ("qkv", 5120, 7680),
    ("o", 5120, 5120),
    ("gate_up", 5120, 35840),
    ("down", 17920, 5120),
)
_TILES = ((32, 256, 4), (64, 128, 4), (16, 512, 4), (32, 128, 4), (64, 256, 4), (32, 256, 8))  # fmt: skip


def _cases(tokens: int) -> list[dict]:
    torch.manual_seed(0)
    seed = torch.randint(0, 2**62, (1,), device="cuda")
    out = []
    for name, k, n in _PROJECTIONS:
        ones = torch.ones(tokens, k, device="cuda", dtype=torch.bfloat16)
        _, bits = kernels.drop(ones, 0.1, seed)
        out.append(
            dict(
                name=name,
                a=torch.randn(8, k, device="cuda", dtype=torch.bfloat16),
                b=torch.randn(n, 8, device="cuda", dtype=torch.bfloat16),
                z=torch.randn(tokens, 8, device="cuda", dtype=torch.bfloat16),
                seed=seed,
                bits=bits,
            )
        )
    return out


def _before(c: dict):
    a, b, z, seed, bits = c["a"], c["b"], c["z"], c["seed"], c["bits"]
    return lambda: (z.mm(b.t()), kernels.keep(z.mm(a), 0.1, seed, bits, inplace=True))


def _now(c: dict):
    a, b, z, bits = c["a"], c["b"], c["z"], c["bits"]
    return lambda: (lowrank.up(z, b.t()), lowrank.up(z, a, bits))


def _check(c: dict) -> None:
    a, b, z, seed, bits = c["a"], c["b"], c["z"], c["seed"], c["bits"]
    assert lowrank._fits(z, b.t(), None) and lowrank._fits(z, a, bits), c["name"]
    got = lowrank.up(z, b.t())
    exact = z.double().mm(b.double().t())
    scale = z.double().abs().mm(b.double().abs().t())
    assert bool(((got.double() - exact).abs() <= scale * 2.0**-8 + 1e-6).all()), c["name"]
    assert torch.equal(lowrank.up(z, a, bits), kernels.keep(lowrank.up(z, a), 0.1, seed, bits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--best", default=None, help="write the fastest tile here (JSON)")
    args = ap.parse_args()
    assert lowrank.kernel_available(torch.device("cuda")), "the kernel failed its check"
    cases = _cases(args.tokens)
    before = [graphed_time(_before(c)) for c in cases]
    results = []
    for tile in _TILES:
        lowrank._UP_TILE = tile
        for c in cases:
            _check(c)
        parts = [graphed_time(_now(c)) for c in cases]
        results.append((sum(parts), tile))
        print(
            f"up {tile}: a layer {sum(before):.1f} -> {sum(parts):.1f} us ("
            + ", ".join(
                f"{c['name']} {t0:.1f}->{t:.1f}"
                for c, t0, t in zip(cases, before, parts, strict=True)
            )
            + ")",
            flush=True,
        )
    fastest, tile = min(results)
    print(f"cuBLAS and the mask kernel {sum(before):.1f} us a layer; fastest {tile} {fastest:.1f}")
    print("BEST " + json.dumps({"up": tile}), flush=True)
    if args.best:
        with open(args.best, "w") as f:
            json.dump({"up": tile}, f)


if __name__ == "__main__":
    main()
