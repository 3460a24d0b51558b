"""Feasibility probe (issue 13): loraforge's decoder layers replayed from CUDA graphs.

The default step is bound by the CPU's work per step (``docs/benchmarks.md``, session 5): about
0.21 s of launches, Python and autograd for a 2,048-token row, as long as the GPU's work. CUDA
graphs replay a layer's kernels with one launch. This probe answers, before any of it goes into
the library:

1. Can the fast path's decoder layer be captured (lean LoRA functions and norms, fused RoPE,
   varlen attention, Triton kernels; an NF4 base with ``--nf4``)?
2. Do the graphed layers give the eager layers' loss and LoRA gradients?
3. How much shorter is a step?

It builds the benchmark's random-initialised model (``--assets`` as ``throughput.py``; ``--thin``
for its tiny widths), applies the fast path by hand (varlen attention, PEFT LoRA r=8 on the four
projections, the lean functions and fused RoPE under bf16 autocast), packs one row of
``--tokens`` tokens padded to exactly that length (static shapes) with ``cu_seq_lens`` padded to
``--segments`` entries (empty trailing segments), and runs the decoder layers two ways: eagerly,
and as ``torch.cuda.make_graphed_callables`` of each layer (one memory pool). The embedding, final
norm, head and loss run eagerly in both. Printed: capture time, equality of the loss and the LoRA
gradients after one step from the same weights, and the median step time of each way.

Dropout: outside a capture the lean functions draw each seed on the CPU. While a graph is being
captured they draw it with torch's CUDA generator into a tensor the dropout kernel reads
(``lora_ops.new_seed``), so each replay draws new masks, as eager steps do. The masks of the two
ways then differ, so with ``--dropout > 0`` equality is not checked; timing is.

    python benchmarks/graph_probe.py --assets .gpu [--thin] [--nf4] [--dropout 0.1]

Session 6's first three runs on an H200 compared graphed with graphed: ``make_graphed_callables``
replaces the forward of the modules it is given, and it was given the eager wrappers. They are
reported as such in ``docs/benchmarks.md``; the graphed wrappers are now separate objects.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


class LayerCall(torch.nn.Module):
    """One decoder layer as a function of tensors only (what ``make_graphed_callables`` takes):
    ``(hidden, cos, sin, cu_seq_lens) -> hidden``, with the row length fixed."""

    def __init__(
        self, layer: torch.nn.Module, tokens: int, varlen: bool, max_length: int | None = None
    ) -> None:
        super().__init__()
        self.layer, self.tokens, self.varlen = layer, tokens, varlen
        self.max_length = max_length or tokens  # an upper bound of a segment's length

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor
    ) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self.varlen:
            extra = {
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": self.max_length,
                "max_length_k": self.max_length,
            }
        out = self.layer(hidden, attention_mask=None, position_embeddings=(cos, sin), **extra)
        return out[0] if isinstance(out, tuple) else out


def build(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor]]:
    """The PEFT model with the fast path applied, and one packed, padded row."""
    import throughput
    from peft import LoraConfig, get_peft_model

    from loraforge.fast.attention import attention_implementation, set_attention
    from loraforge.fast.lora_ops import apply_lean_functions
    from loraforge.fast.packing import PackedCollator, PackedDataset
    from loraforge.fast.rope import install_fused_rope

    assets = args.assets
    if args.thin:
        assets = throughput.thin_assets(assets, Path(tempfile.mkdtemp(prefix="graph-probe-")))
    model = throughput.build_nf4_model(assets) if args.nf4 else throughput.build_model(assets)
    tok = throughput.tokenizer_of(assets)
    data = throughput.tokenized(assets, tok)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        set_attention(model, attention_implementation("varlen"))
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS)
    model = get_peft_model(model, cfg).train()
    autocast = torch.bfloat16  # the CPU check runs under CPU autocast to bf16
    report = apply_lean_functions(model, autocast_dtype=autocast)
    print(f"lean functions: {report.summary()}", flush=True)
    if on_gpu:
        print(f"rope: {install_fused_rope(model, autocast_dtype=autocast)[1]}", flush=True)
    rows = PackedDataset(data, args.tokens, seed=0)
    row = rows[0] if on_gpu else rows[0][:1]  # the CPU check: one example, plain causal sdpa
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = PackedCollator(pad_id, pad_to=args.tokens if on_gpu else None)([row])
    cu = batch["cu_seq_lens_q"].to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    print(
        f"row: {cu.numel() - 1} segments (one is the padding), longest {int(lengths.max())} tokens",
        flush=True,
    )
    if args.max_length == 0:  # the row's own bound, as the collator gives it
        args.max_length = int(lengths.max())
    segments = args.segments or cu.numel()  # 0: the row's own count, no empty segments
    if cu.numel() > segments:
        raise SystemExit(f"the row has {cu.numel() - 1} segments; raise --segments")
    fixed = torch.full((segments,), int(cu[-1]), dtype=torch.int32)
    fixed[: cu.numel()] = cu  # trailing empty segments: a static shape for the graph
    device = next(p for p in model.parameters()).device
    out = {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "labels": batch["labels"].to(device),
        "cu": fixed.to(device),
    }
    return model, out


def pieces(model: Any) -> tuple[Any, Any, Any, Any, list[torch.nn.Module]]:
    inner = model.get_base_model()
    decoder = inner.model
    return (
        decoder.embed_tokens,
        decoder.rotary_emb,
        decoder.norm,
        inner.lm_head,
        list(decoder.layers),
    )


def loss_of(model: Any, batch: dict[str, torch.Tensor], layers: list[Any]) -> torch.Tensor:
    """The shifted cross-entropy of the row through ``layers`` (eager or graphed callables)."""
    embed, rotary, norm, head, _ = pieces(model)
    hidden = embed(batch["input_ids"])
    cos, sin = rotary(hidden, batch["position_ids"])
    for layer in layers:
        hidden = layer(hidden, cos, sin, batch["cu"])
    logits = head(norm(hidden))[0, :-1].float()
    labels = batch["labels"][0, 1:]
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(model: Any, batch: dict[str, torch.Tensor], layers: list[Any], mixed: Any) -> float:
    return float(issue_step(model, batch, layers, mixed))


def issue_step(
    model: Any, batch: dict[str, torch.Tensor], layers: list[Any], mixed: Any
) -> torch.Tensor:
    """Enqueue one forward and backward (no synchronisation); the loss, still on the device."""
    model.zero_grad(set_to_none=True)
    with mixed():
        loss = loss_of(model, batch, layers)
    loss.backward()
    return loss.detach()


def cpu_check(args: argparse.Namespace) -> None:
    """Without a GPU: the hand-written layer loop equals the model's own forward (one example,
    causal sdpa), so the probe's eager and graphed ways run the model's function."""
    torch.manual_seed(0)
    model, batch = build(args)
    *_, layers = pieces(model)
    calls = [LayerCall(layer, batch["input_ids"].shape[1], varlen=False) for layer in layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = loss_of(model, batch, calls)
        theirs = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    print(f"CPU check: hand-written loop {mine.item():.6f}, model's forward {theirs.item():.6f}")
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--thin", action="store_true", help="throughput.py's tiny widths")
    ap.add_argument("--nf4", action="store_true", help="an NF4 base (bitsandbytes)")
    ap.add_argument("--tokens", type=int, default=2048, help="the packed row, padded to this")
    ap.add_argument(
        "--segments", type=int, default=96, help="cu_seq_lens entries, padded (0: the row's own)"
    )
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="segment bound (default: the row's length; 0: its longest segment)",
    )
    ap.add_argument("--pyprofile", type=Path, default=None, help="cProfile 3 eager steps to this")
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: check the layer loop")
    args = ap.parse_args()
    if args.cpu_check:
        cpu_check(args)
        return
    import functools

    torch.manual_seed(0)
    model, batch = build(args)
    *_, layers = pieces(model)
    tokens = batch["input_ids"].shape[1]
    eager = [LayerCall(layer, tokens, varlen=True, max_length=args.max_length) for layer in layers]
    # make_graphed_callables wants autocast's weight cache off; the same context for both ways
    mixed = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=False)
    eager_loss = one_step(model, batch, eager, mixed)
    eager_grads = lora_grads(model)
    embed, rotary, *_ = pieces(model)
    with torch.no_grad():
        hidden = embed(batch["input_ids"])
        cos, sin = rotary(hidden, batch["position_ids"])
    samples = tuple(
        (hidden.detach().clone().requires_grad_(i > 0), cos, sin, batch["cu"])
        for i in range(len(eager))
    )
    start = time.perf_counter()
    # make_graphed_callables replaces the forward of the modules it is given with the graphed one,
    # so it gets wrappers of its own: the eager wrappers must stay eager for the comparison
    to_graph = tuple(LayerCall(c.layer, c.tokens, c.varlen, c.max_length) for c in eager)
    with mixed():
        graphed = list(torch.cuda.make_graphed_callables(to_graph, samples))
    assert all(type(c).forward is LayerCall.forward and "forward" not in vars(c) for c in eager)
    torch.cuda.synchronize()
    print(f"captured {len(graphed)} layers in {time.perf_counter() - start:.1f} s", flush=True)
    graph_loss = one_step(model, batch, graphed, mixed)
    graph_grads = lora_grads(model)
    if args.dropout == 0.0:
        worst = max(
            float((graph_grads[n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12))
            for n, g in eager_grads.items()
        )
        print(
            f"loss eager {eager_loss:.6f} graphed {graph_loss:.6f}; LoRA gradients: largest "
            f"relative difference {worst:.2e} over {len(eager_grads)} tensors",
            flush=True,
        )
    for name, way in (("eager", eager), ("graphed", graphed)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        one_step(model, batch, way, mixed)
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.memory_reserved()
        print(
            f"  {name}: peak {peak / 2**30:.2f} GiB allocated during a step ({base / 2**30:.2f} "
            f"before it), {reserved / 2**30:.2f} GiB reserved (a replay allocates nothing: "
            "compare reserved)",
            flush=True,
        )
    times: dict[str, list[float]] = {"eager": [], "graphed": []}
    issue: dict[str, list[float]] = {"eager": [], "graphed": []}
    gpu: dict[str, float] = {}
    for _ in range(args.steps):
        for name, way in (("eager", eager), ("graphed", graphed)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            issue_step(model, batch, way, mixed)
            issue[name].append(time.perf_counter() - t0)  # the CPU's time to enqueue the step
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    if args.pyprofile:  # the CPU's work of eager steps, function by function (cProfile)
        import cProfile

        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(3):
            issue_step(model, batch, eager, mixed)
        prof.disable()
        torch.cuda.synchronize()
        prof.dump_stats(args.pyprofile)
    from torch.profiler import ProfilerActivity, profile

    for name, way in (("eager", eager), ("graphed", graphed)):
        # the GPU's own time for a step: the kernels' durations (CUDA activity only, one stream)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            issue_step(model, batch, way, mixed)
            torch.cuda.synchronize()
        try:
            averages = prof.key_averages()
            gpu[name] = sum(k.self_device_time_total for k in averages) / 1e6
            top = sorted(averages, key=lambda k: -k.self_device_time_total)[:12]
            print(f"  {name}: top kernels of one step (ms, calls)")
            for k in top:
                print(f"    {k.self_device_time_total / 1e3:7.2f} {k.count:5d}  {k.key[:90]}")
        except Exception as exc:  # an analysis failure must not cost the timings above
            print(f"profile analysis failed: {exc!r}")
            gpu[name] = float("nan")
    e, g = (statistics.median(times[k][2:]) for k in ("eager", "graphed"))
    ei, gi = (statistics.median(issue[k][2:]) for k in ("eager", "graphed"))
    eg, gg = gpu["eager"], gpu["graphed"]
    print(
        f"step (forward + backward, no optimizer), median of {args.steps - 2}: eager {e * 1e3:.1f} "
        f"ms, graphed {g * 1e3:.1f} ms: {e / g:.2f}x; {tokens / g:,.0f} tokens/s graphed "
        f"({torch.cuda.get_device_name()})\n"
        f"  the CPU's time to enqueue a step: eager {ei * 1e3:.1f} ms, graphed {gi * 1e3:.1f} ms\n"
        f"  the GPU's kernel time in one profiled step: eager {eg * 1e3:.1f} ms, graphed "
        f"{gg * 1e3:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
