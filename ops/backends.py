"""Build the shared kernel source for Metal (`mx.fast.metal_kernel`) or CUDA (`mx.fast.cuda_kernel`) and launch it.

Kernels are built once per (backend, kernel) and cached; MLX itself caches the compiled program per
template instantiation. `render_cuda` / `render_metal` reproduce the exact text MLX 0.32.4 wraps around a
body (mlx/backend/cuda/custom_kernel.cpp `build_kernel`, mlx/backend/common/metal_kernel.cpp
`write_signature`), so the source can be compile-checked and inspected without a GPU.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from . import kernel_source as ks

# Launch shape of the decode matvec: WARPS warps per threadgroup, R output rows per warp. R is measured
# per format on the H100 (benchmarks/qmatmul_bench.py times R=1/2/4; dispatch.GGUF_GPU_TABLE picks); R=2 is
# the default for formats never measured (it was never the slowest of the three there).
MATVEC_WARPS = 4
MATVEC_ROWS_PER_WARP = 2
DEQUANT_THREADS = 256
TILED_THREADS = 128
MAX_DECODE_ROWS = 16  # activation rows the matvec handles (template M); more goes to prefill


def _make(backend: str, spec: ks.KernelSpec):
    if backend == "metal":
        return mx.fast.metal_kernel(name=spec.name, input_names=list(spec.input_names),
                                    output_names=list(spec.output_names), source=spec.source,
                                    header=spec.header, ensure_row_contiguous=True)
    if backend == "cuda":
        return mx.fast.cuda_kernel(name=spec.name, input_names=list(spec.input_names),
                                   output_names=list(spec.output_names), source=spec.source,
                                   header=spec.header, ensure_row_contiguous=True)
    raise ValueError(f"unknown kernel backend {backend!r}")


@lru_cache(maxsize=None)
def gguf_kernel(backend: str, kind: str, ggml_type: str):
    """The cached MLX kernel object for a GGUF format."""
    return _make(backend, ks.gguf_kernel(backend, kind, ggml_type))


@lru_cache(maxsize=None)
def affine_kernel(backend: str):
    """The cached MLX kernel object for the affine decode matvec."""
    return _make(backend, ks.affine_kernel(backend))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def gguf_matvec(backend: str, x2: mx.array, packed: mx.array, ggml_type: str, n_cols: int,
                rows_per_warp: int = MATVEC_ROWS_PER_WARP, warps: int = MATVEC_WARPS) -> mx.array:
    """x2 (M <= 16, K) @ W.T with the GGUF decode kernel -> (M, N) in x2's dtype."""
    m, n = x2.shape[0], packed.shape[0]
    per_group = warps * rows_per_warp
    kernel = gguf_kernel(backend, "matvec", ggml_type)
    return kernel(
        inputs=[packed, x2],
        template=[("T", x2.dtype), ("M", m), ("N", n), ("K", n_cols), ("ROW_BYTES", packed.shape[1]),
                  ("R", rows_per_warp), ("WARPS", warps)],
        grid=(_ceil(n, per_group) * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
        output_shapes=[(m, n)], output_dtypes=[x2.dtype],
    )[0]


def gguf_dequant(backend: str, packed: mx.array, ggml_type: str, n_cols: int,
                 dtype: mx.Dtype = mx.float16) -> mx.array:
    """Packed rows -> (N, K) `dtype` on the GPU (the scratch for dequantize-then-matmul)."""
    n = packed.shape[0]
    total = n * (n_cols // 32)
    kernel = gguf_kernel(backend, "dequant", ggml_type)
    return kernel(
        inputs=[packed],
        template=[("T", dtype), ("N", n), ("K", n_cols), ("ROW_BYTES", packed.shape[1]),
                  ("THREADS", DEQUANT_THREADS)],
        grid=(_ceil(total, DEQUANT_THREADS) * DEQUANT_THREADS, 1, 1), threadgroup=(DEQUANT_THREADS, 1, 1),
        output_shapes=[(n, n_cols)], output_dtypes=[dtype],
    )[0]


def gguf_tiled(backend: str, x2: mx.array, packed: mx.array, ggml_type: str, n_cols: int) -> mx.array:
    """x2 (M, K) @ W.T with the tiled dequantize-on-the-fly kernel -> (M, N)."""
    m, n = x2.shape[0], packed.shape[0]
    kernel = gguf_kernel(backend, "tiled", ggml_type)
    return kernel(
        inputs=[packed, x2],
        template=[("T", x2.dtype), ("M", m), ("N", n), ("K", n_cols), ("ROW_BYTES", packed.shape[1])],
        grid=(_ceil(n, 32) * TILED_THREADS, _ceil(m, 32), 1), threadgroup=(TILED_THREADS, 1, 1),
        output_shapes=[(m, n)], output_dtypes=[x2.dtype],
    )[0]


def affine_matvec(backend: str, x2: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
                  bits: int, group_size: int, rows_per_warp: int = MATVEC_ROWS_PER_WARP,
                  warps: int = MATVEC_WARPS) -> mx.array:
    """x2 (M <= 16, K) @ dequantize(w, scales, biases).T for MLX affine bits 4/8 -> (M, N)."""
    m, n, k = x2.shape[0], w.shape[0], x2.shape[1]
    per_group = warps * rows_per_warp
    return affine_kernel(backend)(
        inputs=[w, scales, biases, x2],
        template=[("T", x2.dtype), ("S", scales.dtype), ("M", m), ("N", n), ("K", k), ("BITS", bits),
                  ("GS", group_size), ("R", rows_per_warp), ("WARPS", warps)],
        grid=(_ceil(n, per_group) * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
        output_shapes=[(m, n)], output_dtypes=[x2.dtype],
    )[0]


# ----------------------------------------------------------------------------------------------------
# What MLX generates around a body (for compile checks and tests; mirrors MLX 0.32.4's C++).

CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint8": "uint8_t",
              "uint32": "uint32_t", "int32": "int32_t"}
METAL_TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "uint8": "uint8_t",
               "uint32": "uint32_t", "int32": "int32_t"}
CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
_METAL_ATTRIBUTE_TYPES = {
    "dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint", "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3", "threads_per_simdgroup": "uint", "threads_per_threadgroup": "uint3",
}


def _dtype_name(d) -> str:
    return str(d).split(".")[-1]


def _template_hash(template: list[tuple[str, object]]) -> str:
    out = ""
    for _, v in template:
        if isinstance(v, bool):
            out += "_t" if v else "_f"
        elif isinstance(v, int):
            out += f"_{v}"
        else:
            out += "_" + METAL_TYPES[_dtype_name(v)]  # MLX's get_type_string
    return out


def render_cuda(spec: ks.KernelSpec, input_dtypes: list, output_dtypes: list,
                template: list[tuple[str, object]]) -> tuple[str, str]:
    """(kernel name, full source) exactly as mx.fast.cuda_kernel builds them (all inputs have ndim > 0)."""
    name = "custom_kernel_" + spec.name + _template_hash(template)
    src = CUDA_DEFAULT_HEADER + spec.header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void {name}(\n"
    for n, d in zip(spec.input_names, input_dtypes):
        src += f"    const {CUDA_TYPES[_dtype_name(d)]}* {n},\n"
    for i, (n, d) in enumerate(zip(spec.output_names, output_dtypes)):
        src += f"    {CUDA_TYPES[_dtype_name(d)]}* {n}" + (",\n" if i < len(spec.output_names) - 1 else ") {\n")
    if template:
        for n, v in template:
            if isinstance(v, bool):
                src += f"  constexpr bool {n} = {'true' if v else 'false'};\n"
            elif isinstance(v, int):
                src += f"  constexpr int {n} = {v};\n"
            else:
                src += f"  using {n} = {CUDA_TYPES[_dtype_name(v)]};\n"
        src += "\n"
    src += spec.source + "\n}\n\n} // namespace mlx::core::cu\n"
    return name, src


def metal_attributes(source: str) -> list[str]:
    """The `[[attribute]]` parameters MLX adds for a Metal body (found by scanning its text)."""
    return [a for a in _METAL_ATTRIBUTE_TYPES if a in source]


def render_metal(spec: ks.KernelSpec, input_dtypes: list, output_dtypes: list,
                 template: list[tuple[str, object]]) -> str:
    """The kernel text (before MLX's own Metal utilities are prepended) as mx.fast.metal_kernel writes it.

    Assumes every input has >= 8 elements (so MLX binds it as `device`, not `constant`).
    """
    src = spec.header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in template]
        src += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    src += f"[[kernel]] void custom_kernel_{spec.name}(\n"
    index = 0
    for n, d in zip(spec.input_names, input_dtypes):
        src += f"  const device {METAL_TYPES[_dtype_name(d)]}* {n} [[buffer({index})]],\n"
        index += 1
    attrs = metal_attributes(spec.source)
    for i, (n, d) in enumerate(zip(spec.output_names, output_dtypes)):
        last = i == len(spec.output_names) - 1 and not attrs
        src += f"  device {METAL_TYPES[_dtype_name(d)]}* {n} [[buffer({index})]]" + (") {\n" if last else ",\n")
        index += 1
    for i, a in enumerate(attrs):
        src += f"  {_METAL_ATTRIBUTE_TYPES[a]} {a} [[{a}]]" + (",\n" if i < len(attrs) - 1 else ") {\n")
    return src + spec.source + "\n}\n"
