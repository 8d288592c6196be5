"""Cost of the server's per-row sampling (applelm/batch_sample.py) on real SmolLM2 logits.

The server samples each non-greedy row in numpy after a batched decode step. The rows here are the
embedded SmolLM2's logits (49152 tokens) at 128 decode positions: 4 chat prompts, 32 tokens each drawn at
temperature 0.7. Timed side by side, in one run: `sample_row` as it is (the draw sums blocks of weights,
then runs one block token by token), and the same with the draw it replaced (one float64 running total
over the whole vocabulary), at temperature 0.7 (the load test's setting) and with top-p 0.9 and 0.95.
Reported: the median over `--rounds` rounds of the mean ms per row, the nucleus widths, and whether both
draws pick the same tokens at the same uniforms.

    .venv/bin/python benchmarks/sample_row_cost.py [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

import machine_info  # benchmarks/machine_info.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from applelm import batch_sample  # noqa: E402
from applelm.batch_sample import SamplingParams, sample_row  # noqa: E402

TOPICS = ["the sea", "bicycles", "how bread rises", "a lighthouse keeper"]


def real_logits(steps: int = 32) -> np.ndarray:
    """(len(TOPICS) * steps, vocab) float32 logits of the embedded SmolLM2 while it writes about TOPICS."""
    import mlx.core as mx

    from applelm.cache import make_prompt_cache
    from applelm.generation import prompt_token_ids
    from applelm.loader import load

    model, tok = load(None)
    draws, rows = np.random.default_rng(0), []
    for topic in TOPICS:
        ids = prompt_token_ids(tok, tok.apply_chat_template([{"role": "user", "content": f"Write about {topic}."}]))
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids]), cache=cache)[0, -1]
        for _ in range(steps):
            rows.append(np.array(logits.astype(mx.float32)))
            token = sample_row(rows[-1], SamplingParams(0.7), float(draws.random()))
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return np.stack(rows)


def running_total_draw(weights: np.ndarray, u: float) -> int:
    """The draw before 4ed094e: a float64 running total over every weight."""
    cum = np.cumsum(weights, dtype=np.float64)
    j = int(np.searchsorted(cum, min(max(u, 0.0), 1.0 - 1e-9) * cum[-1], side="right"))
    return min(j, cum.shape[0] - 1)


def per_row_ms(rows: np.ndarray, s: SamplingParams, us: np.ndarray) -> float:
    start = time.perf_counter()
    for z, u in zip(rows, us):
        sample_row(z, s, float(u))
    return (time.perf_counter() - start) / len(rows) * 1e3


def nucleus_width(z: np.ndarray, top_p: float) -> int:
    probs = np.sort(np.exp(z - z.max()))[::-1]
    probs /= probs.sum()
    return int(((np.cumsum(probs) - probs) < top_p).sum())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path,
                   default=ROOT / "benchmarks" / "results" / "sample_row_cost_cpu_linux-x86_64-2core.json")
    args = p.parse_args()
    rows = real_logits()
    us = np.random.default_rng(1).random(len(rows))
    settings = {"temperature 0.7": SamplingParams(0.7), "temperature 0.7, top-p 0.9": SamplingParams(0.7, 0.9),
                "temperature 0.7, top-p 0.95": SamplingParams(0.7, 0.95)}
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, s in settings.items():
            rounds.setdefault(f"{name}: blocked draw", []).append(per_row_ms(rows, s, us))
            with mock.patch.object(batch_sample, "draw", running_total_draw):
                rounds.setdefault(f"{name}: running total", []).append(per_row_ms(rows, s, us))
    blocked = [sample_row(z, s, float(u)) for s in settings.values() for z, u in zip(rows, us)]
    with mock.patch.object(batch_sample, "draw", running_total_draw):
        plain = [sample_row(z, s, float(u)) for s in settings.values() for z, u in zip(rows, us)]
    widths = {p: [nucleus_width(z, p) for z in rows] for p in (0.9, 0.95)}
    report = {"benchmark": "sample_row_cost", "machine": machine_info.machine(), "commit": machine_info.commit(),
              "rows": f"{len(rows)} SmolLM2 decode positions, vocabulary {rows.shape[1]}", "rounds": args.rounds,
              "median_ms_per_row": {k: round(statistics.median(v), 4) for k, v in rounds.items()},
              "every_round_ms_per_row": {k: [round(x, 4) for x in v] for k, v in rounds.items()},
              "nucleus_width": {str(p): {"median": float(np.median(w)), "max": max(w),
                                         "wider_than_candidates": sum(x > batch_sample.CANDIDATES for x in w)}
                                for p, w in widths.items()},
              "same_tokens": f"{sum(a == b for a, b in zip(blocked, plain))} of {len(plain)} draws"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_ms_per_row", "nucleus_width", "same_tokens")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
