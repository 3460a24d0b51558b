"""What a plan costs in time: the estimate the planner ranks the plans that fit by.

[`plan_fast_path`][loraforge.fast.plan.plan_fast_path] pairs each packed row size with the fewest
decoder layers it needs checkpointed to fit its memory budget, then takes the pair with the least
[`relative_time`][loraforge.fast.costs.relative_time]. Pure arithmetic: no torch. The constants
come from rows measured on an H200 with Phi-4's shape (docs/benchmarks.md, "How the planner weighs
rows"); only the order they give the plans matters.
"""

from __future__ import annotations

__all__ = ["relative_time"]

# measured on an H200, Phi-4 (2026-11-29):
_RECOMPUTE_SHARE = 0.3  # a checkpointed model's extra time: its forward again (frozen base)
_ROW_TOKENS = 500  # each row's fixed cost (kernel launches), in tokens' worth of compute
_DEQUANT_TOKENS = 160  # each row's cost of dequantizing a 4-bit model once, the same unit
# measured on an H200, Phi-4 (2026-11-30, session 7): with the decoder layers replayed from a CUDA
# graph, 2,048-token rows ran at 0.98x the rate of 8,192-token rows (bf16, one invocation), so a
# graphed row's fixed cost is small; on a 4-bit base the dequantization stays (GPU work)
_GRAPHED_ROW_TOKENS = 60
# a recomputed MLP's extra time: gate_up's forward product again, 2·h·2i of a layer's
# 4·(h(2q+2k) + 3hi) base compute (Phi-4: 0.269 of a decoder layer's step)
_MLP_RECOMPUTE_SHARE = 0.27


def relative_time(
    tokens: int,
    checkpointed: int,
    layers: int,
    *,
    quantized: bool = False,
    graphed: bool = False,
    recomputed_mlps: int = 0,
) -> float:
    """Estimated time per token of rows of ``tokens`` with ``checkpointed`` of ``layers``
    decoder layers checkpointed, against the compute of a token with none (1.0).

    Three costs: a checkpointed layer runs its forward again (``0.3`` of a layer's step with
    the base frozen); every row pays a fixed cost for launching its kernels (worth about 500
    tokens of compute on an H200, more again for the layers recomputed); and on a 4-bit base
    every weight is dequantized once in the forward, once in the backward and once more in a
    recomputed forward (about 160 tokens' worth a pass over the model). With ``graphed`` (the
    decoder layers replayed from a CUDA graph, which needs no layer checkpointed) the launches
    cost about 60 tokens' worth a row instead of 500. Each of ``recomputed_mlps`` MLPs computing
    its ``gate_up`` output again in the backward pass costs that product again (``0.27`` of a
    layer's step). The constants come from rows measured on an H200; only the order of the plans
    matters to the planner.

    Raises:
        ValueError: ``tokens`` is not positive, ``checkpointed`` is not within ``layers``, or
            ``graphed`` with layers checkpointed.

    Examples:
        >>> relative_time(2048, 0, 40) < relative_time(2048, 4, 40)  # recomputation costs
        True
        >>> long_rows = relative_time(8192, 40, 40, quantized=True)  # every layer recomputed
        >>> long_rows < relative_time(2048, 28, 40, quantized=True)
        True
        >>> graphed = relative_time(1024, 0, 40, quantized=True, graphed=True)  # short, replayed
        >>> graphed < relative_time(4096, 38, 40, quantized=True)
        True
    """
    bad_mlps = not 0 <= recomputed_mlps <= max(layers - checkpointed, 0)
    if tokens <= 0 or layers < 0 or not 0 <= checkpointed <= max(layers, 0) or bad_mlps:
        raise ValueError(
            f"relative_time: tokens must be positive, 0 <= checkpointed <= layers and "
            f"0 <= recomputed_mlps <= layers - checkpointed; got tokens={tokens}, "
            f"checkpointed={checkpointed}, recomputed_mlps={recomputed_mlps}, layers={layers}"
        )
    if graphed and checkpointed:
        raise ValueError(
            "relative_time: graphed rows have no layer checkpointed; got "
            f"checkpointed={checkpointed}"
        )
    share = checkpointed / layers if layers else 0.0
    mlps = _MLP_RECOMPUTE_SHARE * recomputed_mlps / layers if layers else 0.0
    launches = _GRAPHED_ROW_TOKENS if graphed else _ROW_TOKENS * (1 + share)
    per_row = launches + (_DEQUANT_TOKENS * (2 + share) if quantized else 0.0)
    return 1 + _RECOMPUTE_SHARE * share + mlps + per_row / tokens
