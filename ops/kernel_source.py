"""One kernel source for Metal and CUDA: a thin portability layer plus kernel bodies written once.

A kernel is (header, body). The header holds helpers (`INLINE` functions); the body is what MLX's
`mx.fast.metal_kernel` / `mx.fast.cuda_kernel` wrap into a kernel function whose parameters are the
named inputs and outputs (MLX writes the signature; template arguments become template parameters on
Metal and `constexpr` locals on CUDA, so the body reads them the same way). Only two short preludes
differ per backend:
  * the header prelude maps GLOBAL/SHARED/THREAD/INLINE, the barrier, the SIMD-group (warp) sum and the
    fp16-bits-to-float conversion onto each language;
  * the index prelude, placed at the top of the body, names the thread indices. MLX adds Metal's
    `[[attribute]]` parameters by scanning the *body* text for their names, so they are spelled out.
Everything else (per-format block decoding and the matvec / dequantize / tiled-matmul bodies) is
identical text for both backends, which tests/test_ops_kernel_source.py checks.

Kernel inputs/outputs are named so that MLX's scan for `<name>_shape` / `_strides` / `_ndim` finds
nothing: every size is a template argument, so no shape buffers are bound.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("metal", "cuda")
SIMD_WIDTH = 32  # Apple SIMD-group and NVIDIA warp width

METAL_HEADER_PRELUDE = """\
// --- portability layer: Metal ---
#define GLOBAL device
#define SHARED threadgroup
#define THREAD thread
#define INLINE inline
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
INLINE float simd_reduce_sum(float v) { return simd_sum(v); }
INLINE float half_bits_to_float(uint32_t bits) { return float(as_type<half>(uint16_t(bits))); }
"""

CUDA_HEADER_PRELUDE = """\
// --- portability layer: CUDA ---
#define GLOBAL
#define SHARED __shared__
#define THREAD
#define INLINE __device__ __forceinline__
#define BARRIER() __syncthreads()
INLINE float simd_reduce_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
INLINE float half_bits_to_float(uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }
"""

# The body's view of the launch: lane/warp within the threadgroup (block), threadgroup index in the grid.
METAL_INDEX_PRELUDE = """\
  const uint32_t tid = thread_position_in_threadgroup.x;
  const uint32_t lane = thread_index_in_simdgroup;
  const uint32_t warp = simdgroup_index_in_threadgroup;
  const uint32_t group_x = threadgroup_position_in_grid.x;
  const uint32_t group_y = threadgroup_position_in_grid.y;
"""

CUDA_INDEX_PRELUDE = """\
  const uint32_t tid = threadIdx.x;
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t warp = threadIdx.x >> 5;
  const uint32_t group_x = blockIdx.x;
  const uint32_t group_y = blockIdx.y;
"""

# Metal attributes the body uses; MLX must detect exactly these (tested).
METAL_ATTRIBUTES = (
    "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
    "thread_position_in_threadgroup", "threadgroup_position_in_grid",
)

# ---------------------------------------------------------------------------------------------------
# Shared helpers: loads at the alignment each format guarantees, sign extension.
COMMON_HELPERS = """\
// --- shared helpers (identical on every backend) ---
INLINE uint32_t ld16(const GLOBAL uint8_t* p) { return uint32_t(*((const GLOBAL uint16_t*)p)); }
INLINE uint32_t ld32(const GLOBAL uint8_t* p) { return *((const GLOBAL uint32_t*)p); }
// 32-bit word from a 2-byte-aligned address (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K blocks are only 2-aligned).
INLINE uint32_t ld32a2(const GLOBAL uint8_t* p) { return ld16(p) | (ld16(p + 2) << 16); }
INLINE uint4 ld128(const GLOBAL uint8_t* p) { return *((const GLOBAL uint4*)p); }
INLINE float s8(uint32_t byte) { return float(int32_t(byte << 24) >> 24); }
INLINE uint32_t byte_at(uint4 v, uint32_t i) {
  uint32_t w = i < 4u ? v.x : (i < 8u ? v.y : (i < 12u ? v.z : v.w));
  return (w >> (8u * (i & 3u))) & 0xFFu;
}
"""

# ---------------------------------------------------------------------------------------------------
# Per-format decoding of one 32-element "piece" of a row into w[0..31] (element order).
# Piece p covers row elements 32p .. 32p+31: a whole block for the 32-element formats, sub-block
# p % 8 of block p / 8 for the K-quants. Scales are read once per piece, codes with the widest load
# the format's alignment allows. Block layouts are those of ggml-common.h (see ops/reference.py).
PIECES: dict[str, str] = {}

PIECES["Q4_0"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  const GLOBAL uint8_t* b = row + p * 18u;                 // d:f16 | qs[16]
  const float d = half_bits_to_float(ld16(b));
  for (uint32_t i = 0; i < 4u; ++i) {
    const uint32_t q = ld32a2(b + 2u + 4u * i);
    for (uint32_t k = 0; k < 4u; ++k) {
      w[4u * i + k] = (float((q >> (8u * k)) & 15u) - 8.0f) * d;
      w[4u * i + k + 16u] = (float((q >> (8u * k + 4u)) & 15u) - 8.0f) * d;
    }
  }
}
"""

