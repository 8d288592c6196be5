"""Where a paged decode's time goes: the evidence behind the flash runtime's read and compute settings.

For one flash layout (by default flash_bench's synthetic model, prepared here if missing):
  - reads: the direct-I/O speed of the layout's own FFN units under several reader settings
    (threads x request size x unit size x reads queued), each for about a second, twice, interleaved;
  - one unit's costs on the device: the host->MLX copy of its bundles, its decode + gemv, both together;
  - for each load option set: a few decode tokens under cProfile (top functions by own time) beside the
    runtime's own counters (bytes read, I/O wait, forced evaluations).

    python benchmarks/flash_profile.py [--device cpu|gpu] [--layout DIR] [--work DIR] [--tokens N]
                                       [--runs paged,sparse-predictor-0.5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import flash_bench  # benchmarks/flash_bench.py: the synthetic model and its preparation

M = 1 << 20
# (label, reader threads, request size, unit size, reads queued); split 0 = one request per unit.
READ_SETTINGS = [("4t x 8MiB, 16MiB units", 4, 8 * M, 16 * M, 4), ("1t x unit, 16MiB units", 1, 0, 16 * M, 4),
                 ("2t x unit, 16MiB units", 2, 0, 16 * M, 4), ("2t x unit, 32MiB units", 2, 0, 32 * M, 3),
                 ("1t x unit, 64MiB units", 1, 0, 64 * M, 2), ("8t x 4MiB, 16MiB units", 8, 4 * M, 16 * M, 4),
                 ("4t x unit, 16MiB units", 4, 0, 16 * M, 4)]
# "env" entries are set while that run loads and decodes.
RUNS = {"paged": {}, "resident-native": {"memory_budget": None, "native": True}, "paged-1t": {"io_threads": 1, "read_split": 1 << 40},
        "paged-no-cuda-prefetch": {"env": {"APPLELM_CUDA_PREFETCH": "off"}},
        "sparse-predictor-0.5-no-cuda-prefetch": {"sparsity": 0.5, "sparsity_mode": "predictor",
                                                  "env": {"APPLELM_CUDA_PREFETCH": "off"}},
        "sparse-predictor-0.7": {"sparsity": 0.7, "sparsity_mode": "predictor"},
        "sparse-predictor-0.5": {"sparsity": 0.5, "sparsity_mode": "predictor"},
        "sparse-predictor-0.9": {"sparsity": 0.9, "sparsity_mode": "predictor"}}


def read_speed(layout, threads: int, split: int, unit_bytes: int, queued: int, seconds: float = 1.0) -> float:
    """GB/s reading the layout's units in forward order (from the middle of the model) with these settings."""
    units = flash_bench.layout_units(layout, unit_bytes)
    speed = flash_bench.read_units_speed(units, threads, split or 1 << 40, queued, seconds, start=len(units) // 2)
    return round(speed / 1e9, 3)


def unit_costs(layout, dtype, unit_bytes: int = 16 * M, iters: int = 10) -> dict:
    """Median ms of one streamed unit's steps on the default device (bundles already in host memory)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from applelm.flash.cuda_prefetch import CudaPrefetcher
    from applelm.flash.paged_mlp import interleaved_ffn

    n = unit_bytes // layout.codec.bundle_bytes
    host = np.random.default_rng(0).integers(0, 255, (n, layout.codec.bundle_bytes), dtype=np.uint8)
    host.view(np.uint16)[:] &= 0x3BFF  # small finite 16-bit floats
    x = mx.random.normal((1, layout.hidden)).astype(dtype)
    raw_dev = mx.array(host)
    mx.eval(x, raw_dev)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(1e3 * sorted(times)[len(times) // 2], 3)

    def ffn(raw):
        return interleaved_ffn(x, layout.codec.decode_interleaved_mx(raw, dtype), nn.silu)

    def prefetched(raw):
        prefetcher.to_device(raw)
        return raw

    prefetcher = CudaPrefetcher()
    out = {"neurons": n, "copy_ms": timed(lambda: mx.eval(mx.array(host))),
           "decode_gemv_ms": timed(lambda: mx.eval(ffn(raw_dev))),
           "copy_decode_gemv_ms": timed(lambda: mx.eval(ffn(mx.array(host)))),
           "cuda_prefetch": prefetcher.available or prefetcher.error}
    if prefetcher.available:
        out["copy_prefetch_decode_gemv_ms"] = timed(lambda: mx.eval(ffn(prefetched(mx.array(host)))))
        out["cuda_prefetch"] = prefetcher.available or prefetcher.error  # off again if a call failed
    return out


def profiled_decode(layout_dir: Path, options: dict, tokens: int, prompt: list[int]) -> dict:
    """Load with `options`, decode one warm-up token, then `tokens` under cProfile. generate_step builds
    step n+1 (where paged layers wait for reads) before handing out token n, so the generator is given
    room for one step past the timed ones: the timed calls then build and finish `tokens` steps."""
    import mlx.core as mx

    from applelm.generation import generate_step
    from applelm.loader import load_model

    model, _, _ = load_model(str(layout_dir), **options)
    rt = model.flash
    steps = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=tokens + 3)
    next(steps)
    next(steps)
    rt.reset_stats()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(tokens):
        next(steps)
    prof.disable()
    elapsed = time.perf_counter() - t0
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    report = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rt.report().items()}
    out = {"plan": rt.plan.describe(), "s_per_token": round(elapsed / tokens, 4), "report": report,
           "cuda_prefetch_calls": rt.prefetch.calls, "cuda_prefetch": rt.prefetch.available or rt.prefetch.error,
           "top_by_own_time": [ln for ln in text.getvalue().splitlines() if ln.strip()][:30]}
    rt.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--layout", default=None, help="a flash layout (default: flash_bench's synthetic model)")
    p.add_argument("--work", default=str(flash_bench.ROOT / ".flash_bench"))
    p.add_argument("--budget", default="1GB")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--runs", default="paged,paged-no-cuda-prefetch,paged-1t,sparse-predictor-0.5,"
                                     "sparse-predictor-0.5-no-cuda-prefetch",
                   help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx
    import numpy as np

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    from applelm.flash.layout import read_layout

    work = Path(args.work)
    if args.layout:
        layout_dir = Path(args.layout)
    else:
        cfg = flash_bench.synthetic_config(1024, 14336, 24)
        src = flash_bench.write_synthetic(work / "synthetic_1024_14336_24", cfg)
        ids = [int(v) for v in np.random.default_rng(1).integers(0, cfg["vocab_size"], 256)]
        layout_dir, _ = flash_bench.prepared(src, work / "synthetic_1024_14336_24_flash", bits=16, dtype="bfloat16",
                                             train_predictors=True, calibration_ids=ids, calibration_tokens=128,
                                             predictor_rank=32)
    layout = read_layout(layout_dir)
    dtype = mx.float16 if args.device == "gpu" else mx.float32
    result = {"command": "python " + " ".join(["benchmarks/flash_profile.py"] + sys.argv[1:]),
              "machine": flash_bench.machine(args.device), "layout": str(layout_dir), "reads_GBps": {}}
    for _ in range(2):
        for label, *setting in READ_SETTINGS:
            result["reads_GBps"].setdefault(label, []).append(read_speed(layout, *setting))
            print(f"read {label}: {result['reads_GBps'][label]}", file=sys.stderr, flush=True)
    # The unit path timed here decodes 16-bit bundles in MLX; quantized stores stream through the kernel.
    result["unit_costs_ms"] = (unit_costs(layout, dtype) if not layout.codec.quantized
                               else "not measured: a quantized store")
    print(f"unit costs: {result['unit_costs_ms']}", file=sys.stderr, flush=True)
    base = {"dtype": "float16"} if args.device == "gpu" else {}
    prompt = [int(v) for v in np.random.default_rng(1).integers(0, layout.config["vocab_size"], 16)]
    result["runs"] = {}
    for name in args.runs.split(","):
        opts = {**base, "memory_budget": args.budget, **RUNS[name]}
        env = opts.pop("env", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            result["runs"][name] = profiled_decode(layout_dir, opts, args.tokens, prompt)
        except Exception as e:  # one failing setting (e.g. a budget too small for it) must not lose the rest
            result["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        r = result["runs"][name]
        print(f"run {name}: {r.get('s_per_token', r.get('error'))} s/token", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
