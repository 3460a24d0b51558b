"""Where the GPU time and the GPU's idle time of a profiled training window go.

Used by ``throughput.py`` when ``LORAFORGE_PROFILE`` is set: :func:`profiler_callback` profiles two
optimizer steps after the warm-up (CPU and CUDA activity) and :func:`analyse_profile` prints, on
lines starting with ``PROFILE``: GPU time by kernel kind and the top kernels (the top
``$LORAFORGE_PROFILE_TOP``, 20 by default; with ``LORAFORGE_PROFILE_OPS=N`` also the N operators of
most GPU time of their own, which names what launched each kernel in eager steps); the GPU's idle gaps, what the CPU was doing during them
and which blocking CUDA calls preceded them; per-step wall and busy time; and, with
``LORAFORGE_SYNC_DEBUG``, the Python stacks of synchronising CUDA calls. The
chrome trace goes, gzipped, to ``$LORAFORGE_PROFILE_DIR`` or the run's output folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

PROFILE_TRACE_MAX_BYTES = 15 * 2**20
_STEP_MARK = "loraforge_profile_step "
_BLOCKING_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
    "cuEventSynchronize",
)
_GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset", "concurrent_kernel")


def _kernel_kind(name: str) -> str:
    k = name.lower()
    if "flash" in k or "fmha" in k or "attn" in k:
        return "attention"
    if any(x in k for x in ("gemm", "nvjet", "xmma", "cublas", "cutlass", "matmul")):
        return "gemm"
    if "triton" in k or (not k.startswith("void") and "kernel" in k):
        return "triton (liger)"
    if "reduce" in k or "norm" in k:
        return "reductions"
    if "elementwise" in k or "copy" in k or "cat" in k or "fill" in k:
        return "elementwise/copies"
    return "other"


def _dev(ev) -> str:
    dt = getattr(ev, "device_type", None)
    return str(getattr(dt, "name", dt)).rsplit(".", 1)[-1].upper()


def _span(ev) -> tuple[float, float]:
    """(start, end) in microseconds from the trace start."""
    tr = getattr(ev, "time_range", None)
    if tr is not None:
        return float(tr.start), float(tr.end)
    s = float(getattr(ev, "start_us", 0.0))
    return s, s + float(getattr(ev, "duration_us", 0.0))


def _is_blocking_call(name: str) -> bool:
    if any(b in name for b in _BLOCKING_CALLS):
        return True
    return name.startswith(("cudaMemcpy", "cuMemcpy")) and "Async" not in name


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _clip_total(merged: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in merged)


def _short(text: str, n: int = 150) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def analyse_profile(prof, window_start_perf: float, step_times: list[float], out_dir) -> None:
    """Print (lines starting with ``PROFILE``) where the GPU time and the GPU idle time of one
    profiled window go, and export its chrome trace (gzipped) to ``out_dir``.

    ``step_times`` holds ``time.perf_counter()`` at each profiled step's start plus one at the
    window's end; ``window_start_perf`` is the perf_counter just before the profiler started.
    The profile should hold CPU and CUDA activity and one ``record_function`` named
    ``loraforge_profile_step <n>`` a step (the CUDA part degrades to nothing without CUDA events).
    Each section is guarded: a failure prints ``PROFILE analysis failed: ...`` and goes on.
    """
    import bisect
    import itertools

    steps = max(len(step_times) - 1, 1)
    wall_us = (step_times[-1] - window_start_perf) * 1e6 if step_times else 0.0
    try:
        events = list(prof.events() if hasattr(prof, "events") else prof.function_events)
    except Exception as exc:
        print(f"PROFILE analysis failed: cannot read the profiler's events: {exc!r}")
        events = []

    # ---- classify: GPU activity, CPU events by thread, step markers, runtime calls
    gpu: list[tuple[float, float, str]] = []
    cpu: list = []
    markers: list = []
    for ev in events:
        try:
            name = ev.name
            dev = _dev(ev)
            act = getattr(ev, "activity_type", None)
            if dev == "CPU":
                if getattr(ev, "is_async", False):
                    continue
                if name.startswith(_STEP_MARK):
                    markers.append(ev)
                cpu.append(ev)
            elif dev in ("CUDA", "HIP"):
                act = str(act or "").lower()
                if act and act not in _GPU_ACTIVITIES:
                    if any(x in act for x in ("annotation", "sync", "range", "runtime")):
                        continue  # gpu_user_annotation (record_function spans), cuda_sync
                elif not act and (
                    getattr(ev, "is_user_annotation", False)
                    or name.startswith(_STEP_MARK)
                    or "sync" in name.lower()
                ):
                    continue
                s, e = _span(ev)
                gpu.append((s, e, name))
        except Exception:
            continue
    markers.sort(key=lambda ev: _span(ev)[0])
    marker_ids = {id(m) for m in markers}
    if markers:
        w0, w1 = _span(markers[0])[0], _span(markers[-1])[1]
    else:
        spans = [_span(ev) for ev in cpu] + [(s, e) for s, e, _ in gpu]
        w0 = min((s for s, _ in spans), default=0.0)
        w1 = max((e for _, e in spans), default=w0 + wall_us)
    threads: dict[int, float] = {}
    by_thread: dict[int, list] = {}
    for ev in cpu:
        s, e = _span(ev)
        threads[ev.thread] = threads.get(ev.thread, 0.0) + (e - s)
        by_thread.setdefault(ev.thread, []).append(ev)
    main_tid = markers[0].thread if markers else max(threads, key=threads.get, default=None)

    def depth(ev) -> int:
        d, p = 1, getattr(ev, "cpu_parent", None)
        while p is not None and id(p) not in marker_ids and d < 64:
            d, p = d + 1, getattr(p, "cpu_parent", None)
        return d

    def chain(ev, levels: int = 4) -> str:
        names, p = [], getattr(ev, "cpu_parent", None)
        parentless = p is None
        while p is not None and id(p) not in marker_ids and len(names) < levels:
            names.append(p.name)
            p = getattr(p, "cpu_parent", None)
        if parentless:  # parents missing: events of the same thread that contain it, by time
            s, e = _span(ev)
            outer = [
                o
                for o in by_thread.get(ev.thread, ())
                if o.thread == ev.thread
                and o is not ev
                and id(o) not in marker_ids
                and _span(o)[0] <= s
                and _span(o)[1] >= e
            ]
            outer.sort(key=lambda o: _span(o)[1] - _span(o)[0])
            names = [o.name for o in outer[:levels]]
        return " > ".join(reversed(names)) or "(no enclosing op: a Python-level call)"

    # ---- 0. the existing summary: GPU time by kernel kind and top kernels (sum of durations)
    try:
        by_name: dict[str, float] = {}
        for s, e, name in gpu:
            by_name[name] = by_name.get(name, 0.0) + (e - s)
        cats: dict[str, float] = {}
        kernels = []
        for name, t in by_name.items():
            cat = _kernel_kind(name)
            kernels.append((t, cat, name[:90]))
            cats[cat] = cats.get(cat, 0.0) + t
        total = sum(cats.values())
        print(
            f"PROFILE GPU busy {total / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall over "
            f"{steps} steps ({total / max(wall_us, 1e-9):.0%}; the profiler slows the CPU)"
        )
        print("PROFILE GPU time by kind over", steps, "steps:")
        for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"PROFILE   {cat:<18} {t / 1e3:9.1f} ms  {t / max(total, 1e-9):6.1%}")
        top = int(os.environ.get("LORAFORGE_PROFILE_TOP", "20"))
        for t, cat, name in sorted(kernels, reverse=True)[:top]:
            print(f"PROFILE {t / 1e3:9.1f} ms  {cat:<18} {name}")
    except Exception as exc:
        print(f"PROFILE analysis failed: kernel summary: {exc!r}")
    if os.environ.get("LORAFORGE_PROFILE_OPS"):
        try:  # the GPU time of each operator that launched kernels itself (eager steps only:
            # a graph's replayed kernels belong to its launch)
            table = prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=int(os.environ["LORAFORGE_PROFILE_OPS"])
            )
            for line in table.splitlines():
                print("PROFILE ops", line[:200])
        except Exception as exc:
            print(f"PROFILE analysis failed: operator table: {exc!r}")

    # blocking runtime calls (any thread), needed by the gap and the sync sections
    blocking = []
    launches, launch_us = 0, 0.0
    for ev in cpu:
        if _is_blocking_call(ev.name):
            blocking.append(ev)
        elif "LaunchKernel" in ev.name:
            launches += 1
            launch_us += _span(ev)[1] - _span(ev)[0]
    blocking.sort(key=lambda ev: _span(ev)[1])
    blocking_ends = [_span(ev)[1] for ev in blocking]

    def after_sync(t: float):
        """The blocking call that returned just around ``t`` (a gap's start), if any."""
        i = bisect.bisect_left(blocking_ends, t - 50.0)
        if i < len(blocking) and blocking_ends[i] <= t + 300.0:
            return blocking[i]
        return None

    # ---- 2. GPU timeline: busy union, idle gaps and what the CPU did meanwhile
    merged: list[tuple[float, float]] = []
    try:
        merged = _union([(max(s, w0), min(e, w1)) for s, e, _ in gpu if e > w0 and s < w1])
        busy = sum(e - s for s, e in merged)
        gaps: list[tuple[float, float]] = []
        cur = w0
        for s, e in merged:
            if s > cur:
                gaps.append((cur, s))
            cur = max(cur, e)
        if w1 > cur:
            gaps.append((cur, w1))
        idle = sum(e - s for s, e in gaps)
        if not gpu:
            print("PROFILE timeline: no GPU kernels/copies in the profile (no CUDA activity?)")
        span = max(w1 - w0, 1e-9)
        print(
            f"PROFILE timeline: window {span / 1e3:.1f} ms, GPU busy (union of kernels, copies, "
            f"memsets) {busy / 1e3:.1f} ms ({busy / span:.0%}), idle {idle / 1e3:.1f} ms; "
            f"{sum(1 for a, b in gaps if b - a > 100)} idle gaps > 0.1 ms of {len(gaps)}"
        )
        if launches:
            print(
                f"PROFILE kernel launches (cu*LaunchKernel*): {launches}, {launch_us / 1e3:.1f} ms "
                f"of CPU, {launch_us / launches:.1f} us each"
            )
        buckets = [(0, 10), (10, 100), (100, 1000), (1000, 10000), (10000, float("inf"))]
        hist = []
        for lo, hi in buckets:
            sel = [b - a for a, b in gaps if lo <= b - a < hi]
            top = "inf" if hi == float("inf") else f"{hi / 1e3:g}"
            hist.append(f"{lo / 1e3:g}-{top} ms: {len(sel)} / {sum(sel) / 1e3:.1f} ms")
        print("PROFILE idle gaps by length (count / total): " + "; ".join(hist))

        # CPU events of each thread by depth (1, 2), for point look-ups (siblings never overlap)
        by_depth: dict[tuple, list] = {}
        for ev in cpu:
            if id(ev) in marker_ids:
                continue
            p, d = getattr(ev, "cpu_parent", None), 1
            if p is not None and id(p) not in marker_ids:
                p, d = getattr(p, "cpu_parent", None), 2
                if p is not None and id(p) not in marker_ids:
                    continue
            by_depth.setdefault((ev.thread, d), []).append(ev)
        starts: dict[tuple, list[float]] = {}
        for key, lst in by_depth.items():
            lst.sort(key=lambda ev: _span(ev)[0])
            starts[key] = [_span(ev)[0] for ev in lst]

        def at(t: float, tid, d: int):
            lst = by_depth.get((tid, d), [])
            i = bisect.bisect_right(starts.get((tid, d), []), t) - 1
            if i >= 0 and _span(lst[i])[1] > t:
                return lst[i]
            return None

        def label(a: float, b: float) -> str:
            """The main thread's outer 2 ops at the gap's middle, else another thread's."""
            mid = (a + b) / 2
            for tid in [main_tid] + [t for t in threads if t != main_tid]:
                names = []
                for d in (1, 2):
                    ev = at(mid, tid, d)
                    if ev is None:
                        break
                    names.append(ev.name)
                if names:
                    where = "" if tid == main_tid else f"(main idle) thread {tid}: "
                    return where + " > ".join(names)
            return "(no op recorded on any thread)"

        by_label: dict[str, list[float]] = {}
        after_sync_n, after_sync_us = 0, 0.0
        for a, b in gaps:
            acc = by_label.setdefault(label(a, b), [0, 0.0])
            acc[0] += 1
            acc[1] += b - a
            if after_sync(a) is not None:
                after_sync_n += 1
                after_sync_us += b - a
        print(
            f"PROFILE idle right after a blocking CUDA call returned: {after_sync_n} gaps, "
            f"{after_sync_us / 1e3:.1f} ms ({after_sync_us / max(idle, 1e-9):.0%} of idle)"
        )
        print("PROFILE idle by the CPU op running at the gap's middle (outer 2 levels):")
        for lab, (n, t) in sorted(by_label.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"PROFILE   {t / 1e3:8.1f} ms {n:6d} gaps  {_short(lab)}")

        def overlapping(a: float, b: float, tid, max_depth: int) -> list:
            found = []
            for ev in cpu:
                if ev.thread != tid or id(ev) in marker_ids:
                    continue
                s, e = _span(ev)
                if s < b and e > a:
                    found.append(ev)
            return [ev for ev in found if depth(ev) <= max_depth] if max_depth else found

        print(
            "PROFILE 15 longest idle gaps (start ms from window start, length ms; main-thread "
            "ops overlapping, outer 3 levels | innermost | blocking call just before | others):"
        )
        for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:15]:
            outer = sorted(overlapping(a, b, main_tid, 3), key=lambda ev: (depth(ev), _span(ev)[0]))
            names = list(dict.fromkeys(ev.name for ev in outer))
            deep = overlapping(a, b, main_tid, 0)
            inner = max(
                deep,
                key=lambda ev: (min(_span(ev)[1], b) - max(_span(ev)[0], a), depth(ev)),
                default=None,
            )
            extra = []
            if inner is not None and inner.name not in names[:1]:
                extra.append(f"inner: {_short(inner.name, 60)}")
            sync = after_sync(a)
            if sync is not None:
                extra.append(f"after {sync.name} in {_short(chain(sync, 3), 90)}")
            others = {}
            for ev in cpu:
                if ev.thread == main_tid or getattr(ev, "cpu_parent", None) is not None:
                    continue
                s, e = _span(ev)
                if s < b and e > a and id(ev) not in marker_ids:
                    others.setdefault(ev.thread, []).append(ev.name)
            for tid, lst in list(others.items())[:2]:
                extra.append(f"thread {tid}: {_short(', '.join(dict.fromkeys(lst)), 80)}")
            print(
                f"PROFILE   gap at {(a - w0) / 1e3:9.2f} ms {(b - a) / 1e3:8.3f} ms  "
                f"{_short(', '.join(names) or '(no op on the main thread)')}"
                + ("  | " + " | ".join(extra) if extra else "")
            )
    except Exception as exc:
        print(f"PROFILE analysis failed: GPU timeline: {exc!r}")

    # ---- 3. blocking CUDA runtime calls by enclosing CPU op chain
    try:
        total_n = len(blocking)
        total_us = sum(_span(ev)[1] - _span(ev)[0] for ev in blocking)
        print(
            f"PROFILE blocking CUDA calls (cuda*Synchronize, cudaMemcpy not Async): {total_n}, "
            f"{total_us / 1e3:.1f} ms of host time; top 10 by enclosing CPU ops (4 levels):"
        )
        groups: dict[str, list[float]] = {}
        for ev in blocking:
            where = "main" if ev.thread == main_tid else f"thread {ev.thread}"
            key = f"{ev.name} in {chain(ev, 4)} [{where}]"
            acc = groups.setdefault(key, [0, 0.0])
            acc[0] += 1
            acc[1] += _span(ev)[1] - _span(ev)[0]
        for key, (n, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"PROFILE   {t / 1e3:8.2f} ms {n:5d}x  {_short(key, 200)}")
        slow = [
            ev
            for ev in cpu
            if ev.name.startswith(("cudaMemcpyAsync", "cuMemcpy"))
            and "Async" in ev.name
            and _span(ev)[1] - _span(ev)[0] > 50.0
        ]
        if slow:
            t = sum(_span(ev)[1] - _span(ev)[0] for ev in slow)
            print(
                f"PROFILE   also {len(slow)} cudaMemcpyAsync calls over 50 us ({t / 1e3:.1f} ms): "
                f"pageable memory makes them blocking; e.g. in {_short(chain(slow[0], 3), 120)}"
            )
    except Exception as exc:
        print(f"PROFILE analysis failed: blocking calls: {exc!r}")

    # ---- 4. per-step wall time against GPU busy time in the same interval
    try:
        if markers:
            spans = [_span(m) for m in markers]
            how = "step markers"
        else:  # align the perf_counter times on the first event
            base = step_times[0] if step_times else window_start_perf
            spans = [
                (w0 + (a - base) * 1e6, w0 + (b - base) * 1e6)
                for a, b in itertools.pairwise(step_times)
            ]
            how = "perf_counter aligned on the first event, approximate"
        print(f"PROFILE per step (interval between step begins; {how}):")
        for i, (a, b) in enumerate(spans):
            perf = (step_times[i + 1] - step_times[i]) * 1e3 if i + 1 < len(step_times) else 0.0
            busy_i = _clip_total(merged, a, b)
            n_sync = [ev for ev in blocking if a <= _span(ev)[0] < b]
            sync_us = sum(_span(ev)[1] - _span(ev)[0] for ev in n_sync)
            n_k = sum(1 for s, _, _ in gpu if a <= s < b)
            print(
                f"PROFILE   step {i + 1}: wall {(b - a) / 1e3:8.1f} ms (perf_counter {perf:.1f}), "
                f"GPU busy {busy_i / 1e3:8.1f} ms ({busy_i / max(b - a, 1e-9):.0%}), "
                f"{n_k} GPU ops, {len(n_sync)} blocking calls {sync_us / 1e3:.1f} ms"
            )
    except Exception as exc:
        print(f"PROFILE analysis failed: per step: {exc!r}")

    # ---- 6. chrome trace, gzipped
    try:
        import gzip
        import shutil

        if out_dir is None:
            print("PROFILE trace not exported (no output folder)")
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "trace-loraforge.json.gz"
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as fin, gzip.open(path, "wb", compresslevel=6) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        size = path.stat().st_size
        if size > PROFILE_TRACE_MAX_BYTES:
            path.unlink()
            print(f"PROFILE trace skipped: {size / 2**20:.1f} MB gzipped is over 15 MB")
        else:
            print(
                f"PROFILE trace {path} ({size / 2**20:.1f} MB gzipped; chrome://tracing, Perfetto)"
            )
    except Exception as exc:
        print(f"PROFILE analysis failed: trace export: {exc!r}")