PIECES["Q4_1"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  const GLOBAL uint8_t* b = row + p * 20u;                 // d:f16 m:f16 | qs[16]; 4-byte aligned
  const float d = half_bits_to_float(ld16(b));
  const float m = half_bits_to_float(ld16(b + 2u));
  for (uint32_t i = 0; i < 4u; ++i) {
    const uint32_t q = ld32(b + 4u + 4u * i);
    for (uint32_t k = 0; k < 4u; ++k) {
      w[4u * i + k] = d * float((q >> (8u * k)) & 15u) + m;
      w[4u * i + k + 16u] = d * float((q >> (8u * k + 4u)) & 15u) + m;
    }
  }
}
"""

PIECES["Q5_0"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  const GLOBAL uint8_t* b = row + p * 22u;                 // d:f16 | qh:u32 | qs[16]
  const float d = half_bits_to_float(ld16(b));
  const uint32_t qh = ld32a2(b + 2u);
  for (uint32_t i = 0; i < 4u; ++i) {
    const uint32_t q = ld32a2(b + 6u + 4u * i);
    for (uint32_t k = 0; k < 4u; ++k) {
      const uint32_t j = 4u * i + k;
      const uint32_t lo = ((q >> (8u * k)) & 15u) | (((qh >> j) & 1u) << 4);
      const uint32_t hi = ((q >> (8u * k + 4u)) & 15u) | (((qh >> (j + 16u)) & 1u) << 4);
      w[j] = (float(lo) - 16.0f) * d;
      w[j + 16u] = (float(hi) - 16.0f) * d;
    }
  }
}
"""

PIECES["Q5_1"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  const GLOBAL uint8_t* b = row + p * 24u;                 // d:f16 m:f16 | qh:u32 | qs[16]; 8-aligned
  const float d = half_bits_to_float(ld16(b));
  const float m = half_bits_to_float(ld16(b + 2u));
  const uint32_t qh = ld32(b + 4u);
  for (uint32_t i = 0; i < 4u; ++i) {
    const uint32_t q = ld32(b + 8u + 4u * i);
    for (uint32_t k = 0; k < 4u; ++k) {
      const uint32_t j = 4u * i + k;
      const uint32_t lo = ((q >> (8u * k)) & 15u) | (((qh >> j) & 1u) << 4);
      const uint32_t hi = ((q >> (8u * k + 4u)) & 15u) | (((qh >> (j + 16u)) & 1u) << 4);
      w[j] = d * float(lo) + m;
      w[j + 16u] = d * float(hi) + m;
    }
  }
}
"""

PIECES["Q8_0"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  const GLOBAL uint8_t* b = row + p * 34u;                 // d:f16 | qs[32] int8
  const float d = half_bits_to_float(ld16(b));
  for (uint32_t i = 0; i < 8u; ++i) {
    const uint32_t q = ld32a2(b + 2u + 4u * i);
    for (uint32_t k = 0; k < 4u; ++k) w[4u * i + k] = s8(q >> (8u * k)) * d;
  }
}
"""

