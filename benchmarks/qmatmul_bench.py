"""Quantized matmul benchmark: our GGUF/affine paths beside mx.quantized_matmul and dequantize-then-matmul.

GPU (Llama-3-8B layer shapes (out x in) 4096x4096, 4096x14336, 14336x4096, 128256x4096 at 1, 4, 16, 512
activation rows; Q4_0, Q4_K, Q6_K, Q8_0 and MLX affine 4-bit g64):
    PYTHONUNBUFFERED=1 python3 benchmarks/qmatmul_bench.py --device-name h100 --hbm-tbps 3.35 --out-dir $OUT
CPU (smaller shapes, our compiled C kernel vs reference path vs CPU bridge vs dequantize-then-matmul):
    python benchmarks/qmatmul_bench.py --cpu-small --device-name <machine> --out-dir benchmarks/results
GB/s counts the packed weight bytes read once per call (the activations are negligible at these sizes).
The JSON lists, per (format, shape class, rows class), the fastest of our variants and whether it beat MLX:
these are the entries to record in ops/dispatch.py's tables. Needs only numpy + mlx.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# applelm comes installed (editable here, a wheel on the GPU machine): the repository root is not put on
# sys.path, where its applelm/ folder (without ops/ and models/) would shadow the installed package.
sys.path.insert(0, str(ROOT / "tests"))

import applelm  # noqa: E402,F401  (before mlx: preloads a fast BLAS on Linux CPU; see applelm/_blas.py)
import mlx.core as mx  # noqa: E402
from gguf_blocks import random_blocks  # noqa: E402  (numpy only)

from applelm.ops import backends, cpu_bridge, cpu_native, dispatch, reference  # noqa: E402
from applelm.ops.ggml_types import GGML_TYPES_BY_NAME  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (128256, 4096)]
GPU_ROWS = [1, 4, 16, 512]
GPU_FORMATS = ["Q4_0", "Q4_K", "Q6_K", "Q8_0", "affine4_g64"]
# CPU: the Gemma 3 270M shapes the runtime actually meets (out x in), plus the 262144x640 tied head, and
# SmolLM2's FFN shape (Q4_1 in its file); Llama-3.2-1B's FFN shape, a "large" one, for the affine formats
# (decode_bench's 1b-q4 row).
CPU_SHAPES = [(640, 2048), (2048, 640), (1024, 640), (1536, 576), (262144, 640), (8192, 2048)]
CPU_ROWS = [1, 2, 4, 16, 64]
CPU_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "affine4_g64", "affine8_g64", "affine4_g32"]


def timed(fn, iters: int, batch: int) -> float:
    """Seconds per call: `batch` calls queued and evaluated together, best of `iters` rounds, after warm-up."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(batch)])
        best = min(best, (time.perf_counter() - t0) / batch)
    return best


def make_weights(fmt: str, n: int, k: int, dtype=mx.float16):
    """Packed weights of `fmt` and their bytes; affine scales and biases in `dtype` (the CPU loader keeps them
    as float32, a GPU as the checkpoint's float16)."""
    if fmt.startswith("affine"):
        bits, gs = int(fmt[6]), int(fmt.split("_g")[1])
        w = mx.random.normal((n, k), key=mx.random.key(0)).astype(dtype)
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        mx.eval(wq, s, b)
        return (wq, s, b, bits, gs), wq.nbytes + s.nbytes + b.nbytes
    packed = mx.array(random_blocks(fmt, n, k, seed=1))
    mx.eval(packed)
    return packed, packed.nbytes


