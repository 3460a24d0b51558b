"""Benchmark of `SFTDatasetBuilder.build`: the real data set, then scaling on synthetic data.

1. Builds ``huanhuan.json`` (3,729 alpaca records) with Phi-4's real tokenizer, as the tutorial
   does (template phi-4, its system prompt, ``max_length=384``, ``input_separator=""``), and prints
   the wall time and records/s.
2. Writes a seeded 200,000-record synthetic alpaca JSONL (random strings drawn from huanhuan's own
   character frequencies plus ASCII words, with lengths drawn from huanhuan's length
   distribution) to a temporary folder, and builds its first 25k, 50k, 100k and 200k records,
   printing records/s for each: a flat records/s column means the build scales linearly.

Only ``.build()`` is timed (the tokenizer is loaded and ``datasets`` imported beforehand); each
size is built ``--repeat`` times (default 2) and the best time is shown, since shared hosts are
noisy.

Usage (from the repository root)::

    python3 benchmarks/data_build.py [--phi4 ../shared/phi4] [--data ../shared/data/huanhuan.json]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import random
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
ASCII_WORDS = ["OK", "Hello", "the", "AI", "LoRA", "phi-4", "2024", "ok?", "yes", "no", "Qwen"]


def make_builder(tokenizer, max_length: int):
    from loraforge import SFTDatasetBuilder

    return SFTDatasetBuilder(
        tokenizer, "phi-4", max_length=max_length, system_prompt=SYSTEM_PROMPT, input_separator=""
    )


def timed_build(tokenizer, source: Path, max_length: int) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (all threads of this process) and the report of one build."""
    builder = make_builder(tokenizer, max_length)
    gc.collect()
    cpu, start = time.process_time(), time.perf_counter()
    builder.build(source)
    return time.perf_counter() - start, time.process_time() - cpu, builder.report


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic_records(real: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` alpaca records whose field lengths and characters follow ``real``'s."""
    rng = random.Random(seed)
    counts = Counter(ch for r in real for k in ("instruction", "output") for ch in r[k])
    chars = list(counts)
    cum_weights = list(itertools.accumulate(counts.values()))
    ins_lens = [len(r["instruction"]) for r in real]
    inp_lens = [len(r["input"]) for r in real]
    out_lens = [len(r["output"]) for r in real]

    def text(length: int) -> str:
        out = rng.choices(chars, cum_weights=cum_weights, k=length)
        for _ in range(length // 40):  # now and then an ASCII word, as in real chat data
            out[rng.randrange(length)] = rng.choice(ASCII_WORDS)
        return "".join(out)

    return [
        {
            "instruction": text(max(1, rng.choice(ins_lens))),
            "input": text(rng.choice(inp_lens)),
            "output": text(max(1, rng.choice(out_lens))),
        }
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phi4", type=Path, default=SHARED / "phi4", help="Phi-4 tokenizer folder")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "huanhuan.json")
    parser.add_argument("--records", type=int, default=200_000, help="synthetic records to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=2, help="builds per size; the best is shown (noisy hosts)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import datasets  # imported up front: the import is not part of a build
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    import loraforge

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(args.phi4))
    print(
        f"loraforge {loraforge.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, datasets {datasets.__version__}"
    )
    print(f"tokenizer {args.phi4} loaded in {time.perf_counter() - start:.2f} s")

    # 1. the real data set
    real = json.loads(args.data.read_text(encoding="utf-8"))
    timed_build(tokenizer, args.data, args.max_length)  # warm-up (first-call costs)
    runs = [timed_build(tokenizer, args.data, args.max_length) for _ in range(3)]
    best, cpu, report = min(runs, key=lambda r: r[0])
    print(
        f"\n{args.data.name}: {report.records_read} records read, {report.built} built, "
        f"{len(report.dropped)} dropped, {len(report.truncated)} truncated, "
        f"{report.tokens_emitted} tokens"
    )
    print(
        f"  build wall time: best {best:.3f} s of {[round(r[0], 3) for r in runs]} "
        f"(cpu {cpu:.3f} s)  ->  {report.records_read / best:,.0f} records/s, "
        f"{report.tokens_emitted / best:,.0f} tokens/s"
    )

    # 2. synthetic scaling
    with tempfile.TemporaryDirectory(prefix="loraforge-bench-") as tmp:
        start = time.perf_counter()
        records = synthetic_records(real, args.records, args.seed)
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        del records
        full = Path(tmp) / f"synthetic_{args.records}.jsonl"
        full.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(
            f"\nsynthetic alpaca JSONL: {args.records:,} records, "
            f"{full.stat().st_size / 2**20:.1f} MiB, written in {time.perf_counter() - start:.1f} s"
            f" (seed {args.seed})"
        )
        print(
            f"  {'records':>8}  {'wall s':>7}  {'records/s':>9}  {'cpu s':>7}  "
            f"{'records/cpu-s':>13}  {'tokens/s':>9}  {'peak RSS':>9}  {'dropped':>7}  "
            f"{'truncated':>9}"
        )
        for n in args.sizes:
            path = full if n == args.records else Path(tmp) / f"synthetic_{n}.jsonl"
            if n != args.records:
                path.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
            elapsed, cpu, report = min(
                (timed_build(tokenizer, path, args.max_length) for _ in range(args.repeat)),
                key=lambda r: r[0],
            )
            print(
                f"  {n:>8,}  {elapsed:>7.2f}  {n / elapsed:>9,.0f}  {cpu:>7.2f}  "
                f"{n / cpu:>13,.0f}  {report.tokens_emitted / elapsed:>9,.0f}  "
                f"{peak_rss_mib():>5,.0f} MiB  {len(report.dropped):>7}  "
                f"{len(report.truncated):>9}"
            )


if __name__ == "__main__":
    main()
