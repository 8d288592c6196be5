"""The shared kernel source, checked as text (no Metal compiler exists on Linux and no GPU is here).

CUDA compilation itself is checked by benchmarks/compile_check_cuda.py with NVRTC.
"""

import re

import mlx.core as mx
import pytest

from applelm.ops import backends
from applelm.ops import kernel_source as ks

KINDS = ("matvec", "dequant", "tiled")
TEMPLATES = {  # template arguments each launch in ops/backends.py passes
    "matvec": {"T", "M", "N", "K", "ROW_BYTES", "R", "WARPS"},
    "dequant": {"T", "N", "K", "ROW_BYTES", "THREADS"},
    "tiled": {"T", "M", "N", "K", "ROW_BYTES"},
    "affine": {"T", "S", "M", "N", "K", "BITS", "GS", "R", "WARPS"},
}
MACROS = {"GLOBAL", "SHARED", "THREAD", "INLINE", "BARRIER", "LOAD_PIECE", "PIECES_PER_ROW"}


def all_specs():
    for fmt in ks.GGUF_FORMATS:
        for kind in KINDS:
            yield kind, {b: ks.gguf_kernel(b, kind, fmt) for b in ks.BACKENDS}
    yield "affine", {b: ks.affine_kernel(b) for b in ks.BACKENDS}


def strip(spec, backend):
    header_prelude, index_prelude = ks._preludes(backend)
    assert spec.header.startswith(header_prelude) and spec.source.startswith(index_prelude)
    return spec.header[len(header_prelude):], spec.source[len(index_prelude):]


def test_every_supported_format_has_a_kernel():
    from applelm.ops import SUPPORTED

    assert set(ks.GGUF_FORMATS) == set(SUPPORTED)


@pytest.mark.parametrize("kind,specs", list(all_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_metal_and_cuda_share_one_body(kind, specs):
    metal, cuda = specs["metal"], specs["cuda"]
    assert strip(metal, "metal") == strip(cuda, "cuda")  # same helpers and body text after the preludes
    assert metal.input_names == cuda.input_names and metal.name == cuda.name
    # generation is deterministic
    assert ks.affine_kernel("cuda") == ks.affine_kernel("cuda")


@pytest.mark.parametrize("kind,specs", list(all_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_generated_text_structure(kind, specs):
    metal, cuda = specs["metal"], specs["cuda"]
    # MLX adds exactly these Metal [[attributes]], found by scanning the body text
    assert sorted(backends.metal_attributes(metal.source)) == sorted(ks.METAL_ATTRIBUTES)
    assert backends.metal_attributes(cuda.source) == []
    for spec in (metal, cuda):
        text = spec.header + spec.source
        for name in spec.input_names:  # no shape/stride buffers requested
            assert not re.search(rf"\b{name}_(shape|strides|ndim)\b", text)
        # every upper-case identifier in the body is a macro or a template argument the launch passes
        _, body = strip(spec, "metal" if spec is metal else "cuda")
        used = set(re.findall(r"\b[A-Z][A-Z_]*\b", body)) - MACROS
        assert used <= TEMPLATES[kind], used - TEMPLATES[kind]
        assert "{" in text and "{}" not in text and "%(" not in text  # no unformatted placeholders
    assert "simd_sum" in metal.header and "__shfl_xor_sync" not in metal.header
    assert "__shfl_xor_sync" in cuda.header and "simd_sum" not in cuda.header


def test_rendered_sources_match_mlx_wrapping():
    spec = ks.gguf_kernel("cuda", "matvec", "Q4_K")
    tpl = [("T", mx.float16), ("M", 1), ("N", 64), ("K", 256), ("ROW_BYTES", 144), ("R", 2), ("WARPS", 4)]
    name, src = backends.render_cuda(spec, [mx.uint8, mx.float16], [mx.float16], tpl)
    assert name == "custom_kernel_applelm_q4_k_matvec_float16_t_1_64_256_144_2_4"
    assert "__global__ void " + name + "(\n    const uint8_t* wq,\n    const __half* xin,\n    __half* out) {" in src
    assert "  using T = __half;\n  constexpr int M = 1;" in src and src.endswith("} // namespace mlx::core::cu\n")
    mspec = ks.gguf_kernel("metal", "matvec", "Q4_K")
    msrc = backends.render_metal(mspec, [mx.uint8, mx.float16], [mx.float16], tpl)
    assert "template <typename T, int M, int N, int K, int ROW_BYTES, int R, int WARPS>" in msrc
    assert "  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]]" in msrc
    assert backends.render_metal(mspec, [mx.uint8, mx.float16], [mx.float16], tpl) == msrc


def test_cpu_dispatch_never_builds_kernels():
    from applelm.ops import dispatch

    assert dispatch.backend() == "cpu" or mx.default_device().type == mx.DeviceType.gpu