class _SyncWarnings:
    """Records the Python stacks of torch's "called a synchronizing CUDA operation" warnings
    (``torch.cuda.set_sync_debug_mode("warn")``) between ``start()`` and ``stop()``, across
    callback calls; other warnings go to the previous ``warnings.showwarning``."""

    PATTERN = "called a synchronizing"
    _MODULE_PY = str(Path("torch", "nn", "modules", "module.py"))  # nn.Module call plumbing

    def __init__(self) -> None:
        self.stacks: dict[tuple[str, ...], int] = {}
        self.active = False

    def start(self, torch_mode: bool = True) -> None:
        import warnings

        self._filters = list(warnings.filters)
        self._show = warnings.showwarning
        warnings.filterwarnings("always", message=".*" + self.PATTERN)
        warnings.showwarning = self._record
        self.torch_mode = False
        self.active = True
        if torch_mode:
            import torch

            torch.cuda.set_sync_debug_mode("warn")
            self.torch_mode = True

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if self.PATTERN not in str(message).lower():
            self._show(message, category, filename, lineno, file, line)
            return
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if not f.filename.endswith(("warnings.py", "<frozen warnings>", self._MODULE_PY))
        ][-8:]
        key = tuple(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames)
        self.stacks[key] = self.stacks.get(key, 0) + 1

    def stop(self) -> None:
        import warnings

        if not self.active:
            return
        self.active = False
        try:
            if self.torch_mode:
                import torch

                torch.cuda.set_sync_debug_mode(0)
        finally:
            warnings.showwarning = self._show
            warnings.filters[:] = self._filters
            getattr(warnings, "_filters_mutated", lambda: None)()  # drop the per-module caches

    def report(self) -> None:
        n = sum(self.stacks.values())
        print(
            f"PROFILE SYNC {n} synchronizing CUDA operations seen from Python "
            f"({len(self.stacks)} distinct stacks; the autograd thread's are not seen); top 10:"
        )
        for stack, count in sorted(self.stacks.items(), key=lambda kv: -kv[1])[:10]:
            print(f"PROFILE SYNC {count:6d}x")
            for frame in stack:
                print(f"PROFILE SYNC     {_short(frame, 160)}")


