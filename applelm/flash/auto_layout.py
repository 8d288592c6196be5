"""`--pin-layout auto` (the default): decide at load, by measuring, where dense paging's pinned layers go.

With the pinned layers at the tail, the ring reads the next token's first layers while the tail computes,
but only `depth` units ahead: when reads are a token's limit, the disk then idles through most of the tail
and the streamed layers wait for it. Spreading the pinned layers among the streamed ones keeps the disk
busy, but then reads overlap all of the compute, and where a read costs CPU time (this VM:
benchmarks/io_contention.py) that compute slows down. Which one wins depends on the model, the store, the
disk and the machine, so the loader measures: a few throwaway decode steps with the tail layout; if they
spend a fifth or more of their time waiting on reads, the same steps with the pinned layers spread; the
faster layout stays.
"""

from __future__ import annotations

import time
from statistics import median_high
from typing import Callable, Optional

import mlx.core as mx

from ..cache import make_prompt_cache
from .budget import pinned_layers

# Below this share of a decode step spent waiting on reads, compute is the limit and the tail stays without
# trying the spread layout. On this VM (benchmarks/pin_layout.py) the synthetic model, read-bound, waited
# 41-45% of its probe steps with the tail; the SmolLM2 stores at half size, compute-bound, 1-11%.
READ_BOUND_SHARE = 0.2
PROBE_STEPS = 4  # per layout; the first also warms the ring and the kernels, so only the later ones count


def probe(model, rt, steps: int = PROBE_STEPS) -> tuple[float, float]:
    """(median seconds, median share of it spent waiting on reads) of one-token decode steps 2..`steps`
    through a throwaway cache: the model's state is untouched, and the statistics are reset after."""
    cache = make_prompt_cache(model)
    token = mx.array([[0]], dtype=mx.int32)
    times, shares = [], []
    for _ in range(max(2, steps)):
        waited, t0 = rt.stats.io_wait_s, time.perf_counter()
        mx.eval(model(token, cache=cache))
        seconds = max(time.perf_counter() - t0, 1e-9)
        times.append(seconds)
        shares.append((rt.stats.io_wait_s - waited) / seconds)
    rt.reset_stats()
    return median_high(times[1:]), median_high(shares[1:])


def settle_pin_layout(model, rt, repin: Callable[[list[int], str], None], threshold: Optional[float] = None) -> None:
    """For a dense plan that pins some layers and streams others (loaded with the tail layout): probe its
    decode steps; when they wait on reads for `threshold` (default READ_BOUND_SHARE) of their time or more,
    move the pinned layers to the spread layout with `repin(layers, name)` (the loader's: same count, same
    bytes), probe again, and move them back if the spread steps were not faster. Records what it measured
    in rt.layout_probe."""
    threshold = READ_BOUND_SHARE if threshold is None else threshold
    plan = rt.plan
    if plan.mode != "dense" or not plan.pinned or not plan.streamed:
        return
    tail = sorted(plan.pinned)
    spread = pinned_layers(len(plan.pinned) + len(plan.streamed), len(plan.pinned), "spread")
    if spread == tail:
        return
    tail_s, share = probe(model, rt)
    record = {"read_wait_share": round(share, 3), "threshold": threshold, "tail_step_s": round(tail_s, 4),
              "chose": "tail"}
    rt.layout_probe = record
    if share < threshold:
        return
    repin(spread, "spread")
    spread_s, _ = probe(model, rt)
    record["spread_step_s"] = round(spread_s, 4)
    if spread_s < tail_s:
        record["chose"] = "spread"
    else:
        repin(tail, "tail")