PIECES["Q2_K"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  // scales[16] | qs[64] | d:f16 | dmin:f16; 4-byte aligned. Sub-block s = 4n + j: bits 2j of qs[32n + l].
  const GLOBAL uint8_t* b = row + (p >> 3) * 84u;
  const uint32_t s = p & 7u, n = s >> 2, shift = 2u * (s & 3u);
  const float d = half_bits_to_float(ld16(b + 80u));
  const float dmin = half_bits_to_float(ld16(b + 82u));
  for (uint32_t h = 0; h < 2u; ++h) {                      // two 16-element scale groups
    const uint32_t sc = uint32_t(b[2u * s + h]);
    const float dl = d * float(sc & 15u), ml = dmin * float(sc >> 4);
    for (uint32_t i = 0; i < 4u; ++i) {
      const uint32_t q = ld32(b + 16u + 32u * n + 16u * h + 4u * i);
      for (uint32_t k = 0; k < 4u; ++k) w[16u * h + 4u * i + k] = dl * float((q >> (8u * k + shift)) & 3u) - ml;
    }
  }
}
"""

PIECES["Q3_K"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  // hmask[32] | qs[64] | scales[12] | d:f16; 2-byte aligned. Sub-block s = 4n + j: low bits 2j of
  // qs[32n + l]; minus 4 unless bit s of hmask[l] is set. 6-bit scales biased by 32, one per 16.
  const GLOBAL uint8_t* b = row + (p >> 3) * 110u;
  const uint32_t s = p & 7u, n = s >> 2, shift = 2u * (s & 3u);
  const float d = half_bits_to_float(ld16(b + 108u));
  for (uint32_t h = 0; h < 2u; ++h) {
    const uint32_t i16 = 2u * s + h;
    const uint32_t low = i16 < 8u ? (uint32_t(b[96u + i16]) & 15u) : (uint32_t(b[96u + i16 - 8u]) >> 4);
    const uint32_t high = (uint32_t(b[104u + (i16 & 3u)]) >> (2u * (i16 >> 2))) & 3u;
    const float dl = d * (float(low | (high << 4)) - 32.0f);
    for (uint32_t i = 0; i < 4u; ++i) {
      const uint32_t l0 = 16u * h + 4u * i;
      const uint32_t q = ld32a2(b + 32u + 32u * n + l0);
      const uint32_t m = ld32a2(b + l0);
      for (uint32_t k = 0; k < 4u; ++k) {
        const float ql = float((q >> (8u * k + shift)) & 3u);
        const float sub = ((m >> (8u * k + s)) & 1u) ? 0.0f : 4.0f;
        w[l0 + k] = dl * (ql - sub);
      }
    }
  }
}
"""

_K4_SCALE = """\
INLINE void k4_scale_min(const GLOBAL uint8_t* sb, uint32_t s, THREAD float& sc, THREAD float& mn) {
  // Eight 6-bit scales and mins packed in 12 bytes (Q4_K, Q5_K).
  if (s < 4u) {
    sc = float(uint32_t(sb[s]) & 63u);
    mn = float(uint32_t(sb[s + 4u]) & 63u);
  } else {
    sc = float((uint32_t(sb[s + 4u]) & 15u) | ((uint32_t(sb[s - 4u]) >> 6) << 4));
    mn = float((uint32_t(sb[s + 4u]) >> 4) | ((uint32_t(sb[s]) >> 6) << 4));
  }
}
"""