def profiler_callback(start: int, steps: int = 2, out: Path | None = None):
    """Profile ``steps`` optimizer steps after ``start`` (CPU and CUDA activity) and print where
    the GPU time and the GPU idle time go (``analyse_profile``); the gzipped chrome trace goes to
    ``$LORAFORGE_PROFILE_DIR`` or else ``out``. With ``LORAFORGE_SYNC_DEBUG`` set, the profiled
    steps also run under ``torch.cuda.set_sync_debug_mode("warn")`` and the Python stacks of the
    synchronising operations are printed."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    trace_dir = os.environ.get("LORAFORGE_PROFILE_DIR") or out

    class Profile(TrainerCallback):
        def __init__(self) -> None:
            self.prof = None
            self.mark = None
            self.step_times: list[float] = []
            self.sync = None

        def _close_mark(self) -> None:
            if self.mark is not None:
                mark, self.mark = self.mark, None
                mark.__exit__(None, None, None)

        def on_step_begin(self, args, state, control, **kw):
            try:
                if state.global_step == start and self.prof is None:
                    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    self.prof = torch.profiler.profile(
                        activities=activities, record_shapes=False, with_stack=False
                    )
                    if cuda:
                        torch.cuda.synchronize()
                    self.t0 = time.perf_counter()
                    self.prof.__enter__()
            except Exception as exc:
                print(f"PROFILE analysis failed: starting the profiler: {exc!r}")
                self.prof = None
                return
            try:
                if (
                    self.sync is None
                    and os.environ.get("LORAFORGE_SYNC_DEBUG")
                    and self.prof is not None
                ):
                    self.sync = _SyncWarnings()
                    self.sync.start(torch_mode=cuda)
            except Exception as exc:
                print(f"PROFILE analysis failed: sync debug mode: {exc!r}")
            try:
                if self.prof is not None and start <= state.global_step < start + steps:
                    self._close_mark()
                    self.step_times.append(time.perf_counter())
                    self.mark = record_function(f"{_STEP_MARK}{state.global_step + 1}")
                    self.mark.__enter__()
            except Exception as exc:
                print(f"PROFILE analysis failed: step marker: {exc!r}")

        def on_step_end(self, args, state, control, **kw):
            if self.prof is None or state.global_step != start + steps:
                return
            prof, self.prof = self.prof, None
            try:
                if self.sync is not None:
                    self.sync.stop()
            except Exception as exc:
                print(f"PROFILE analysis failed: leaving sync debug mode: {exc!r}")
            try:
                if cuda:
                    torch.cuda.synchronize()
                self.step_times.append(time.perf_counter())
                self._close_mark()
                prof.__exit__(None, None, None)
            except Exception as exc:
                print(f"PROFILE analysis failed: stopping the profiler: {exc!r}")
                return
            try:
                analyse_profile(prof, self.t0, self.step_times, trace_dir)
                if trace_dir is not None and not os.environ.get("LORAFORGE_PROFILE_DIR"):
                    print(
                        "PROFILE note: this output folder is the child's temporary directory, "
                        "deleted when it exits; set LORAFORGE_PROFILE_DIR to keep the trace"
                    )
            except Exception as exc:
                print(f"PROFILE analysis failed: {exc!r}")
            try:
                if self.sync is not None:
                    self.sync.report()
            except Exception as exc:
                print(f"PROFILE analysis failed: sync debug: {exc!r}")

    return Profile()


def python_profile_callback(start: int, steps: int = 3, top: int = 45):
    """``LORAFORGE_PYPROFILE``: where the CPU time goes over ``steps`` optimizer steps after
    ``start`` (``cProfile``, enabled on the thread that trains; time a call spends waiting, e.g. for
    a full launch queue, counts as its own). Prints the functions with the most time of their own
    and the most time including callees, on lines starting with ``PYPROFILE``; with
    ``LORAFORGE_PYPROFILE_DIR`` the raw statistics go there for ``pstats``."""
    import cProfile
    import io
    import pstats

    import torch
    from transformers import TrainerCallback

    class PyProfile(TrainerCallback):
        def __init__(self) -> None:
            self.prof: cProfile.Profile | None = None
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start and self.prof is None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof = cProfile.Profile()
                self.t0 = time.perf_counter()
                self.prof.enable()

        def on_step_end(self, args, state, control, **kw):
            last = min(start + steps, args.max_steps)
            if self.prof is None or state.global_step != last:
                return
            self.prof.disable()
            steps_done = last - start
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            dump = os.environ.get("LORAFORGE_PYPROFILE_DIR")
            if dump:  # the raw statistics, for pstats (callers, callees) after the run
                Path(dump).mkdir(parents=True, exist_ok=True)
                self.prof.dump_stats(str(Path(dump) / f"steps-{os.getpid()}.pstats"))
            print(
                f"PYPROFILE {steps_done} steps, {wall * 1e3 / steps_done:.1f} ms a step "
                "(wall, profiled)"
            )
            for key in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(self.prof, stream=buf).sort_stats(key).print_stats(top)
                lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
                print(f"PYPROFILE by {key}:")
                for ln in lines[-(top + 1) :]:
                    print(f"PYPROFILE {ln[:220]}")
            self.prof = None

    return PyProfile()


def memory_snapshot_callback(at: int, out: Path):
    """Record the CUDA caching allocator's history from the start of training and, at the end of
    optimizer step ``at``, write its snapshot (``torch.cuda.memory._dump_snapshot``, gzipped) to
    ``out/memory-snapshot.pickle.gz`` (``out`` is made if missing) and print a summary: reserved and allocated bytes per memory
    pool (CUDA graph pools apart), the largest free gaps, and the largest allocated blocks."""
    import gzip
    import pickle

    import torch
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.memory._record_memory_history(max_entries=300_000)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step != at:
                return
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"memory-snapshot-{os.getpid()}.pickle.gz"
            with gzip.open(path, "wb") as f:
                pickle.dump(snap, f)
            pools: dict = {}
            for seg in snap["segments"]:
                key = str(seg.get("segment_pool_id", "?"))
                p = pools.setdefault(key, [0, 0, 0, []])
                p[0] += seg["total_size"]
                p[1] += seg["allocated_size"]
                p[2] += 1
                free = [b["size"] for b in seg["blocks"] if b["state"] != "active_allocated"]
                p[3] += free
            g = 2**30
            stats = torch.cuda.memory_stats()
            print(
                f"MEMSNAP step {at}: reserved {stats['reserved_bytes.all.current'] / g:.2f} GiB,"
                f" allocated {stats['allocated_bytes.all.current'] / g:.2f} GiB, peak allocated"
                f" {stats['allocated_bytes.all.peak'] / g:.2f}, peak reserved"
                f" {stats['reserved_bytes.all.peak'] / g:.2f}; snapshot {path}"
            )
            for key, (tot, alloc, n, free) in sorted(pools.items(), key=lambda kv: -kv[1][0]):
                big = sorted(free, reverse=True)[:5]
                print(
                    f"MEMSNAP pool {key}: {n} segments, reserved {tot / g:.2f} GiB, allocated "
                    f"{alloc / g:.2f}, free {(tot - alloc) / g:.2f} (largest free "
                    f"{', '.join(f'{b / 2**20:.0f}' for b in big)} MiB)"
                )

    return Snapshot()
