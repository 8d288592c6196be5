"""Sparse lookahead on the MLX path (the path a GPU takes): decode with and without it, interleaved.

Lookahead reads the next layer's guessed neurons (its predictor with the logit cut lowered by 1, or half its
gate threshold) while a layer computes, into two more layer-sized buffers that the plan counts against the
budget. The native CPU kernel's path has had it on by default since flash_bench measured it there; this
measures the MLX path on the CPU (`native=False`), on the SmolLM2 bfloat16 store with its predictor at
sparsity 0.5 under flash_bench's budget (half the smallest resident form), and the kernel's path beside it
for reference. Each run is a fresh process (flash_bench's runner); rounds interleave.

    python benchmarks/lookahead_mlx.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "mlx"
PAIRS = {"kernel lookahead": "kernel"}  # each path with lookahead against the same path without


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: the predictor at 0.5 under `budget`, MLX path and kernel, lookahead off/on."""
    sparse = {"memory_budget": budget, "sparsity": 0.5, "sparsity_mode": "predictor"}
    return {"mlx": {**sparse, "native": False, "lookahead": False},
            "mlx lookahead": {**sparse, "native": False, "lookahead": True},
            "kernel": {**sparse, "lookahead": False}, "kernel lookahead": {**sparse, "lookahead": True}}


def main() -> int:
    return paired_runs.study(__doc__, __file__, ("bf16",), runs, BASELINE, markdown, PAIRS)


def markdown(result: dict) -> str:
    return paired_runs.markdown(result, "Sparse lookahead on the MLX path", BASELINE,
                                f"predictor at sparsity 0.5, budget {result['budget_bytes']} bytes")


if __name__ == "__main__":
    sys.exit(main())
