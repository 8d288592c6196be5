"""`--pin-layout auto` (the default): decide at load, by measuring, where dense paging's pinned layers go.

With the pinned layers at the tail, the ring reads the next token's first layers while the tail computes,
but only `depth` units ahead: when reads are a token's limit, the disk then idles through most of the tail
and the streamed layers wait for it. Spreading the pinned layers among the streamed ones keeps the disk
busy; where compute is the limit the two are alike (benchmarks/pin_layout.py measured both cases). Which
case a model is in depends on its compute, the store and the disk, so the loader measures it: a few
throwaway decode steps with the tail layout, and the share of their time spent waiting on reads.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import mlx.core as mx

from ..cache import make_prompt_cache
from .budget import pinned_layers

# At or above this share of a decode step spent waiting on reads, the pinned layers are spread. On this
# VM (benchmarks/pin_layout.py): the synthetic model, read-bound, waited 44% of its steps with the tail;
# SmolLM2's stores at half size, compute-bound, 1-11%.
READ_BOUND_SHARE = 0.2
PROBE_STEPS = 3  # the first step also warms the ring and the kernels: only the later ones count


def read_wait_share(model, rt, steps: int = PROBE_STEPS) -> float:
    """The median share of a one-token decode step's time that the forward pass waited on reads, over
    steps 2..`steps` of a throwaway cache (the model's state is untouched; stats are reset after)."""
    cache = make_prompt_cache(model)
    token = mx.array([[0]], dtype=mx.int32)
    shares = []
    for _ in range(max(2, steps)):
        waited, t0 = rt.stats.io_wait_s, time.perf_counter()
        mx.eval(model(token, cache=cache))
        shares.append((rt.stats.io_wait_s - waited) / max(time.perf_counter() - t0, 1e-9))
    rt.reset_stats()
    later = sorted(shares[1:])
    return later[len(later) // 2]


def settle_pin_layout(model, rt, repin: Callable[[list[int]], None], threshold: Optional[float] = None) -> None:
    """For a dense plan that pins some layers and streams others (with the tail layout): measure the read
    wait, and when it reaches `threshold` (default READ_BOUND_SHARE), move the pinned layers to the spread
    layout with `repin` (the loader's: same count, same bytes). Records the measurement in rt.layout_probe."""
    threshold = READ_BOUND_SHARE if threshold is None else threshold
    plan = rt.plan
    if plan.mode != "dense" or not plan.pinned or not plan.streamed:
        return
    spread = pinned_layers(len(plan.pinned) + len(plan.streamed), len(plan.pinned), "spread")
    if spread == sorted(plan.pinned):
        return
    share = read_wait_share(model, rt)
    chose = "spread" if share >= threshold else "tail"
    rt.layout_probe = {"read_wait_share": round(share, 3), "threshold": threshold, "chose": chose}
    if chose == "spread":
        repin(spread)
