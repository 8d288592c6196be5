"""Decode speed: applelm vs mlx-lm on the same synthetic checkpoints, in the same process and run.

Checkpoints are MLX folders with random weights (cost does not depend on values), written once per shape
and format into --work-dir and loaded by each engine through its own loader: Llama-3-8B, Llama-3.2-1B and
Qwen2-0.5B shapes, bf16 and 4-bit (affine, group 64, bf16 scales: what `mlx_lm.convert -q` writes).
Per row and engine: prefill tok/s over a --prompt-token prompt, decode tok/s over --gen-tokens (after a
warm-up), peak memory, resident weight bytes, and % of the memory-bandwidth roofline: decode tok/s x weight
bytes read per token / bandwidth (measured in the same run by a large device copy; --bandwidth-gbs overrides,
e.g. 3350 for an H100's HBM). A "smollm2-gguf" row runs the embedded SmolLM2 GGUF (applelm) against its
lossless MLX export (mlx-lm).

    python benchmarks/decode_bench.py --rows 1b-bf16,1b-q4,0.5b-bf16,0.5b-q4,smollm2-gguf      # CPU here
    python benchmarks/decode_bench.py --rows all --out $OUT/decode_h100.json                     # on the GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import applelm  # noqa: F401  (before mlx: preloads a fast BLAS on Linux CPU; see applelm/_blas.py)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

import machine_info  # benchmarks/machine_info.py

HERE = Path(__file__).resolve().parent
SHAPES = {
    "8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192),
    "1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    "0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768),
}
ALL_ROWS = [f"{s}-{f}" for s in SHAPES for f in ("bf16", "q4")] + ["smollm2-gguf"]


def write_checkpoint(shape: str, fmt: str, folder: Path) -> Path:
    """A random-weight MLX folder, written one layer at a time (bounded memory even for 8B)."""
    from applelm.models import get_architecture

    config = dict(SHAPES[shape])
    marker = folder / "config.json"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    arch = get_architecture(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if fmt == "q4":
        predicate = lambda _, m: isinstance(m, nn.Linear) or isinstance(m, nn.Embedding)
        nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
        config["quantization"] = {"group_size": 64, "bits": 4}
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    groups: dict[str, dict] = {}
    for name, value in params:
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(key, {})[name] = value
    weight_map = {}
    for i, (key, tensors) in enumerate(groups.items()):
        out = {}
        for name, v in tensors.items():
            v = v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
            if name.endswith("norm.weight"):
                v = mx.ones(v.shape, mx.bfloat16)
            out[name] = v
        mx.eval(out)
        fname = f"model-{i:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), out)
        weight_map.update({n: fname for n in out})
        del out
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    marker.write_text(json.dumps(config))
    return folder


def export_smollm2(folder: Path) -> tuple[Path, Path]:
    """The embedded GGUF and its lossless MLX export (Q4_1/Q8_0 blocks are MLX affine groups of 32)."""
    import generate_bench as gb  # benchmarks/generate_bench.py
    from applelm.loader import default_model_path

    gguf = default_model_path()
    if not (folder / "q4_f16" / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder))
        made = gb.export_folders(gguf, tmp)
        made["q4_f16"].rename(folder / "q4_f16")
    return gguf, folder / "q4_f16"


def measure_bandwidth_gbs() -> dict:
    """Achievable memory bandwidth, two ways: a device copy of a 512 MiB array (bytes read + written per
    second) and a float32 matrix-vector product over a 512 MiB matrix (bytes read per second: what decode
    does). On a CPU the copy is a single-threaded MLX loop and understates the memory system, so the
    roofline uses the larger of the two."""
    a = mx.random.uniform(shape=(128 * 1024 * 1024,))
    mx.eval(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a + 1)
        best = min(best, time.perf_counter() - t)
    copy = 2 * a.nbytes / best / 1e9
    w, v = a.reshape(16384, 8192), mx.random.uniform(shape=(8192, 1))
    mx.eval(v)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(w @ v)
        best = min(best, time.perf_counter() - t)
    gemv = a.nbytes / best / 1e9
    del a, w
    mx.clear_cache()
    return {"copy": round(copy, 1), "gemv_f32": round(gemv, 1), "best": round(max(copy, gemv), 1)}


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def run_engine(engine: str, path: Path, prompt: list[int], gen: int, max_decode_s: float = 0.0) -> dict:
    if engine == "applelm":
        from applelm.generation import generate_step
        from applelm.loader import load_model

        model, _, _ = load_model(path)
    else:
        import importlib

        from mlx_lm.utils import load_model as mlx_lm_load_model

        generate_step = importlib.import_module("mlx_lm.generate").generate_step
        model, _ = mlx_lm_load_model(path)
        mx.eval(model.parameters())
    wbytes = weight_bytes(model)

    def once(p: list[int], n: int):
        t0 = time.perf_counter()
        count = 0
        for i, (tok, _) in enumerate(generate_step(mx.array(p), model, max_tokens=n)):
            if i == 0:
                t1 = time.perf_counter()
            count += 1
            # A time cap for very slow engines (e.g. bf16-scaled quantized matmul on a CPU): the rate is
            # still measured over whole decode steps, and the report gives how many were decoded.
            if max_decode_s and count >= 9 and time.perf_counter() - t1 > max_decode_s:
                break
        t2 = time.perf_counter()
        return len(p) / (t1 - t0), (count - 1) / (t2 - t1), count - 1

    once(prompt[:16], 4)  # warm-up
    mx.reset_peak_memory()
    prefill_tps, decode_tps, decoded = once(prompt, gen)
    peak = mx.get_peak_memory()
    del model
    gc.collect()
    mx.clear_cache()
    return {"engine": engine, "prefill_tps": round(prefill_tps, 2), "decode_tps": round(decode_tps, 2),
            "decoded_tokens": decoded, "peak_memory_gb": round(peak / 1e9, 3), "weight_gb": round(wbytes / 1e9, 3)}


def markdown(report: dict) -> str:
    lines = [f"# decode_bench ({report['device_name']}: {report['cpu'] if report['device_name'] == 'cpu' else report['device']}, "
             f"{report['cores']} cores)", "",
             f"Command: `{report['command']}`; {report['date']}; MLX {report['mlx']}; {report['platform']}; "
             f"load average at the end {[round(v, 2) for v in report['load_avg']]}  ",
             f"Prompt {report['prompt_tokens']} tokens, up to {report['gen_tokens']} generated (decode capped at "
             f"{report['max_decode_seconds'] or 'no'} s per engine), greedy, after a warm-up; roofline bandwidth "
             f"{report['roofline_bandwidth_gbs']} GB/s (measured in the run: {report['measured_bandwidth_gbs']})", "",
             "| row | engine | prefill tok/s | decode tok/s | tokens decoded | peak GB | weights GB | % of roofline |"
             " applelm / mlx-lm decode |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report["rows"]:
        for engine in ("mlx-lm", "applelm"):
            r = e[engine]
            lines.append(f"| {e['row']} | {engine} | {r['prefill_tps']} | {r['decode_tps']} | {r['decoded_tokens']} | "
                         f"{r['peak_memory_gb']} | {r['weight_gb']} | {r['roofline_pct']} | "
                         f"{e['decode_speedup'] if engine == 'applelm' else ''} |")
    slower = [e["row"] for e in report["rows"] if e["decode_speedup"] < 1]
    lines += ["", f"applelm decode at least mlx-lm's on every row: {'yes' if not slower else 'no: ' + ', '.join(slower)}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1b-bf16,1b-q4,0.5b-bf16,0.5b-q4,smollm2-gguf",
                    help=f"comma list of {', '.join(ALL_ROWS)} or 'all'")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "applelm-decode-bench"))
    ap.add_argument("--max-decode-seconds", type=float, default=0.0,
                    help="stop decoding a row after this long (at least 8 tokens; 0: no cap); the report says how many")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="roofline bandwidth (default: measured)")
    ap.add_argument("--device-name", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = ALL_ROWS if args.rows == "all" else args.rows.split(",")
    device = mx.default_device()
    measured_bw = measure_bandwidth_gbs()
    bandwidth = args.bandwidth_gbs or measured_bw["best"]
    print(f"bandwidth measured (GB/s): {measured_bw}; roofline uses {bandwidth}", flush=True)
    name = args.device_name or ("cpu" if device.type == mx.cpu else "gpu")
    out = Path(args.out or HERE / "results" / f"decode_{name}.json")
    rng = np.random.default_rng(0)
    results = []
    for row in rows:
        work = Path(args.work_dir)
        if row == "smollm2-gguf":
            gguf, mlx_folder = export_smollm2(work / "smollm2")
            paths = {"applelm": gguf, "mlx-lm": mlx_folder}
            vocab = 49152
        else:
            shape, fmt = row.rsplit("-", 1)
            folder = write_checkpoint(shape, fmt, work / row)
            paths = {"applelm": folder, "mlx-lm": folder}
            vocab = SHAPES[shape]["vocab_size"]
        prompt = rng.integers(0, vocab, args.prompt_tokens).tolist()
        entry = {"row": row}
        for engine in ("mlx-lm", "applelm"):
            r = run_engine(engine, paths[engine], prompt, args.gen_tokens, args.max_decode_seconds)
            r["roofline_pct"] = round(100 * r["decode_tps"] * r["weight_gb"] / bandwidth, 1)
            entry[engine] = r
            print(f"{row:14s} {engine:8s} prefill {r['prefill_tps']:9.1f} tok/s  decode {r['decode_tps']:7.2f} tok/s ({r['decoded_tokens']})  "
                  f"peak {r['peak_memory_gb']:6.2f} GB  weights {r['weight_gb']:6.2f} GB  roofline {r['roofline_pct']:5.1f}%",
                  flush=True)
        entry["decode_speedup"] = round(entry["applelm"]["decode_tps"] / entry["mlx-lm"]["decode_tps"], 2)
        results.append(entry)
        # Written after every row: a run cut short (e.g. by a device time limit) keeps the rows it finished.
        report = {"benchmark": "decode_bench", "date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
                  "cpu": machine_info.cpu_name(), "command": "python benchmarks/decode_bench.py " + " ".join(sys.argv[1:]),
                  "device_name": name, "platform": platform.platform(), "cores": os.cpu_count(),
                  "mlx": mx.__version__, "load_avg": os.getloadavg(), "measured_bandwidth_gbs": measured_bw,
                  "roofline_bandwidth_gbs": bandwidth, "prompt_tokens": args.prompt_tokens,
                  "gen_tokens": args.gen_tokens, "max_decode_seconds": args.max_decode_seconds,
                  "rows_asked": rows, "rows": results}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown(report))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
