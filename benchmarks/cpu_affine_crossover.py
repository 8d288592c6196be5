"""On CPU, where does dequantize-then-matmul (BLAS GEMM) beat mx.quantized_matmul for affine weights?

MLX's CPU quantized matmul costs time proportional to the activation rows; dequantizing once and calling
the (preloaded, fast) BLAS costs a fixed dequantization plus a cheap GEMM. The crossover row count recorded
in ops/dispatch.py (CPU_AFFINE_DEQUANT_MIN_ROWS) comes from this script's results file.

    python benchmarks/cpu_affine_crossover.py [--out benchmarks/results/cpu_affine_crossover.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import applelm  # noqa: F401  (preloads the fast BLAS before mlx; see applelm/_blas.py)
import mlx.core as mx
from applelm import _blas
from applelm.ops import dispatch

# (out, in) shapes of SmolLM2-135M and Gemma 3 270M layers, and their large output heads.
SHAPES = [(1536, 576), (576, 1536), (2048, 640), (640, 2048), (49152, 576), (262144, 640)]
ROWS = [1, 2, 4, 8, 16, 64]
CONFIGS = [(4, 32), (4, 64), (8, 32)]


def seconds(fn, reps: int = 5) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_affine_crossover.json"))
    args = ap.parse_args()
    rows = []
    for bits, gs in CONFIGS:
        for n, k in SHAPES:
            w = mx.random.normal((n, k))
            wq, s, b = mx.quantize(w, gs, bits)
            mx.eval(wq, s, b)
            for m in ROWS:
                x = mx.random.normal((m, k))
                qmm = seconds(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits))
                deq = seconds(lambda: x @ mx.dequantize(wq, s, b, gs, bits).T)
                rows.append({"bits": bits, "group_size": gs, "out": n, "in": k, "rows": m,
                             "quantized_matmul_ms": round(qmm * 1e3, 3), "dequant_matmul_ms": round(deq * 1e3, 3)})
                print(f"{bits}-bit g{gs} {n}x{k} rows {m:3d}: qmm {qmm*1e3:8.2f} ms  dequant+matmul {deq*1e3:8.2f} ms",
                      flush=True)
    # per weight-size class (as ops/dispatch.py classes shapes): the smallest row count from which
    # dequantize-then-matmul wins for every shape and config of that class
    crossover = {}
    for cls in ("small", "large"):
        of_class = [r for r in rows if dispatch.shape_class(r["out"], r["in"]) == cls]
        crossover[cls] = min(m for m in ROWS if all(r["dequant_matmul_ms"] < r["quantized_matmul_ms"]
                                                    for r in of_class if r["rows"] >= m))
    report = {"benchmark": "cpu_affine_crossover", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "mlx": mx.__version__,
                          "blas": _blas.loaded, "load_avg": os.getloadavg()},
              "dequant_wins_from_rows": crossover, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"dequantize-then-matmul wins from these row counts per shape class: {crossover}; written to {args.out}")


if __name__ == "__main__":
    main()
