"""applelm vs mlx-lm on the same weights, in the same run: load time, prompt tok/s, decode tok/s, peak memory.

The weights are SmolLM2-135M-Instruct's Q4_1 GGUF (the embedded default model). Q4_1 blocks are exactly MLX
affine 4-bit groups of 32, so mlx-lm gets the very same quantized tensors, written as an MLX folder:
  - applelm      : the GGUF file itself, blocks kept packed (float32 compute on CPU), products through our
                   compiled CPU kernel (ops/gguf_cpu.c) as MLX graph nodes (ops/host_call.cpp), decode steps
                   compiled (the default)
  - applelm, steps not compiled: the same with generate_step(compile=False)
  - applelm, attention by MLX's products: APPLELM_CPU_ATTENTION=off, decode attention by the grouped products
                   instead of the C kernel (ops/attention_cpu.c), steps compiled
  - applelm eager kernels: APPLELM_GRAPH_KERNELS=off, each kernel evaluating its input first, steps not
                   compiled (the default before graph nodes)
  - applelm MLX paths: the same with APPLELM_NATIVE=off (the kernel unused: MLX's quantized matmul)
  - applelm --dequantize: the GGUF's weights held dense in float32 (more memory, faster on CPU)
  - mlx-lm q4    : the same tensors with float16 scales, as an MLX checkpoint stores them (mlx-lm default)
  - mlx-lm q4/f32: the same tensors with float32 scales (what applelm computes with on CPU)
  - mlx-lm dense : the same weights dequantized to float32
  - llama.cpp    : the GGUF file itself through llama-cpp-python, all CPU threads (optional:
                   --llama-cpp-python names an interpreter that has it, e.g. after
                   `python -m venv /tmp/lcp && CMAKE_ARGS=-DGGML_NATIVE=ON /tmp/lcp/bin/pip install
                   llama-cpp-python==0.3.16 numpy`, a 4-10 minute build here)
Every engine runs in its own fresh process (clean peak-memory figures), from the same prompt token ids,
greedy; the report checks that all of them produce the same tokens. Every process preloads the same fast
BLAS before MLX (applelm/_blas.py), so mlx-lm is measured with it too (out of the box on Linux it gets
the wheel's reference BLAS, much slower for prefill).

    python benchmarks/generate_bench.py [--gen-tokens 128] [--llama-cpp-python PYTHON] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine_info  # benchmarks/machine_info.py

HERE = Path(__file__).resolve().parent
PROMPT_TEXT = (
    "The history of astronomy spans thousands of years. Ancient observers tracked the motions of the Sun, the Moon "
    "and the planets, built calendars from them, and tried to predict eclipses. Greek thinkers proposed that the "
    "Earth was a sphere and estimated its size. Much later, Copernicus placed the Sun at the centre, Kepler found "
    "that orbits are ellipses, and Galileo turned a telescope to the sky and saw the moons of Jupiter. Newton then "
    "explained all of these motions with a single law of gravitation. Summarise this in two sentences."
)


def machine() -> dict:
    import mlx.core as mx

    return {**machine_info.machine(), "mlx": mx.__version__, "device": str(mx.default_device())}


def export_folders(gguf_path: Path, out: Path) -> dict[str, Path]:
    """Write the GGUF's tensors as MLX folders mlx-lm can load (q4 f16 scales, q4 f32 scales, dense f32)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from applelm.gguf_affine import AFFINE_EXACT_TYPES, repack_affine
    from applelm.loader import load_model
    from applelm.ops import GGUFEmbedding, GGUFLinear

    model, config, _ = load_model(gguf_path)
    float_params = {k: v for k, v in tree_flatten(model.parameters()) if v.dtype != mx.uint8}
    packed = {}  # layer path -> (weight, scales, biases, bits): the same values, MLX affine layout
    for path, m in model.named_modules():
        if isinstance(m, (GGUFLinear, GGUFEmbedding)):
            cols = m.in_features if isinstance(m, GGUFLinear) else m.dims
            if m.ggml_type not in AFFINE_EXACT_TYPES:
                raise SystemExit(f"{path} is {m.ggml_type}; this benchmark needs Q4_0/Q4_1/Q8_0 weights")
            packed[path] = (*repack_affine(np.array(m.weight), m.ggml_type, cols), AFFINE_EXACT_TYPES[m.ggml_type])
    folders = {}
    for name, dtype in (("q4_f16", mx.float16), ("q4_f32", mx.float32)):
        weights = {k: v.astype(dtype) for k, v in float_params.items()}
        qcfg = {"group_size": 32, "bits": 4}
        for path, (w, sc, b, bits) in packed.items():
            weights.update({f"{path}.weight": w, f"{path}.scales": sc.astype(dtype), f"{path}.biases": b.astype(dtype)})
            if bits != 4:
                qcfg[path] = {"group_size": 32, "bits": bits}
        folder = out / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**config, "quantization": qcfg}))
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
        folders[name] = folder
    dense, _, _ = load_model(gguf_path, dequantize=True)
    folder = out / "dense_f32"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(dense.parameters())))
    folders["dense_f32"] = folder
    return folders


