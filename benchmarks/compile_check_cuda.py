"""Compile every generated CUDA kernel with NVRTC exactly as MLX's `mx.fast.cuda_kernel` would, without a GPU.

For each kernel the source is rendered by applelm.ops.backends.render_cuda (MLX 0.32.4's `build_kernel`
text: its default header, our header, the namespace, the signature, template constants, our body) and
compiled with MLX's NVRTC options (`--device-as-default-execution-space`, `--gpu-architecture=sm_90a`
for an H100, include paths for CCCL and the CUDA runtime headers). MLX hands NVRTC its device headers
(utils.cuh, complex.cuh, config.h) from memory; this script does the same, reading them from an MLX
source checkout (--mlx-src or $MLX_SRC). Without one it uses a small stand-in that declares only what
the wrapper references (Shape/Strides) and says so in its output.

NVRTC is an optional tool here, not a dependency: `pip install -e '.[cuda-check]'` (NVRTC 13, CCCL and CUDA
runtime headers from PyPI). Skips cleanly (exit 0) if NVRTC is absent. Takes ~7 minutes on 2 cores.

    python benchmarks/compile_check_cuda.py [--mlx-src DIR] [--arch sm_90a] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from applelm.ops import kernel_source as ks  # noqa: E402
from applelm.ops.backends import render_cuda  # noqa: E402

DEVICE_HEADERS = ("utils.cuh", "complex.cuh", "config.h")
STAND_IN_UTILS = """
#pragma once
#include "mlx/backend/cuda/device/config.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}
"""
STAND_IN_CONFIG = "#pragma once\n#define MAX_NDIM 10\n#define WARP_SIZE 32\n"


def site_dirs() -> list[Path]:
    import site

    return [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).exists()]


def find_nvrtc() -> Path | None:
    pats = ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "nvidia/cu12/lib/libnvrtc.so.12"]
    for d in site_dirs():
        for p in pats:
            if (d / p).exists():
                return d / p
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        hits = sorted(glob.glob(f"{root}/lib64/libnvrtc.so*"))
        if hits:
            return Path(hits[0])
    return None


def include_dirs() -> list[Path]:
    out = []
    for d in site_dirs():
        for sub in ("nvidia/cu13/include/cccl", "nvidia/cu13/include", "nvidia/cuda_runtime/include",
                    "nvidia/cu12/include"):
            if (d / sub).exists():
                out.append(d / sub)
    return out


def device_headers(mlx_src: str | None) -> tuple[dict[str, str], str]:
    if mlx_src:
        base = Path(mlx_src) / "mlx/backend/cuda/device"
        if all((base / h).exists() for h in DEVICE_HEADERS):
            return ({f"mlx/backend/cuda/device/{h}": (base / h).read_text() for h in DEVICE_HEADERS},
                    f"MLX source checkout {mlx_src}")
        print(f"warning: {base} lacks {DEVICE_HEADERS}; using the stand-in", file=sys.stderr)
    return ({"mlx/backend/cuda/device/utils.cuh": STAND_IN_UTILS,
             "mlx/backend/cuda/device/config.h": STAND_IN_CONFIG}, "stand-in (no MLX source given)")


class NVRTC:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"{major.value}.{minor.value}"

    def compile(self, src: str, name: str, headers: dict[str, str], options: list[str]) -> tuple[bool, str, int]:
        prog = ctypes.c_void_p()
        n = len(headers)
        hsrc = (ctypes.c_char_p * n)(*[v.encode() for v in headers.values()])
        hname = (ctypes.c_char_p * n)(*[k.encode() for k in headers])
        rc = self.lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), n, hsrc, hname)
        if rc:
            return False, f"nvrtcCreateProgram failed ({rc})", 0
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, log)
        cubin = 0
        if rc == 0:
            csize = ctypes.c_size_t()
            if self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(csize)) == 0:
                cubin = csize.value
        self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return rc == 0, log.value.decode(errors="replace"), cubin


def _n(dtype) -> str:
    return str(dtype).split(".")[-1]


def cases():
    """(label, spec, input dtypes, output dtypes, template) for every kernel the runtime can launch."""
    f32, f16, bf16, u8, u32 = mx.float32, mx.float16, mx.bfloat16, mx.uint8, mx.uint32
    for fmt in ks.GGUF_FORMATS:
        from applelm.ops.ggml_types import GGML_TYPES_BY_NAME

        k = 4096
        rb = GGML_TYPES_BY_NAME[fmt].row_bytes(k)
        for t in (f32, f16, bf16):
            for m in (1, 4, 16):
                tpl = [("T", t), ("M", m), ("N", 4096), ("K", k), ("ROW_BYTES", rb), ("R", 2), ("WARPS", 4)]
                yield f"{fmt} matvec T={_n(t)} M={m}", ks.gguf_kernel("cuda", "matvec", fmt), [u8, t], [t], tpl
        tpl = [("T", f16), ("N", 4096), ("K", k), ("ROW_BYTES", rb), ("THREADS", 256)]
        yield f"{fmt} dequant T=float16", ks.gguf_kernel("cuda", "dequant", fmt), [u8], [f16], tpl
        tpl = [("T", f16), ("M", 512), ("N", 4096), ("K", k), ("ROW_BYTES", rb)]
        yield f"{fmt} tiled T=float16 M=512", ks.gguf_kernel("cuda", "tiled", fmt), [u8, f16], [f16], tpl
    for bits in (4, 8):
        for gs in (32, 64, 128):
            for t, s in ((f16, f16), (bf16, bf16), (f32, f32)):
                for m in (1, 16):
                    tpl = [("T", t), ("S", s), ("M", m), ("N", 4096), ("K", 4096), ("BITS", bits), ("GS", gs),
                           ("R", 2), ("WARPS", 4)]
                    yield (f"affine{bits} g{gs} matvec T={_n(t)} M={m}", ks.affine_kernel("cuda"),
                           [u32, s, s, t], [t], tpl)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlx-src", default=os.environ.get("MLX_SRC"), help="root of an ml-explore/mlx checkout")
    ap.add_argument("--arch", default="sm_90a", help="NVRTC --gpu-architecture (MLX uses sm_90a on an H100)")
    ap.add_argument("--out", default=None, help="write a JSON report here")
    ap.add_argument("--verbose", action="store_true", help="print ptxas register/spill lines")
    args = ap.parse_args()

    lib = find_nvrtc()
    if lib is None:
        print("SKIP: NVRTC not found (pip install 'nvidia-cuda-nvrtc>=13,<14' ...); nothing compiled")
        return 0
    nvrtc = NVRTC(lib)
    headers, header_origin = device_headers(args.mlx_src)
    options = ["--device-as-default-execution-space", f"--gpu-architecture={args.arch}", "--ptxas-options=-v"]
    options += [f"--include-path={d}" for d in include_dirs()]
    print(f"NVRTC {nvrtc.version} ({lib}); arch {args.arch}; MLX device headers: {header_origin}")

    results, failed = [], 0
    t0 = time.time()
    for label, spec, ins, outs, tpl in cases():
        name, src = render_cuda(spec, ins, outs, tpl)
        ok, log, cubin = nvrtc.compile(src, name, headers, options)
        regs = re.findall(r"Used (\d+) registers", log)
        spills = re.findall(r"(\d+) bytes spill stores", log)
        entry = {"kernel": label, "name": name, "ok": ok, "cubin_bytes": cubin,
                 "registers": int(regs[-1]) if regs else None, "spill_store_bytes": int(spills[-1]) if spills else None}
        if not ok:
            failed += 1
            entry["log"] = log
            print(f"FAIL {label}\n{log}")
        elif args.verbose:
            print(f"ok   {label}: {entry['registers']} regs, {entry['spill_store_bytes']} B spilled")
        results.append(entry)
    dt = time.time() - t0
    print(f"{len(results) - failed} passed, {failed} failed ({dt:.1f}s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "nvrtc": nvrtc.version, "arch": args.arch, "mlx_device_headers": header_origin,
            "mlx_version": mx.__version__, "options": [o for o in options if not o.startswith("--include")],
            "passed": len(results) - failed, "failed": failed, "results": results}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
