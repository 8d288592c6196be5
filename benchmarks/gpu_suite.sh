#!/usr/bin/env bash
# Every check and benchmark that needs the lent GPU, for one device call each (see ../shared/gpu/README.md:
# the first call carries .gpu/a, the second .gpu/b plus this repository; MLX's CUDA wheel is installed by
# .gpu/b/install.sh). applelm itself travels as a wheel built here, so nothing is built on the GPU machine:
#     python -m build --wheel --no-isolation --outdir .gpu/b .        # here, before the second call
#     bash .gpu/b/install.sh && bash benchmarks/gpu_suite.sh ops       # on the GPU machine: $OUT gets the JSON
# Steps: ops (kernel check + qmatmul bench), decode (decode_bench, every row), flash (flash_bench --device gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/applelm-gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --force-reinstall .gpu/b/applelm-*.whl
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(ops decode)
for step in "${steps[@]}"; do
  case "$step" in
    ops)
      python3 benchmarks/gpu_check_ops.py --out "$out/gpu_check_ops.json"
      python3 benchmarks/qmatmul_bench.py --device-name h100 --hbm-tbps 3.35 --out-dir "$out" ;;
    decode)
      python3 benchmarks/decode_bench.py --rows all --bandwidth-gbs 3350 --device-name h100 \
        --work-dir /root/decode-bench --out "$out/decode_h100.json" ;;
    flash)
      python3 benchmarks/flash_bench.py --device gpu --out "$out/flash_gpu.json" ;;
    *) echo "unknown step $step (ops, decode, flash)" >&2; exit 2 ;;
  esac
done
