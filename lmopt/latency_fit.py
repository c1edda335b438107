"""Block latencies in context, for models made of dense layers only (transformers).

A dense block timed alone keeps its weights in the CPU's caches from run to run; inside the network
every layer's weights stream from memory again, and on an encoder the blocks cost far more in
context than alone (all-MiniLM-L6-v2 at sequence length 32: its linear layers sum to 3.7 ms alone
while removing nearly all of them saves about 6 ms of the 7.1 ms model). Taking the unexplained time
as fixed then makes every plan much faster than predicted and the planner overshoots its target.

Two whole-model measurements fix the two unknowns of `measured = fixed + scale * sum(blocks)`: the
original model and the fastest plan. Every block latency is multiplied by `scale`.
"""
from __future__ import annotations


def two_point_fit(whole_ms: float, original_blocks_ms: float, fast_ms: float,
                  fast_blocks_ms: float) -> tuple[float, float] | None:
    """(scale, fixed ms) with whole = fixed + scale * original blocks and fast = fixed + scale * fast
    blocks; None when the measurements do not give a positive scale and a non-negative fixed time."""
    span = original_blocks_ms - fast_blocks_ms
    if span <= 0:
        return None
    scale = (whole_ms - fast_ms) / span
    fixed = whole_ms - scale * original_blocks_ms
    if scale <= 0 or fixed < 0:
        return None
    return scale, fixed