PIECES["Q4_K"] = _K4_SCALE + """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  // d:f16 dmin:f16 | scales[12] | qs[128]; 16-byte aligned. Sub-block s: nibble s&1 of chunk s/2.
  const GLOBAL uint8_t* b = row + (p >> 3) * 144u;
  const uint32_t s = p & 7u, shift = 4u * (s & 1u);
  float sc, mn;
  k4_scale_min(b + 4u, s, sc, mn);
  const float d = half_bits_to_float(ld16(b)) * sc;
  const float m = half_bits_to_float(ld16(b + 2u)) * mn;
  const uint4 q0 = ld128(b + 16u + 32u * (s >> 1));
  const uint4 q1 = ld128(b + 32u + 32u * (s >> 1));
  for (uint32_t l = 0; l < 16u; ++l) {
    w[l] = d * float((byte_at(q0, l) >> shift) & 15u) - m;
    w[l + 16u] = d * float((byte_at(q1, l) >> shift) & 15u) - m;
  }
}
"""

PIECES["Q5_K"] = _K4_SCALE + """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  // d:f16 dmin:f16 | scales[12] | qh[32] | qs[128]; 16-byte aligned. Bit 4 of sub-block s: bit s of qh[l].
  const GLOBAL uint8_t* b = row + (p >> 3) * 176u;
  const uint32_t s = p & 7u, shift = 4u * (s & 1u);
  float sc, mn;
  k4_scale_min(b + 4u, s, sc, mn);
  const float d = half_bits_to_float(ld16(b)) * sc;
  const float m = half_bits_to_float(ld16(b + 2u)) * mn;
  const uint4 h0 = ld128(b + 16u), h1 = ld128(b + 32u);
  const uint4 q0 = ld128(b + 48u + 32u * (s >> 1));
  const uint4 q1 = ld128(b + 64u + 32u * (s >> 1));
  for (uint32_t l = 0; l < 16u; ++l) {
    const uint32_t a = ((byte_at(q0, l) >> shift) & 15u) | (((byte_at(h0, l) >> s) & 1u) << 4);
    const uint32_t c = ((byte_at(q1, l) >> shift) & 15u) | (((byte_at(h1, l) >> s) & 1u) << 4);
    w[l] = d * float(a) - m;
    w[l + 16u] = d * float(c) - m;
  }
}
"""

PIECES["Q6_K"] = """\
INLINE void dequant_piece(const GLOBAL uint8_t* row, uint32_t p, THREAD float* w) {
  // ql[128] | qh[64] | scales[16] int8 | d:f16; 2-byte aligned. Sub-block s = 4n + k: nibble k/2 of
  // ql[64n + 32(k&1) + l], bits 2k of qh[32n + l], minus 32; one int8 scale per 16 elements.
  const GLOBAL uint8_t* b = row + (p >> 3) * 210u;
  const uint32_t s = p & 7u, n = s >> 2, k = s & 3u;
  const uint32_t lshift = 4u * (k >> 1), hshift = 2u * k;
  const float d = half_bits_to_float(ld16(b + 208u));
  for (uint32_t h = 0; h < 2u; ++h) {
    const float dl = d * s8(uint32_t(b[192u + 2u * s + h]));
    for (uint32_t i = 0; i < 4u; ++i) {
      const uint32_t l0 = 16u * h + 4u * i;
      const uint32_t ql = ld32a2(b + 64u * n + 32u * (k & 1u) + l0);
      const uint32_t qh = ld32a2(b + 128u + 32u * n + l0);
      for (uint32_t j = 0; j < 4u; ++j) {
        const uint32_t q = ((ql >> (8u * j + lshift)) & 15u) | (((qh >> (8u * j + hshift)) & 3u) << 4);
        w[l0 + j] = dl * (float(q) - 32.0f);
      }
    }
  }
}
"""

GGUF_FORMATS = tuple(PIECES)

