"""Prefetch ring depth against pinned layers: the evidence behind budget.ring_depths and MIN_READ_AHEAD.

Under a budget, ring slots and pinned FFN layers share the same bytes: a ring one unit shallower can pin
one more layer when a unit is a whole layer (SmolLM2), which removes that layer's reads from every token,
but it also queues fewer reads. For the SmolLM2 bfloat16 and 8-bit stores under flash_bench's budget
(half the smallest resident form) this decodes with rings of 4, 3 and 2 units, and the plan's own choice
(`auto`), beside the fully resident run; each run a fresh process (flash_bench's runner), interleaved
over rounds. Reported per run: tok/s, layers pinned, MB read per token, read GB/s while decoding (bytes over
the time reads were in flight) and the I/O wait per token.

    python benchmarks/ring_depth.py [--rounds 4] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "ring 4"


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` with each ring depth and without
    one (the plan's choice)."""
    paged = {"memory_budget": budget}
    return {"resident": {"native": True}, **{f"ring {d}": {**paged, "ring_depth": d} for d in (4, 3, 2)},
            "auto": paged}


def main() -> int:
    return paired_runs.study(__doc__, __file__, ("bf16", "8bit"), runs, BASELINE, markdown)


def markdown(result: dict) -> str:
    return paired_runs.markdown(result, "Prefetch ring depth against pinned layers", BASELINE,
                                f"budget {result['budget_bytes']} bytes")


if __name__ == "__main__":
    sys.exit(main())
