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

import flash_bench  # benchmarks/flash_bench.py: layouts and the SmolLM2 stores
import paired_runs  # benchmarks/paired_runs.py: interleaved rounds, summary, markdown

BASELINE = "ring 4"


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` with each ring depth and without
    one (the plan's choice)."""
    paged = {"memory_budget": budget}
    return {"resident": {"native": True}, **{f"ring {d}": {**paged, "ring_depth": d} for d in (4, 3, 2)},
            "auto": paged}


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    bf16, q8, budget = flash_bench.smollm2_stores(work)
    from applelm.flash.loader import flash_tokenizer

    prompt = flash_tokenizer(bf16).encode(flash_bench.SMOL_PROMPT)
    result = paired_runs.run_rounds(__file__, args, {"bf16": bf16, "8bit": q8}, runs(budget), prompt,
                                    {"budget_bytes": budget})
    result["summary"] = paired_runs.summarize(result["rounds"], args.tokens, BASELINE)
    paired_runs.write(result, args.out, markdown(result))
    return 0


def markdown(result: dict) -> str:
    return paired_runs.markdown(result, "Prefetch ring depth against pinned layers", BASELINE,
                                f"budget {result['budget_bytes']} bytes")


if __name__ == "__main__":
    sys.exit(main())
