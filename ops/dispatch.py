"""One entry point per op that picks the implementation for the current device and problem shape.

Metal GPU -> the Metal form of our kernels, CUDA GPU -> the CUDA form, CPU -> our compiled C kernels for GGUF
and MLX-affine rows (cpu_native) where they build, else the plain-MLX reference path (or the CPU bridge to
mx.quantized_matmul where it was measured faster). Model code never sees this choice: it calls
GGUFLinear / GGUFEmbedding / AffineQuantizedLinear, which call these.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..switches import switched_off
from . import backends, cpu_bridge, cpu_native, reference

# --- tables: every entry comes from a benchmark run, never a guess ----------------------------------
# GPU entries: NVIDIA H100 (MLX 0.32.4 CUDA), benchmarks/results/qmatmul_bench_gpu_h100.json plus the earlier
# partial run beside it (benchmarks/results/gpu_h100/), Llama-3-8B layer shapes (all "large"), fp16
# activations, 1/4/16/512 rows. No Metal figure exists (no Apple GPU reachable); Metal takes the same entries.

# Affine decode: {(bits, group_size, shape class, rows class): "ours" | "mlx"}. Measured: our matvec never beat
# mx.quantized_matmul by more than the run-to-run spread (4-bit g64: at best 0.134 vs 0.137 ms), so no entry
# says "ours" and every decode case uses MLX's kernel.
AFFINE_TABLE: dict[tuple[int, int, str, str], str] = {}
# Affine prefill on GPU: dequantizing into a scratch (fp16 in the run) and calling mx.matmul beat
# mx.quantized_matmul 1.5-2.1x at 512 rows on all four shapes, in both runs (e.g. 14336x4096: 0.24 vs 0.45 ms).
# Only 512 was measured (at 16 rows MLX's kernel is 2-5x faster), so the switch starts there.
GPU_AFFINE_DEQUANT_MIN_ROWS = 512

# GGUF on GPU: {(ggml_type, shape class, rows class): "matvec_r1" | "matvec_r2" | "matvec_r4" | "tiled" |
# "dequant"} (matvec_rN: the decode kernel with N output rows per warp). Fastest variant per cell, each rows
# class measured at one count (1, 4, 16, 512); formats and shape classes without an entry use the defaults
# (matvec, R=2, up to 16 rows; dequantize-then-matmul above).
GGUF_GPU_TABLE: dict[tuple[str, str, str], str] = {
    ("Q4_0", "large", "1"): "matvec_r4", ("Q4_0", "large", "2-4"): "matvec_r4",
    ("Q4_0", "large", "5-16"): "tiled", ("Q4_0", "large", "17+"): "dequant",
    ("Q8_0", "large", "1"): "matvec_r4", ("Q8_0", "large", "2-4"): "matvec_r4",
    ("Q8_0", "large", "5-16"): "tiled", ("Q8_0", "large", "17+"): "dequant",
    ("Q4_K", "large", "1"): "matvec_r2", ("Q4_K", "large", "2-4"): "tiled",
    ("Q4_K", "large", "5-16"): "tiled", ("Q4_K", "large", "17+"): "dequant",
    ("Q6_K", "large", "1"): "matvec_r2", ("Q6_K", "large", "2-4"): "tiled",
    ("Q6_K", "large", "5-16"): "tiled", ("Q6_K", "large", "17+"): "dequant",
}

# GGUF on CPU, measured on the 2-core x86-64 dev machine with MKL preloaded (MLX 0.32.4, benchmarks/results/
# qmatmul_bench_cpu-small_linux-x86_64-2core.json): MLX's CPU quantized matmul costs time in proportion to
# the activation rows, so the bridge loses to dequantize-then-GEMM from 2 rows on (2-35x at 2-64 rows); at
# 1 row it wins on some shapes (2048x640: 0.44-0.6x the time) and loses on others (640x2048: 1.3-1.6x).
# Largest activation row count that takes the bridge:
CPU_BRIDGE_MAX_ROWS = 1
# Our compiled C kernel (cpu_native), same file (its run at 07fc3f6): fastest of every variant at 1-16 rows on
# every shape and format measured, 1.4-19x (e.g. 2048x640 Q5_0, 1 row: 0.38 ms against 3.99 for the bridge;
# the 262144x640 Q8_0 head: 13.4 against 227 ms); at 64 rows it lost on the 640x2048 shapes (0.48-0.99x)
# and won on the others. Largest activation row count that takes it (prompts above it dequantize):
CPU_NATIVE_MAX_ROWS = 16

# Affine on CPU: MLX's quantized matmul costs time in proportion to the activation rows, while dequantizing
# once and calling the (preloaded, fast) BLAS GEMM costs a fixed dequantization plus a cheap product.
# Smallest row count from which the latter wins, per shape class, measured on the 2-core x86-64 dev machine
# with MKL preloaded (benchmarks/results/cpu_affine_crossover.json):
CPU_AFFINE_DEQUANT_MIN_ROWS = {"small": 4, "large": 64}
# Our compiled affine kernel (cpu_native.affine_matmul: 4/8-bit, groups 32/64/128), float32 scales as the CPU
# loader keeps them (benchmarks/results/qmatmul_bench_cpu-small_linux-x86_64-2core-affine.json, 4-bit g32/g64 and
# 8-bit g64): faster than mx.quantized_matmul and dequantize-then-GEMM at 1-64 rows on every shape, 1.1-28x the
# best of them (1536x576 4-bit g64, 1 row: 0.14 against 0.94 ms; 8192x2048, 1 row: 1.38 against 17.5 ms, 64 rows:
# 58 against 201; 640x2048 at 64 rows: 5.1 against 5.7). Above 64 rows (not measured) prompts dequantize.
CPU_AFFINE_NATIVE_MAX_ROWS = 64

DECODE_MAX_ROWS = backends.MAX_DECODE_ROWS
# Prefill scratch chunk on GPU: fp16 elements dequantized at once (128 Mi = 256 MiB).
GPU_SCRATCH_ELEMENTS = 1 << 27


def backend() -> str:
    """'metal', 'cuda' or 'cpu' for the default device."""
    if mx.default_device().type == mx.DeviceType.gpu:
        if mx.metal.is_available():
            return "metal"
        if mx.cuda.is_available():
            return "cuda"
    return "cpu"


def shape_class(n: int, k: int) -> str:
    """'small' (< 16 Mi weights: per-launch overhead dominates) or 'large'."""
    return "small" if n * k < (1 << 24) else "large"


def rows_class(m: int) -> str:
    return "1" if m == 1 else "2-4" if m <= 4 else "5-16" if m <= 16 else "17+"


def _kernel_ok(x2: mx.array, *arrays: mx.array) -> bool:
    # Metal binds inputs under 8 elements in `constant` space, which our helpers don't take; tiny
    # matrices are not worth a custom launch anyway.
    return all(a.size >= 8 for a in (x2, *arrays)) and x2.dtype in (mx.float32, mx.float16, mx.bfloat16)


def _native_kernel_takes(be: str, m: int, ggml_type: str) -> bool:
    """Whether m activation rows of a GGUF matmul go to the compiled CPU kernel (when it builds)."""
    return (be == "cpu" and m <= CPU_NATIVE_MAX_ROWS and ggml_type in cpu_native.TYPES
            and cpu_native.load() is not None)


def gguf_matmul(x: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                scratch_elements: Optional[int] = None) -> mx.array:
    """x (..., n_cols) @ W.T for packed GGUF rows W (N, row_bytes) -> (..., N), in x's dtype.
    scratch_elements: where rows are dequantized for a matmul (prompts), at most this many floats at a time
    (default: reference.CHUNK_ELEMENTS on the CPU, GPU_SCRATCH_ELEMENTS on a GPU)."""
    reference.ggml_type_info(ggml_type)
    lead, n = x.shape[:-1], packed.shape[0]
    x2 = x.reshape(-1, n_cols)
    m = x2.shape[0]
    be = backend()
    if _native_kernel_takes(be, m, ggml_type):
        try:
            return cpu_native.gguf_matmul(x, packed, ggml_type, n_cols)
        except cpu_native.Tracing:  # inside mx.compile: MLX ops only
            pass
    if be == "cpu" or not _kernel_ok(x2, packed):
        if m <= CPU_BRIDGE_MAX_ROWS and ggml_type in cpu_bridge.BRIDGEABLE:
            return cpu_bridge.bridge_matmul(x, packed, ggml_type, n_cols)
        return reference.gguf_matmul(x, packed, ggml_type, n_cols, scratch_elements or reference.CHUNK_ELEMENTS)
    how = gguf_gpu_choice(ggml_type, n, n_cols, m)
    if how.startswith("matvec"):
        out = backends.gguf_matvec(be, x2, packed, ggml_type, n_cols, rows_per_warp=int(how[-1]))
    elif how == "tiled":
        out = backends.gguf_tiled(be, x2, packed, ggml_type, n_cols)
    else:
        # The scratch keeps x's dtype: an fp16 scratch under float32 activations cost 3e-4 relative error
        # on the H100 check (benchmarks/gpu_check_ops.py), against exact float32 elsewhere.
        out = _chunked_dense_matmul(x2, (packed,), lambda p: backends.gguf_dequant(
            be, p, ggml_type, n_cols, x2.dtype), scratch_elements or GPU_SCRATCH_ELEMENTS)
    return out.reshape(*lead, n)


def gguf_matmul_host(x: mx.array, packed: np.ndarray, ggml_type: str, n_cols: int,
                     scratch_elements: Optional[int] = None) -> mx.array:
    """gguf_matmul for packed rows in host memory (numpy, e.g. a flash read buffer): the CPU kernel reads
    them in place; every other path multiplies an MLX copy. Either way the buffer is free on return."""
    if _native_kernel_takes(backend(), x.size // n_cols, ggml_type):
        try:
            return cpu_native.gguf_matmul_host(x, packed, ggml_type, n_cols)
        except cpu_native.Tracing:
            pass
    return gguf_matmul(x, mx.array(packed), ggml_type, n_cols, scratch_elements)


def _fuses(m: int, ggml_types: list[str]) -> bool:
    """Whether m activation rows of products in these formats go to one fused kernel call (APPLELM_FUSE=off:
    never)."""
    be = backend()
    return not switched_off("APPLELM_FUSE") and all(_native_kernel_takes(be, m, t) for t in ggml_types)


def gguf_matmuls(x: mx.array, weights: Sequence[tuple[mx.array, str]], n_cols: int) -> list[mx.array]:
    """[gguf_matmul(x, W, ggml_type, n_cols) for (W, ggml_type) in weights]: one call of the CPU kernel where it
    takes every weight (q, k and v, say: one hand-off and one wake-up of its threads instead of three).
    APPLELM_FUSE=off makes one call per weight (benchmarks/fused_decode.py compares the two)."""
    if 1 < len(weights) <= cpu_native.MAX_PRODUCTS and _fuses(x.size // n_cols, [t for _, t in weights]):
        try:
            return cpu_native.gguf_matmuls(x, weights, n_cols)
        except cpu_native.Tracing:
            pass
    return [gguf_matmul(x, w, t, n_cols) for w, t in weights]


def gguf_ffn_fused(x: mx.array, gate: tuple, up: tuple, down: tuple, activation: str) -> Optional[mx.array]:
    """The gated FFN of x through one call of the CPU kernel (no round trip to MLX between its products), or
    None where that kernel does not take it, or with APPLELM_FUSE=off (then the caller composes gguf_matmul and
    MLX's activation). Each weight is (packed rows, ggml_type), the rows an MLX array or numpy (host memory,
    such as a flash read buffer: read in place)."""
    if activation in cpu_native.ACTIVATIONS and _fuses(x.size // x.shape[-1], [t for _, t in (gate, up, down)]):
        try:
            return cpu_native.gguf_ffn(x, gate, up, down, activation)
        except cpu_native.Tracing:
            pass
    return None


def gguf_gpu_choice(ggml_type: str, n: int, n_cols: int, m: int) -> str:
    """The GPU variant for an (n x n_cols) GGUF matrix and m activation rows (the table, else defaults)."""
    default = f"matvec_r{backends.MATVEC_ROWS_PER_WARP}" if m <= DECODE_MAX_ROWS else "dequant"
    how = GGUF_GPU_TABLE.get((ggml_type, shape_class(n, n_cols), rows_class(m)), default)
    return how if m <= DECODE_MAX_ROWS or not how.startswith("matvec") else "dequant"


def _chunked_dense_matmul(x2: mx.array, parts: tuple, dequant,
                          scratch_elements: int = GPU_SCRATCH_ELEMENTS) -> mx.array:
    """x2 @ W.T with W = dequant(*parts) (arrays of W's rows) dequantized `scratch_elements` at a time, each
    step ordered after the previous product (reference.chain_chunks). Unchained, MLX dequantized every step
    first: a 1024x1024 Q4_1 matrix in 64 Ki-float steps peaked at 4.55 MB beyond the output; chained, 1.29 MB."""
    step = max(1, scratch_elements // x2.shape[-1])
    outs = reference.chain_chunks(lambda *rows: x2 @ dequant(*rows).T.astype(x2.dtype), parts[0], step, *parts[1:])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def gguf_embedding(ids: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                   dtype: mx.Dtype = mx.float32) -> mx.array:
    """Rows `ids` of a packed table, dequantized to `dtype`; only the gathered rows are decoded."""
    reference.ggml_type_info(ggml_type)
    be = backend()
    rows = mx.take(packed, ids.reshape(-1), axis=0)
    if be == "cpu" or rows.size < 8 or dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return reference.gguf_embedding(ids, packed, ggml_type, n_cols, dtype)
    out = backends.gguf_dequant(be, rows, ggml_type, n_cols, dtype)
    return out.reshape(*ids.shape, n_cols)


def affine_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int) -> mx.array:
    """x @ W.T for MLX affine-quantized W: on the CPU our compiled kernel up to CPU_AFFINE_NATIVE_MAX_ROWS rows;
    on a GPU our decode kernel where the table says so; else MLX's quantized matmul or dequantize-then-matmul."""
    lead, n = x.shape[:-1], w.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    be = backend()
    if (be == "cpu" and m <= CPU_AFFINE_NATIVE_MAX_ROWS and biases is not None
            and cpu_native.affine_supported(bits, group_size, scales)):
        try:
            return cpu_native.affine_matmul(x, w, scales, biases, bits, group_size)
        except cpu_native.Tracing:  # inside mx.compile: MLX ops only
            pass
    if be == "cpu" and m >= CPU_AFFINE_DEQUANT_MIN_ROWS[shape_class(n, k)]:
        return x @ mx.dequantize(w, scales, biases, group_size, bits).T.astype(x.dtype)
    if be != "cpu" and m >= GPU_AFFINE_DEQUANT_MIN_ROWS:
        dt = x2.dtype
        out = _chunked_dense_matmul(x2, (w, scales, biases), lambda *rows: mx.dequantize(
            *rows, group_size, bits, dtype=dt))
        return out.reshape(*lead, n)
    key = (bits, group_size, shape_class(n, k), rows_class(m))
    if (be != "cpu" and m <= DECODE_MAX_ROWS and bits in (4, 8) and group_size in (32, 64, 128)
            and AFFINE_TABLE.get(key) == "ours" and _kernel_ok(x2, w, scales, biases)):
        return backends.affine_matvec(be, x2, w, scales, biases, bits, group_size).reshape(*lead, n)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