def run_engine(engine: str, path: str, prompt_ids: list[int], gen_tokens: int) -> dict:
    """Runs inside a fresh worker process."""
    import applelm  # noqa: F401  (before mlx, for every engine: the same fast BLAS preloaded; see applelm/_blas.py)
    import mlx.core as mx

    start = time.perf_counter()
    if engine.startswith("applelm"):
        from applelm.generation import generate_step
        from applelm.loader import load_model

        model, _, _ = load_model(Path(path), dequantize=engine == "applelm-dense")
        if engine == "applelm-plain":
            generate_step = functools.partial(generate_step, compile=False)
    else:
        import importlib

        from mlx_lm.utils import load_model as mlx_lm_load_model

        generate_step = importlib.import_module("mlx_lm.generate").generate_step
        model, _ = mlx_lm_load_model(Path(path))
        mx.eval(model.parameters())
    load_s = time.perf_counter() - start

    def once(n_gen: int):
        mx.reset_peak_memory()
        prompt = mx.array(prompt_ids)
        t0 = time.perf_counter()
        tokens = []
        for i, (tok, _) in enumerate(generate_step(prompt, model, max_tokens=n_gen)):
            if i == 0:
                t1 = time.perf_counter()
            tokens.append(int(tok))
        t2 = time.perf_counter()
        return tokens, len(prompt_ids) / (t1 - t0), (len(tokens) - 1) / (t2 - t1)

    once(4)  # warm-up: first-call allocations and kernel setup
    tokens, prompt_tps, decode_tps = once(gen_tokens)
    return {"engine": engine, "load_s": round(load_s, 3), "prompt_tps": round(prompt_tps, 2),
            "decode_tps": round(decode_tps, 2), "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            "peak_rss_gb": round((machine_info.peak_rss_bytes() or float("nan")) / 1e9, 4), "tokens": tokens}


def run_llama_cpp(path: str, prompt_ids: list[int], gen_tokens: int) -> dict:
    """Runs inside a fresh worker process of an interpreter with llama-cpp-python (no applelm or MLX there)."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - start

    def once(n_gen: int):
        llm.reset()  # drop the KV cache: generate() would otherwise reuse the prompt evaluated last time
        t0 = time.perf_counter()
        tokens = []
        for i, tok in enumerate(llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0)):
            if i == 0:
                t1 = time.perf_counter()
            tokens.append(int(tok))
            if len(tokens) == n_gen:
                break
        t2 = time.perf_counter()
        return tokens, len(prompt_ids) / (t1 - t0), (len(tokens) - 1) / (t2 - t1)

    once(4)
    tokens, prompt_tps, decode_tps = once(gen_tokens)
    return {"engine": "llama.cpp", "load_s": round(load_s, 3), "prompt_tps": round(prompt_tps, 2),
            "decode_tps": round(decode_tps, 2), "peak_rss_gb": round((machine_info.peak_rss_bytes() or float("nan")) / 1e9, 4),
            "tokens": tokens, "threads": os.cpu_count()}


def llama_cpp_importable(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    except OSError:  # no such file, not executable
        return False


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# generate_bench ({m['device']}, {m['cpu']}, {m['cores']} cores)", "",
             f"Command: `{report.get('command', 'python benchmarks/generate_bench.py')}`; commit "
             f"{report.get('commit')}; {report['date']}; MLX {m['mlx']}; {m['platform']}; "
             f"load average at the end {m.get('load_avg')}  ",
             f"Model: {report['model']}; prompt {report['prompt_tokens']} tokens, {report['gen_tokens']} generated, "
             f"greedy; same tokens from every engine: {report['all_engines_same_tokens']}", "",
             "| engine | load s | prompt tok/s | decode tok/s | MLX peak GB | peak RSS GB | tokens equal to applelm's |",
             "|---|---:|---:|---:|---:|---:|---|"]
    first = report["rows"][0]["tokens"]
    for r in report["rows"]:
        rss = f"{r['peak_rss_gb']:.3f}" if "peak_rss_gb" in r else "not recorded"
        div = next((i for i, (a, b) in enumerate(zip(first, r["tokens"])) if a != b), None)
        same = "all" if div is None else f"first {div}"
        mlx_peak = f"{r['peak_memory_gb']:.3f}" if "peak_memory_gb" in r else "(not MLX)"
        lines.append(f"| {r['label']} | {r['load_s']:.2f} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
                     f"{mlx_peak} | {rss} | {same} |")
    if report.get("skipped"):
        lines += ["", f"Left out of this run (--skip): {', '.join(report['skipped'])}."]
    if "note" in report:
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2 Q4_1)")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "generate_cpu.json"))
    ap.add_argument("--llama-cpp-python", metavar="PYTHON", default=None,
                    help="an interpreter with llama-cpp-python installed: adds llama.cpp on the same GGUF file")
    ap.add_argument("--skip", action="append", default=[], metavar="LABEL",
                    help="leave out the engine of this label (repeatable), e.g. the slow 'mlx-lm q4 (f16 scales)'")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown summary of a results file")
    args = ap.parse_args()
    if args.render:
        Path(args.render).with_suffix(".md").write_text(markdown(json.loads(Path(args.render).read_text())))
        return

    if args.worker and args.worker[0] == "llama.cpp":
        print("RESULT " + json.dumps(run_llama_cpp(args.worker[1], json.loads(args.prompt_ids), args.gen_tokens)))
        return
    if args.worker:
        result = run_engine(args.worker[0], args.worker[1], json.loads(args.prompt_ids), args.gen_tokens)
        print("RESULT " + json.dumps(result))
        return

    if args.llama_cpp_python and not llama_cpp_importable(args.llama_cpp_python):
        sys.exit(f"--llama-cpp-python {args.llama_cpp_python}: not an interpreter that can import llama_cpp")
    from applelm.loader import default_model_path, load

    # (label, engine, weights: "gguf" or one of export_folders' folders, environment)
    runs = [("applelm", "applelm", "gguf", {}),
            ("applelm, steps not compiled", "applelm-plain", "gguf", {}),
            ("applelm, attention by MLX's products (APPLELM_CPU_ATTENTION=off)", "applelm", "gguf",
             {"APPLELM_CPU_ATTENTION": "off"}),
            ("applelm eager kernels (APPLELM_GRAPH_KERNELS=off)", "applelm-plain", "gguf",
             {"APPLELM_GRAPH_KERNELS": "off"}),
            ("applelm MLX paths (APPLELM_NATIVE=off)", "applelm", "gguf", {"APPLELM_NATIVE": "off"}),
            ("applelm --dequantize", "applelm-dense", "gguf", {}),
            ("mlx-lm q4 (f16 scales)", "mlx-lm", "q4_f16", {}),
            ("mlx-lm q4 (f32 scales)", "mlx-lm", "q4_f32", {}),
            ("mlx-lm dense f32", "mlx-lm", "dense_f32", {})]
    if args.llama_cpp_python:
        runs.append(("llama.cpp (llama-cpp-python)", "llama.cpp", "gguf", {}))
    unknown = set(args.skip) - {label for label, *_ in runs}
    if unknown:
        sys.exit(f"--skip: no engine labelled {sorted(unknown)[0]!r}")
    runs = [r for r in runs if r[0] not in args.skip]
    gguf = Path(args.model) if args.model else default_model_path()
    _, tokenizer = load(gguf)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT_TEXT}]),
                                  add_special_tokens=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {**export_folders(gguf, Path(tmp)), "gguf": gguf}
        for label, engine, weights, env in runs:
            python = args.llama_cpp_python if engine == "llama.cpp" else sys.executable
            cmd = [python, __file__, "--worker", engine, str(folders[weights]), "--prompt-ids", json.dumps(prompt_ids),
                   "--gen-tokens", str(args.gen_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
            result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
            result["label"] = label
            rows.append(result)
            print(f"{label:50s} load {result['load_s']:6.2f} s  prompt {result['prompt_tps']:8.1f} tok/s  "
                  f"decode {result['decode_tps']:6.1f} tok/s  peak RSS {result['peak_rss_gb']:.3f} GB", flush=True)
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    report = {"benchmark": "generate_bench", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "commit": machine_info.commit() or None, "command": "python " + shlex.join(["benchmarks/" + Path(__file__).name] + sys.argv[1:]),
              "model": str(gguf.name), "prompt_tokens": len(prompt_ids), "gen_tokens": args.gen_tokens,
              "all_engines_same_tokens": same, "rows": rows, "skipped": args.skip}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(report))
    print(f"same greedy tokens across engines: {same}; written to {args.out}")


if __name__ == "__main__":
    main()
