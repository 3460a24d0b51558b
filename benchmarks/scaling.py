"""Phi-4 LoRA throughput on 1 to 8 GPUs of one host: loraforge (one process, DDP, FSDP2, under
each launcher) and TRL + Liger, each launch side by side in one invocation.

Each row is one launch (``torchrun`` or ``accelerate launch``, or a plain process) of this file in
``--worker`` mode on a random-initialised model of Phi-4's shape over the huanhuan data (the same
setup as ``benchmarks/throughput.py``). Every process counts the real tokens of its micro-batches
over the timed optimizer steps; the row's rate is all processes' tokens over the slowest
process's time. Printed per row: tokens/s, the scaling over the first row's rate, the largest
peak GiB of any process, and loraforge's plan. Results go to
``benchmarks/results/<card>-<date>-scaling.json``.

    python benchmarks/scaling.py --assets .gpu --rows one,torchrun1,accelerate1,fsdp2x1
    python benchmarks/scaling.py --assets .gpu --rows one,ddp2,trl2,fsdp2x2@24
    python benchmarks/scaling.py --assets .gpu --rows one,torchrun1,accelerate1 --abba 2

Rows: ``one`` (a plain process), ``torchrunN`` / ``accelerateN`` (loraforge, ``distributed:
auto``, N processes under that launcher), ``ddpN`` (``distributed: ddp`` under torchrun),
``fsdp2xN`` (``distributed: fsdp2`` under torchrun), ``trlN`` (TRL + Liger under ``accelerate
launch``); ``@G`` caps each process at G GiB (``torch.cuda.set_per_process_memory_fraction``,
emulating a G GB card, and ``max_memory_gib: G``), and the model is then built in the CPU's
memory and placed by loraforge (whole for DDP, sharded for FSDP2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

WARMUP, STEPS = 4, 24


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(args: argparse.Namespace) -> None:
    import throughput as tp
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available()
    model = None
    if gpu:
        torch.cuda.set_device(local)
        if args.cap_gib and args.setup != "trl":  # built on the GPU (fast), then kept in
            model = tp.build_model(args.assets).to("cpu")  # the CPU's memory, as if loaded
            torch.cuda.empty_cache()
        if args.cap_gib:
            total = torch.cuda.get_device_properties(local).total_memory
            torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, local)
        torch.cuda.reset_peak_memory_stats()
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        import yaml

        overrides[k] = yaml.safe_load(v)
    if args.cap_gib:
        overrides.setdefault("max_memory_gib", args.cap_gib)
    with tempfile.TemporaryDirectory() as tmp:
        if args.setup == "trl":
            result = tp.run_trl_liger(args.assets, args.warmup, args.steps, Path(tmp))
        else:  # on this process's GPU (the current device), or the model built above
            run = Path(tmp) / "run"
            result = tp.run_loraforge(args.assets, args.warmup, args.steps, run, model, **overrides)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
    every = [result]
    if dist.is_available() and dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, result)
    if int(os.environ.get("RANK", "0")) == 0:
        row = {
            "processes": len(every),
            "tokens_per_s": sum(r["timed_tokens"] for r in every)
            / max(r["timed_s"] for r in every),
            "peak_gib": max(r["peak_gib"] for r in every),
            "per_process_tokens_per_s": [round(r["tokens_per_s"]) for r in every],
            "step_s_median": max(r["step_s_median"] or 0.0 for r in every),
            "timed_tokens": sum(r["timed_tokens"] for r in every),
            "timed_steps": every[0]["timed_steps"],
            "fast_path": every[0].get("fast_path", ""),
        }
        print("RESULT " + json.dumps(row), flush=True)


ROW = re.compile(r"^(one|torchrun|accelerate|ddp|fsdp2x|trl)(\d*)(?:@(\d+))?$")


def command(row: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    m = ROW.match(row)
    if not m:
        raise SystemExit(f"unknown row {row!r}: see --help")
    kind, n, cap = m.group(1), int(m.group(2) or 1), m.group(3)
    me = [__file__, "--worker", "--assets", str(args.assets)]
    me += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    if cap:
        me += ["--cap-gib", cap]
    sets = {"ddp": ["distributed=ddp"], "fsdp2x": ["distributed=fsdp2"]}.get(kind, [])
    for s in [*sets, *args.set]:
        me += ["--set", s]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(_port()), "--num_processes", str(n)]
    accelerate += ["--multi_gpu"] if n > 1 else []
    if kind == "one":
        cmd = [sys.executable, *me]
    elif kind == "trl":
        cmd = [*accelerate, *me, "--setup", "trl"]
    elif kind == "accelerate":
        cmd = [*accelerate, *me]
    else:
        cmd = [*torchrun, "--nproc_per_node", str(n), *me]
    return cmd, {"row": row, "launcher": kind, "processes": n, "cap_gib": cap}


def schedule(rows: list[str], rounds: int) -> list[str]:
    """The rows in order, or with ``rounds`` > 0 interleaved ABBA-style (``a,b,b,a`` per round
    for two rows; the order, then its reverse, for more), so that a host's drift over the call
    falls on every row alike."""
    if rounds <= 0:
        return rows
    return [r for _ in range(rounds) for r in (*rows, *reversed(rows))]


def summarise(rows: list[dict]) -> None:
    """Per row: the runs' mean tokens/s and spread, and the mean against the first row's mean;
    per round-trip pair (each row against the first row's run beside it), the ratios."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["row"], []).append(r["tokens_per_s"])
    if not by:
        return
    first = next(iter(by))
    base = sum(by[first]) / len(by[first])
    med = {n: [r["step_s_median"] for r in rows if r["row"] == n] for n in by}
    for name, rates in by.items():
        mean = sum(rates) / len(rates)
        step = sum(med[name]) / len(med[name])
        base_step = sum(med[first]) / len(med[first])
        print(
            f"mean {name:<14} {mean:>8.0f} tok/s over {len(rates)} runs "
            f"(min {min(rates):.0f}, max {max(rates):.0f})  x{mean / base:.3f} of {first}; "
            f"median step {step:.3f} s (x{base_step / step:.3f})",
            flush=True,
        )
    for name in list(by)[1:]:  # pairs in run order: each run of `name` with its neighbour
        pairs = []
        for i, r in enumerate(rows):
            if r["row"] != name:
                continue
            near = [x for x in rows[max(0, i - 1) : i + 2] if x["row"] == first]
            if near:
                pairs.append(r["tokens_per_s"] / near[0]["tokens_per_s"])
        if pairs:
            print(
                f"pairs {name}/{first}: " + ", ".join(f"{x:.3f}" for x in pairs),
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--rows", default="one,torchrun1,accelerate1")
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--set", action="append", default=[], help="loraforge recipe override k=v")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per row")
    ap.add_argument(
        "--abba",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="run the rows interleaved, ROUNDS times forward then backward (a,b,b,a), and print "
        "each row's mean against the first row's and the ratio of each neighbouring pair",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setup", default="loraforge", help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("loraforge").setLevel(logging.INFO)
        worker(args)
        return

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    print(f"card {card} x{gpus}; torch {torch.__version__}", flush=True)
    rows = []
    for row in schedule(args.rows.split(","), args.abba):
        cmd, info = command(row, args)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=os.environ, timeout=args.timeout
            )
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = (
                (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            )
            err = (
                (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            )
            err += f"\nTIMEOUT after {args.timeout}s"
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{row}: FAILED ({time.perf_counter() - t0:.0f}s)\n{out[-2000:]}\n{err[-5000:]}")
            continue
        plan = [x for x in err.splitlines() if x.startswith("loraforge.")]
        print("\n".join(f"  {x}" for x in plan[-8:]), flush=True)
        r = {**info, **json.loads(line[7:]), "wall_s": time.perf_counter() - t0}
        r["scaling"] = r["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(r)
        print(
            f"{row:<14} {r['tokens_per_s']:>8.0f} tok/s  x{r['scaling']:.3f}  "
            f"peak {r['peak_gib']:.1f} GiB  median step {r['step_s_median']:.3f} s  "
            f"per process {r['per_process_tokens_per_s']}  "
            f"{r['fast_path']}",
            flush=True,
        )
    if args.abba:
        summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{card.replace(' ', '-')}-{dt.date.today().isoformat()}-scaling.json"
    path.write_text(json.dumps({"card": card, "gpus": gpus, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
