#!/usr/bin/env bash
# Every check and benchmark that needs the lent GPU, for one device call each (see ../shared/gpu/README.md:
# the first call carries .gpu/a, the second .gpu/b plus this repository; MLX's CUDA wheel is installed by
# .gpu/b/install.sh). applelm itself travels as a wheel built here, so nothing is built on the GPU machine:
#     python -m build --wheel --no-isolation --outdir .gpu/b .        # here, before the second call
#     bash .gpu/b/install.sh && bash benchmarks/gpu_suite.sh ops       # on the GPU machine: $OUT gets the JSON
# Steps: ops (kernel check + qmatmul bench), decode (decode_bench), flash (flash_bench --device gpu),
# flashcheck (flash_gpu_check: paged equals resident, GGUF-blocks store included).
# Measured on the H100 (2026-11-22): flash ~6 min, decode ~4 min, qmatmul ~6 min for all formats, and the
# kernel check ~3-4 min per GGUF format (NVRTC compiles every template): one step per device call, and
# CHECK_FORMATS to split the check. The embedded SmolLM2 GGUF (98 MB) cannot travel (64 MiB a call), so
# the GPU runs use the synthetic checkpoints only.
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
      python3 benchmarks/gpu_check_ops.py ${CHECK_FORMATS:+--formats "$CHECK_FORMATS"} --out "$out/gpu_check_ops.json"
      python3 benchmarks/qmatmul_bench.py --device-name h100 --hbm-tbps 3.35 --out-dir "$out" ;;
    decode)
      python3 benchmarks/decode_bench.py --rows 1b-q4,8b-q4,1b-bf16,0.5b-q4,0.5b-bf16,8b-bf16 --bandwidth-gbs 3350 --device-name h100 \
        --work-dir /root/decode-bench --out "$out/decode_h100.json" ;;
    flash)
      python3 benchmarks/flash_bench.py --device gpu --models synthetic --work /root/flash --out "$out/flash_gpu.json" ;;
    flashcheck)
      python3 benchmarks/flash_gpu_check.py --out "$out/flash_gpu_check.json" ;;
    *) echo "unknown step $step (ops, decode, flash, flashcheck)" >&2; exit 2 ;;
  esac
done
