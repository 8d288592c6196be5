"""Run the kernels' per-format block decoders (the shared source text) as host C++ against the reference.

No GPU is here, but the piece decoders are plain C++ once the portability macros are empty, so g++ can
execute exactly the text the Metal and CUDA kernels use. Skipped if no C++ compiler is installed.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from gguf_blocks import random_blocks

from applelm.ops import dequantize
from applelm.ops import kernel_source as ks

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

HOST_PRELUDE = """
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <vector>
#define GLOBAL
#define THREAD
#define INLINE static inline
struct uint4 { uint32_t x, y, z, w; };
INLINE float half_bits_to_float(uint32_t h) {
  const uint32_t e = (h >> 10) & 31u, m = h & 1023u;
  const float v = e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(m | 1024u), int(e) - 25);
  return (h >> 15) & 1u ? -v : v;
}
"""

GGUF_MAIN = """
int main() {
  uint32_t rows, row_bytes, k;
  if (fread(&rows, 4, 1, stdin) != 1 || fread(&row_bytes, 4, 1, stdin) != 1 || fread(&k, 4, 1, stdin) != 1) return 1;
  std::vector<uint8_t> data(size_t(rows) * row_bytes);
  if (fread(data.data(), 1, data.size(), stdin) != data.size()) return 1;
  for (uint32_t n = 0; n < rows; ++n)
    for (uint32_t p = 0; p < k / 32u; ++p) {
      float w[32];
      dequant_piece(data.data() + size_t(n) * row_bytes, p, w);
      fwrite(w, 4, 32, stdout);
    }
  return 0;
}
"""

AFFINE_MAIN = """
int main() {
  uint32_t rows, k;
  if (fread(&rows, 4, 1, stdin) != 1 || fread(&k, 4, 1, stdin) != 1) return 1;
  std::vector<uint32_t> wq(size_t(rows) * k * BITS / 32);
  std::vector<float> s(size_t(rows) * k / GS), b(size_t(rows) * k / GS);
  if (fread(wq.data(), 4, wq.size(), stdin) != wq.size() || fread(s.data(), 4, s.size(), stdin) != s.size() ||
      fread(b.data(), 4, b.size(), stdin) != b.size()) return 1;
  for (uint32_t n = 0; n < rows; ++n)
    for (uint32_t p = 0; p < k / 32u; ++p) {
      float w[32];
      affine_piece<float, BITS, GS>(wq.data() + size_t(n) * k * BITS / 32, s.data() + size_t(n) * k / GS,
                                    b.data() + size_t(n) * k / GS, p, w);
      fwrite(w, 4, 32, stdout);
    }
  return 0;
}
"""


def build(tmp_path, name, source):
    src, exe = tmp_path / f"{name}.cpp", tmp_path / name
    src.write_text(source)
    subprocess.run([CXX, "-std=c++17", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("ggml_type", ks.GGUF_FORMATS)
def test_piece_decoder_matches_reference(tmp_path, ggml_type):
    exe = build(tmp_path, ggml_type, HOST_PRELUDE + ks.COMMON_HELPERS + ks.PIECES[ggml_type] + GGUF_MAIN)
    k = 512 if ggml_type.endswith("_K") else 96
    packed = random_blocks(ggml_type, 5, k, seed=11)
    header = np.array([5, packed.shape[1], k], dtype=np.uint32).tobytes()
    out = subprocess.run([str(exe)], input=header + packed.tobytes(), capture_output=True, check=True).stdout
    got = np.frombuffer(out, dtype=np.float32).reshape(5, k)
    want = np.array(dequantize(mx.array(packed), ggml_type, k))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_piece_matches_mlx(tmp_path, bits, group_size):
    main = AFFINE_MAIN.replace("BITS", str(bits)).replace("GS", str(group_size))
    exe = build(tmp_path, f"affine{bits}_{group_size}", HOST_PRELUDE + ks.COMMON_HELPERS + ks.AFFINE_PIECE + main)
    w = mx.random.normal((3, 256), key=mx.random.key(bits * group_size))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    payload = (np.array([3, 256], dtype=np.uint32).tobytes() + np.array(wq).tobytes()
               + np.array(s, dtype=np.float32).tobytes() + np.array(b, dtype=np.float32).tobytes())
    out = subprocess.run([str(exe)], input=payload, capture_output=True, check=True).stdout
    got = np.frombuffer(out, dtype=np.float32).reshape(3, 256)
    want = np.array(mx.dequantize(wq, s, b, group_size=group_size, bits=bits))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