def variants(backend: str, fmt: str, weights, n: int, k: int, m: int, cpu_small: bool):
    """name -> zero-argument callable for every implementation that applies."""
    out = {}
    if fmt.startswith("affine"):
        wq, s, b, bits, gs = weights
        out["mlx_qmm"] = lambda x: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
        if backend == "cpu":
            out["ours_dispatch"] = lambda x: dispatch.affine_matmul(x, wq, s, b, bits, gs)
            if cpu_native.affine_supported(bits, gs, s):
                out["cpu_native"] = lambda x: cpu_native.affine_matmul(x, wq, s, b, bits, gs)
        if backend != "cpu" and m <= backends.MAX_DECODE_ROWS:
            for r in (1, 2, 4):
                out[f"ours_matvec_R{r}"] = (lambda r: lambda x: backends.affine_matvec(backend, x, wq, s, b, bits, gs,
                                                                                       rows_per_warp=r))(r)
        out["dequant_then_matmul"] = lambda x: x @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).T
        return out
    packed = weights
    if backend == "cpu":
        out["ours_dispatch"] = lambda x: dispatch.gguf_matmul(x, packed, fmt, k)
        if fmt in cpu_native.TYPES and cpu_native.load() is not None:
            out["cpu_native"] = lambda x: cpu_native.gguf_matmul(x, packed, fmt, k)
        out["reference_chunked"] = lambda x: reference.gguf_matmul(x, packed, fmt, k)
        if fmt in cpu_bridge.BRIDGEABLE:
            out["cpu_bridge"] = lambda x: cpu_bridge.bridge_matmul(x, packed, fmt, k)
        if n * k <= (1 << 24):  # whole-matrix variants only where the float weight is modest
            out["reference_compiled_dequant"] = lambda x: x @ reference.dequantize(packed, fmt, k, compiled=True).T
            out["dequant_then_matmul"] = lambda x: x @ reference.dequantize(packed, fmt, k).T
        return out
    if m <= backends.MAX_DECODE_ROWS:
        for r in (1, 2, 4):
            out[f"ours_matvec_R{r}"] = (lambda r: lambda x: backends.gguf_matvec(backend, x, packed, fmt, k,
                                                                               rows_per_warp=r))(r)
    out["ours_tiled"] = lambda x: backends.gguf_tiled(backend, x, packed, fmt, k)
    out["dequant_then_matmul"] = lambda x: x @ backends.gguf_dequant(backend, packed, fmt, k, x.dtype).T
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="CPU mode: smaller shapes, CPU paths")
    ap.add_argument("--device-name", default=None, help="goes into the results file name")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for %% of peak (H100: 3.35)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--formats", default=None, help="comma list to restrict formats")
    args = ap.parse_args()

    backend = dispatch.backend()
    if args.cpu_small:
        mx.set_default_device(mx.cpu)
        backend = "cpu"
    elif backend == "cpu":
        print("no GPU: run with --cpu-small on a CPU machine")
        return 0
    shapes, rows, formats = (CPU_SHAPES, CPU_ROWS, CPU_FORMATS) if args.cpu_small else (GPU_SHAPES, GPU_ROWS, GPU_FORMATS)
    if args.formats:
        formats = args.formats.split(",")
    dtype = mx.float32 if backend == "cpu" else mx.float16
    name = args.device_name or (platform.node() if backend == "cpu" else backend)
    results, best = [], {}
    for n, k in shapes:
        for fmt in formats:
            if not fmt.startswith("affine") and k % GGML_TYPES_BY_NAME[fmt].block_size:
                continue
            if args.cpu_small and n > 100000 and fmt not in ("Q8_0", "affine4_g64", "affine8_g64"):
                continue  # the tied head is Q8_0 in the Gemma file; keep the CPU run short
            if args.cpu_small and n == 8192 and not fmt.startswith("affine"):
                continue
            weights, nbytes = make_weights(fmt, n, k, dtype)
            for m in rows:
                if args.cpu_small and n > 100000 and m > 1:
                    continue
                x = mx.random.normal((m, k), key=mx.random.key(m)).astype(dtype)
                mx.eval(x)
                big = n * k * max(m, 16) > (1 << 28)
                batch = 1 if (backend == "cpu" and big) else (3 if backend == "cpu" else 20)
                iters = 2 if (backend == "cpu" and big) else args.iters
                row = {"format": fmt, "n": n, "k": k, "m": m, "weight_bytes": nbytes, "dtype": str(dtype), "ms": {}}
                for vname, fn in variants(backend, fmt, weights, n, k, m, args.cpu_small).items():
                    try:
                        sec = timed(lambda: fn(x), iters, batch)
                    except Exception as e:  # noqa: BLE001 - record and go on
                        row["ms"][vname] = f"error: {e}"
                        continue
                    row["ms"][vname] = round(sec * 1e3, 4)
                    row.setdefault("gbps", {})[vname] = round(nbytes / sec / 1e9, 2)
                    if backend != "cpu":
                        row.setdefault("pct_hbm", {})[vname] = round(100 * nbytes / sec / (args.hbm_tbps * 1e12), 1)
                timings = {v: t for v, t in row["ms"].items() if isinstance(t, float)}
                if timings:
                    row["fastest"] = min(timings, key=timings.get)
                    key = f"{fmt}|{dispatch.shape_class(n, k)}|{dispatch.rows_class(m)}"
                    best.setdefault(key, []).append(row["fastest"])
                print(json.dumps(row), flush=True)
                results.append(row)
    out = {
        "device_name": name, "backend": backend, "mlx": mx.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "hbm_tbps": None if backend == "cpu" else args.hbm_tbps,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "activation_dtype": str(dtype),
        "dispatch_suggestions": best, "results": results,
    }
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.out_dir) / f"qmatmul_bench_{'cpu-small' if args.cpu_small else 'gpu'}_{name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