# MLX affine format (mx.quantize): uint32 words, element i at bits BITS*(i % (32/BITS)) of word i/(32/BITS);
# w = scale * q + bias per group of GS elements. A 32-element piece is 4 (4-bit) or 8 (8-bit) words,
# 16-byte aligned because rows hold K*BITS/32 words with K a multiple of 32.
AFFINE_PIECE = """\
template <typename S, int BITS, int GS>
INLINE void affine_piece(const GLOBAL uint32_t* wrow, const GLOBAL S* srow, const GLOBAL S* brow,
                         uint32_t p, THREAD float* w) {
  const float scale = float(srow[(p * 32u) / uint32_t(GS)]);
  const float bias = float(brow[(p * 32u) / uint32_t(GS)]);
  const GLOBAL uint8_t* base = (const GLOBAL uint8_t*)(wrow + p * uint32_t(BITS));
  for (uint32_t v = 0; v < uint32_t(BITS) / 4u; ++v) {
    const uint4 q = ld128(base + 16u * v);
    for (uint32_t i = 0; i < 16u; ++i) {
      const uint32_t byte = byte_at(q, i);
      if (BITS == 4) {
        w[32u * v + 2u * i] = scale * float(byte & 15u) + bias;
        w[32u * v + 2u * i + 1u] = scale * float(byte >> 4) + bias;
      } else {
        w[16u * v + i] = scale * float(byte) + bias;
      }
    }
  }
}
"""

# ---------------------------------------------------------------------------------------------------
# Kernel bodies. Template arguments (compile-time): T activation/output dtype, M activation rows,
# N output rows, K columns, ROW_BYTES packed bytes per row, R rows per warp, WARPS warps per threadgroup.

# Decode: out[m, n] = sum_k x[m, k] * W[n, k] for M <= 16. Each warp owns R consecutive rows; lanes
# stride over 32-element pieces so the warp reads one contiguous span of blocks per step, every weight
# piece is decoded once and reused for all M activation rows, and the sums meet in one SIMD reduction.
MATVEC_BODY = """\
  constexpr uint32_t PIECES_PER_ROW = uint32_t(K) / 32u;
  const uint32_t row0 = (group_x * uint32_t(WARPS) + warp) * uint32_t(R);
  float acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  for (uint32_t p = lane; p < PIECES_PER_ROW; p += 32u) {
    float w[R][32];
    for (int r = 0; r < R; ++r) {             // all R pieces' loads are issued before any math
      const uint32_t n = min(row0 + uint32_t(r), uint32_t(N) - 1u);
      LOAD_PIECE(n, p, w[r]);
    }
    for (int m = 0; m < M; ++m) {
      const GLOBAL T* xp = xin + uint32_t(m) * uint32_t(K) + p * 32u;
      float xv[32];
      for (uint32_t i = 0; i < 32u; ++i) xv[i] = float(xp[i]);
      for (int r = 0; r < R; ++r) {
        float s = 0.0f;
        for (uint32_t i = 0; i < 32u; ++i) s += w[r][i] * xv[i];
        acc[r][m] += s;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint32_t n = row0 + uint32_t(r);
    for (int m = 0; m < M; ++m) {
      const float v = simd_reduce_sum(acc[r][m]);
      if (lane == 0u && n < uint32_t(N)) out[uint32_t(m) * uint32_t(N) + n] = T(v);
    }
  }
"""

# Dequantize into a T scratch (N, K) for prefill through mx.matmul: one thread per 32-element piece.
DEQUANT_BODY = """\
  constexpr uint32_t PIECES_PER_ROW = uint32_t(K) / 32u;
  const uint32_t g = group_x * uint32_t(THREADS) + tid;
  if (g < uint32_t(N) * PIECES_PER_ROW) {
    const uint32_t n = g / PIECES_PER_ROW, p = g % PIECES_PER_ROW;
    float w[32];
    LOAD_PIECE(n, p, w);
    GLOBAL T* o = out + n * uint32_t(K) + p * 32u;
    for (uint32_t i = 0; i < 32u; ++i) o[i] = T(w[i]);
  }
"""

