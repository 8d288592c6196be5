"""What one streamed FFN unit costs on the CPU, step by step, beside the same layer held pinned in float32.

The SmolLM2 layer shape (1536 neurons x [up, down, gate] x 576) stored as bfloat16 bundles, one token:
the pinned float32 gemv, the gemv in 16-bit (MLX's CPU half-precision matmul), and the conversions a
streamed unit needs before a float32 gemv (MLX astype, numpy shift into a buffer, the copy into MLX).
Median of --iters calls each, after a warm-up. Decides where the paged path's CPU time goes (docs/flash.md).
The native kernel's row computes the whole FFN of the unit (both gemvs, the activation, the down sum),
the MLX rows only the first gemv; the weights here are the same bytes, in cache after the warm-up.

    python benchmarks/flash_unit_cost.py [--out benchmarks/results/flash_unit_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import applelm  # noqa: F401  (before mlx: preloads a fast BLAS on Linux CPU)
import mlx.core as mx
import numpy as np

import machine_info  # benchmarks/machine_info.py
from applelm.flash import native
from applelm.flash.codec import BundleCodec, bf16_to_f32


def median_ms(fn, iters: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--neurons", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flash_unit_cost_cpu.json"))
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    n, h = args.neurons, args.hidden
    w32 = mx.array(np.random.default_rng(0).standard_normal((3 * n, h)).astype(np.float32) * 0.02)
    w16 = w32.astype(mx.bfloat16)
    mx.eval(w32, w16)
    bits = np.array(w16.view(mx.uint16))  # the bundles as read from disk
    buf = np.empty(bits.shape, np.float32)
    x = mx.random.normal((1, h))
    mx.eval(x)
    steps = {
        "pinned float32 gemv": lambda: x @ w32.T,
        "bfloat16 gemv (no conversion)": lambda: x.astype(mx.bfloat16) @ w16.T,
        "copy into MLX (mx.array of the bytes)": lambda: mx.array(bits),
        "MLX astype bfloat16->float32": lambda: w16.astype(mx.float32),
        "MLX astype + float32 gemv": lambda: x @ w16.astype(mx.float32).T,
        "numpy shift into a buffer (no MLX)": lambda: (bf16_to_f32(bits, buf), mx.array(0))[1],
        "numpy shift + copy into MLX": lambda: mx.array(bf16_to_f32(bits, buf)),
        "streamed, MLX path: copy + astype + gemv": lambda: x @ mx.array(bits).view(mx.bfloat16).astype(mx.float32).T,
    }
    kernel = native.bundle_ffn(BundleCodec(h, 16, "bfloat16"), "silu")
    if kernel is not None:  # the whole unit (up, gate, act, down) straight from the bytes, as paging runs it
        xn, out = np.array(x).reshape(-1), np.zeros(h, np.float32)
        bundles = bits.reshape(n, 3 * h).view(np.uint8)
        steps["streamed, native kernel (whole FFN of the unit)"] = lambda: (kernel(xn, bundles, out), mx.array(0))[1]
    results = {name: median_ms(fn, args.iters) for name, fn in steps.items()}
    for name, ms in results.items():
        print(f"{name:40s} {ms:8.3f} ms")
    report = {"benchmark": "flash_unit_cost", "date": time.strftime("%Y-%m-%d %H:%M"), "mlx": mx.__version__,
              "machine": machine_info.machine(), "unit": {"neurons": n, "hidden": h, "bytes_bf16": bits.nbytes},
              "iters": args.iters, "median_ms": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
