"""What was allocated at the peak of a CUDA allocator snapshot, by where it was allocated.

Reads a snapshot written by ``benchmarks/throughput.py`` with ``LORAFORGE_MEMSNAP=FOLDER``
(``torch.cuda.memory._snapshot()``, gzipped pickle, recorded from the start of training), replays
its allocation events, finds the moment the most bytes were allocated beyond what was there when
recording began, and prints those bytes grouped by the first three Python frames (loraforge,
transformers, PEFT or torch files) that allocated them. No torch needed.

Usage: ``python benchmarks/snapshot_peak.py memory-snapshot-PID.pickle.gz``
"""

from __future__ import annotations

import collections
import gzip
import pickle
import sys

_OURS = ("loraforge", "transformers", "peft", "torch/")


def _where(frames: list[dict]) -> str:
    found = []
    for f in frames:
        name = f["filename"]
        if name.endswith(".py") and any(k in name for k in _OURS):
            found.append(f"{name.split('/')[-1]}:{f['line']}:{f['name']}")
        if len(found) == 3:
            break
    return " < ".join(found)


def main(path: str) -> None:
    with gzip.open(path, "rb") as f:
        snap = pickle.load(f)  # a file this project's benchmark wrote: trusted input
    trace = snap["device_traces"][0]
    live: dict[int, tuple[int, int]] = {}
    now = peak = peak_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], i)
            now += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])[0]
        if now > peak:
            peak, peak_at = now, i
    live = {}
    for i, e in enumerate(trace[: peak_at + 1]):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], i)
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, i in live.values():
        g = groups[_where(trace[i]["frames"])]
        g[0] += size
        g[1] += 1
    print(
        f"{len(trace)} events; peak {peak / 2**30:.2f} GiB allocated beyond the start, at event "
        f"{peak_at}"
    )
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"{size / 2**20:9.1f} MiB {n:5d} blocks  {where}")


if __name__ == "__main__":
    main(sys.argv[1])