# Prefill: a 32x32 output tile per threadgroup of 128 threads, K consumed one piece (32 columns) at a
# time: 32 threads decode the 32 weight rows' pieces into shared memory while all 128 stage x.
TILED_BODY = """\
  constexpr uint32_t PIECES_PER_ROW = uint32_t(K) / 32u;
  SHARED float ws[32][33];
  SHARED float xs[32][33];
  const uint32_t n0 = group_x * 32u, m0 = group_y * 32u;
  const uint32_t col = tid & 31u, rbase = (tid >> 5) * 8u;
  float acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  for (uint32_t p = 0; p < PIECES_PER_ROW; ++p) {
    if (tid < 32u) {
      float w[32];
      const uint32_t n = n0 + tid;
      if (n < uint32_t(N)) {
        LOAD_PIECE(n, p, w);
      } else {
        for (uint32_t i = 0; i < 32u; ++i) w[i] = 0.0f;
      }
      for (uint32_t i = 0; i < 32u; ++i) ws[tid][i] = w[i];
    }
    for (uint32_t i = 0; i < 8u; ++i) {
      const uint32_t m = m0 + rbase + i;
      xs[rbase + i][col] = m < uint32_t(M) ? float(xin[m * uint32_t(K) + p * 32u + col]) : 0.0f;
    }
    BARRIER();
    for (uint32_t i = 0; i < 8u; ++i) {
      float s = 0.0f;
      for (uint32_t k = 0; k < 32u; ++k) s += xs[rbase + i][k] * ws[col][k];
      acc[i] += s;
    }
    BARRIER();
  }
  for (uint32_t i = 0; i < 8u; ++i) {
    const uint32_t m = m0 + rbase + i, n = n0 + col;
    if (m < uint32_t(M) && n < uint32_t(N)) out[m * uint32_t(N) + n] = T(acc[i]);
  }
"""

GGUF_LOAD = "#define LOAD_PIECE(n, p, w) dequant_piece(wq + (n) * uint32_t(ROW_BYTES), (p), (w))\n"
AFFINE_LOAD = (
    "#define LOAD_PIECE(n, p, w) affine_piece<S, BITS, GS>(wq + (n) * (uint32_t(K) * uint32_t(BITS) / 32u), "
    "scales + (n) * (uint32_t(K) / uint32_t(GS)), biases + (n) * (uint32_t(K) / uint32_t(GS)), (p), (w))\n"
)

BODIES = {"matvec": MATVEC_BODY, "dequant": DEQUANT_BODY, "tiled": TILED_BODY}


@dataclass(frozen=True)
class KernelSpec:
    """Everything MLX needs to build one kernel: name, argument names, header and body text."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    source: str


def _preludes(backend: str) -> tuple[str, str]:
    if backend == "metal":
        return METAL_HEADER_PRELUDE, METAL_INDEX_PRELUDE
    if backend == "cuda":
        return CUDA_HEADER_PRELUDE, CUDA_INDEX_PRELUDE
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")


def gguf_kernel(backend: str, kind: str, ggml_type: str) -> KernelSpec:
    """The `kind` ("matvec", "dequant", "tiled") kernel for a GGUF format on `backend`.

    Inputs: wq (uint8 packed rows) and, except for "dequant", xin (T, (M, K)); output: out.
    """
    if ggml_type not in PIECES:
        raise ValueError(f"no kernel for GGML type {ggml_type}")
    header_prelude, index_prelude = _preludes(backend)
    header = header_prelude + COMMON_HELPERS + PIECES[ggml_type] + GGUF_LOAD
    inputs = ("wq",) if kind == "dequant" else ("wq", "xin")
    return KernelSpec(f"applelm_{ggml_type.lower()}_{kind}", inputs, ("out",), header,
                      index_prelude + BODIES[kind])


def affine_kernel(backend: str) -> KernelSpec:
    """Decode matvec for MLX's affine format (template BITS in {4, 8}, GS in {32, 64, 128}, S scale dtype).

    Inputs: wq (uint32), scales, biases (S), xin (T, (M, K)); output: out.
    """
    header_prelude, index_prelude = _preludes(backend)
    header = header_prelude + COMMON_HELPERS + AFFINE_PIECE + AFFINE_LOAD
    return KernelSpec("applelm_affine_matvec", ("wq", "scales", "biases", "xin"), ("out",), header,
                      index_prelude + MATVEC_BODY)
