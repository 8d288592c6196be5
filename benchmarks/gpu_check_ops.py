"""Run every GPU kernel against the plain-MLX reference path and write a JSON report (needs numpy + mlx only).

On the lent CUDA machine (see ../shared/gpu/README.md), after installing MLX's CUDA wheel:
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check_ops.py --out $OUT/gpu_check_ops.json
Reference values come from applelm.ops.reference evaluated on the CPU stream; weights are random valid
blocks made with numpy (tests/gguf_blocks.random_blocks), so the `gguf` package is not needed there.
Without a GPU it prints SKIP and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# applelm comes installed (editable here, a wheel on the GPU machine): the repository root is not put on
# sys.path, where its applelm/ folder (without ops/ and models/) would shadow the installed package.
sys.path.insert(0, str(ROOT / "tests"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from gguf_blocks import random_blocks  # noqa: E402  (numpy only)

from applelm.ops import backends, dispatch, reference  # noqa: E402
from applelm.ops.reference import SUPPORTED  # noqa: E402

K_QUANTS = {t for t in SUPPORTED if t.endswith("_K")}


def rel_err(got: mx.array, want: np.ndarray) -> float:
    g = np.array(got.astype(mx.float32), dtype=np.float64)
    return float(np.abs(g - want).max() / (np.abs(want).max() + 1e-12))


def cpu(fn, *args, **kw):
    with mx.stream(mx.cpu):
        out = fn(*args, **kw)
        mx.eval(out)
    return np.array(out, dtype=np.float64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--formats", default=None, help="comma list of GGUF formats (default: all); every format "
                    "compiles its own kernels, ~4 min each on the H100 for the full shape set")
    args = ap.parse_args()
    be = dispatch.backend()
    report = {"mlx": mx.__version__, "backend": be, "device": str(mx.default_device()), "results": []}
    if be == "cpu":
        print("SKIP: no Metal or CUDA GPU; nothing to check")
        report["skipped"] = True
    else:
        try:
            report["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
        except Exception:  # noqa: BLE001 - informational only
            pass
    results = report["results"]
    # Tolerances: fp32 accumulation in a different order (and FMA) vs the reference; fp16 I/O rounding.
    tol = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 3e-2}

    def record(**kw):
        kw["ok"] = kw["rel_err"] <= kw["tol"]
        results.append(kw)
        print(("ok  " if kw["ok"] else "FAIL") + " " + json.dumps(kw), flush=True)

    shapes = [(7, 1), (300, 2), (4096, 16)] if not args.quick else [(300, 2)]
    formats = args.formats.split(",") if args.formats else list(SUPPORTED)
    for fmt in formats if be != "cpu" else []:
        for n, kb in shapes:
            k = kb * (256 if fmt in K_QUANTS else 32)
            packed_np = random_blocks(fmt, n, k, seed=n)
            packed = mx.array(packed_np)
            w_ref = cpu(reference.dequantize, packed, fmt, k)
            for dt in (mx.float32, mx.float16, mx.bfloat16):
                out = backends.gguf_dequant(be, packed, fmt, k, dt)
                record(kernel="dequant", format=fmt, n=n, k=k, dtype=str(dt), rel_err=rel_err(out, w_ref),
                       tol=tol[dt] if dt != mx.float32 else 1e-6)
            for m in (1, 3, 16, 64):
                x_np = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                want = x_np.astype(np.float64) @ w_ref.T
                for dt in (mx.float32, mx.float16):
                    x = mx.array(x_np).astype(dt)
                    if m <= backends.MAX_DECODE_ROWS:
                        for r in (1, 2, 4):
                            out = backends.gguf_matvec(be, x, packed, fmt, k, rows_per_warp=r)
                            record(kernel=f"matvec R={r}", format=fmt, n=n, k=k, m=m, dtype=str(dt),
                                   rel_err=rel_err(out, want), tol=tol[dt])
                    out = backends.gguf_tiled(be, x, packed, fmt, k)
                    record(kernel="tiled", format=fmt, n=n, k=k, m=m, dtype=str(dt), rel_err=rel_err(out, want), tol=tol[dt])
                    out = dispatch.gguf_matmul(x, packed, fmt, k)
                    record(kernel="dispatch", format=fmt, n=n, k=k, m=m, dtype=str(dt), rel_err=rel_err(out, want), tol=tol[dt])
            ids = mx.array([0, n - 1, n // 2, 0])
            out = dispatch.gguf_embedding(ids, packed, fmt, k, mx.float32)
            record(kernel="embedding", format=fmt, n=n, k=k, dtype="float32", rel_err=rel_err(out, w_ref[[0, n - 1, n // 2, 0]]),
                   tol=1e-6)
    for bits in (4, 8) if be != "cpu" else ():
        for gs in (32, 64, 128):
            for n, k in ((24, 256), (4096, 4096)):
                w = mx.random.normal((n, k), key=mx.random.key(n))
                wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
                for m in (1, 4, 16):
                    x = mx.random.normal((m, k), key=mx.random.key(m))
                    for dt in (mx.float16, mx.bfloat16, mx.float32):
                        xs, ss, bs = x.astype(dt), s.astype(dt), b.astype(dt)
                        want = cpu(mx.quantized_matmul, xs.astype(mx.float32), wq, ss.astype(mx.float32),
                                   bs.astype(mx.float32), transpose=True, group_size=gs, bits=bits)
                        for r in (1, 2, 4):
                            out = backends.affine_matvec(be, xs, wq, ss, bs, bits, gs, rows_per_warp=r)
                            record(kernel=f"affine matvec R={r}", bits=bits, group_size=gs, n=n, k=k, m=m,
                                   dtype=str(dt), rel_err=rel_err(out, want), tol=tol[dt])
    failed = sum(not r["ok"] for r in results)
    report.update(passed=len(results) - failed, failed=failed, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"{len(results) - failed} passed, {failed} failed")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
