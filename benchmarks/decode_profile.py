"""Where a CPU decode token goes: SmolLM2-135M Q4_1 GGUF (the embedded default) through the C kernel.

Per token, over `--tokens` greedy steps after a warm-up, in rounds (the VM drifts): wall time, time inside
the compiled kernel (ops/gguf_cpu.c, through ops/cpu_native's matmul_numpy, and matmuls_numpy and ffn_numpy
for the fused q/k/v and FFN calls), time waiting for MLX to evaluate
each kernel call's input (the norms, RoPE, attention and SwiGLU gating MLX computes between the products, plus
the hand-off to its CPU stream), time turning the kernel's result back into an MLX array, and the rest
(Python, graph building, sampling). The split is of the eager calls (APPLELM_GRAPH_KERNELS=off, steps not
compiled), where each kernel call is a hand-off the profile can time; the default, kernels as MLX graph nodes
in a compiled step, has no such seams (its total is in benchmarks/generate_bench.py). Also each product shape's kernel time alone on random blocks, one
activation row, 1 and all threads (best of 5 batches), and its read speed, single and fused calls.

    python benchmarks/decode_profile.py [--tokens 48] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import machine_info  # benchmarks/machine_info.py

HERE = Path(__file__).resolve().parent
PROMPT = "The history of astronomy spans thousands of years. Ancient observers tracked"


def token_split(tokens: int, rounds: int) -> list[dict]:
    """Per round: ms per token, in total and per part (kernel, input eval, result wrap, rest), and calls."""
    import mlx.core as mx

    from applelm import load
    from applelm.generation import generate_step
    from applelm.ops import cpu_native

    spent, calls = collections.Counter(), collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    originals = {"matmul_numpy": cpu_native.matmul_numpy, "matmuls_numpy": cpu_native.matmuls_numpy,
                 "ffn_numpy": cpu_native.ffn_numpy, "_evaluated_f32": cpu_native._evaluated_f32,
                 "_finish": cpu_native._finish, "graph_ready": cpu_native.graph_ready}
    names = {"matmul_numpy": "kernel", "matmuls_numpy": "kernel", "ffn_numpy": "kernel", "_evaluated_f32": "input_eval",
             "_finish": "result_wrap"}
    model, tokenizer = load()
    prompt = mx.array(tokenizer.encode(PROMPT), dtype=mx.int32)
    out = []
    try:
        for attr, fn in originals.items():
            setattr(cpu_native, attr, timed(names[attr], fn) if attr in names else (lambda: False))
        for _ in range(rounds):
            steps = generate_step(prompt, model, max_tokens=tokens + 4, compile=False)
            for _ in range(4):  # prompt and first steps
                next(steps)
            spent.clear()
            calls.clear()
            t0 = time.perf_counter()
            for _ in range(tokens):
                next(steps)
            wall = time.perf_counter() - t0
            row = {"ms_per_token": round(1000 * wall / tokens, 2), "tok_s": round(tokens / wall, 2)}
            row.update({f"{k}_ms": round(1000 * v / tokens, 2) for k, v in spent.items()})
            row["rest_ms"] = round(1000 * (wall - sum(spent.values())) / tokens, 2)
            row["kernel_calls_per_token"] = calls["kernel"] / tokens
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for attr, fn in originals.items():
            setattr(cpu_native, attr, fn)
    return out


def shape_times(threads: list[int]) -> list[dict]:
    """Each SmolLM2 product alone: kernel microseconds for one activation row, best of 5 batches."""
    import numpy as np

    sys.path.insert(0, str(HERE.parent / "tests"))
    from gguf_blocks import random_blocks

    from applelm.ops import cpu_native

    shapes = [("q_proj, o_proj", "Q4_1", 576, 576), ("k_proj, v_proj", "Q4_1", 192, 576),
              ("gate_proj, up_proj", "Q4_1", 1536, 576), ("down_proj", "Q4_1", 576, 1536),
              ("tied head", "Q8_0", 49152, 576)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    cases = []
    for name, ggml_type, n, k in shapes:
        packed = random_blocks(ggml_type, n, k)
        xk = rng.standard_normal((1, k)).astype(np.float32)
        cases.append((name, ggml_type, f"{n}x{k}", packed.nbytes,
                      lambda t, xk=xk, p=packed, g=ggml_type: cpu_native.matmul_numpy(xk, p, g, threads=t)))
    # The fused calls decoding makes (ops.shared_input, ops.gated_ffn): q, k, v together; a whole FFN.
    qkv = [(random_blocks("Q4_1", n, 576), "Q4_1") for n in (576, 192, 192)]
    cases.append(("q, k, v in one call", "Q4_1", "960x576", sum(p.nbytes for p, _ in qkv),
                  lambda t: cpu_native.matmuls_numpy(x, qkv, threads=t)))
    ffn = [(random_blocks("Q4_1", 1536, 576), "Q4_1"), (random_blocks("Q4_1", 1536, 576), "Q4_1"),
           (random_blocks("Q4_1", 576, 1536), "Q4_1")]
    cases.append(("gated FFN in one call", "Q4_1", "3x1536x576", sum(p.nbytes for p, _ in ffn),
                  lambda t: cpu_native.ffn_numpy(x, *ffn, "silu", threads=t)))
    rows = []
    for name, ggml_type, shape, nbytes, call in cases:
        row = {"product": name, "type": ggml_type, "shape": shape, "bytes": int(nbytes)}
        reps = 20 if nbytes > 10e6 else 300
        for t in threads:
            call(t)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    call(t)
                best = min(best, (time.perf_counter() - t0) / reps)
            row[f"us_{t}t"] = round(best * 1e6, 1)
            row[f"GBps_{t}t"] = round(nbytes / best / 1e9, 2)
        rows.append(row)
    return rows


def markdown(r: dict) -> str:
    lines = [f"# Where a CPU decode token goes ({r['machine']['cpu']}, {r['machine']['cores']} cores)", "",
             f"Command: `{r['command']}`  ", f"{r['date']}, commit {r['commit']}, {r['machine']['platform']}, "
             f"load average at start {r['load_start']}, end {r['load_end']}", "",
             "SmolLM2-135M Q4_1 GGUF decode, ms per token:", "",
             "| round | tok/s | total | kernel | waiting for MLX (input eval) | result wrap | rest | kernel calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(r["rounds"], 1):
        lines.append(f"| {i} | {row['tok_s']} | {row['ms_per_token']} | {row.get('kernel_ms', 0)} | "
                     f"{row.get('input_eval_ms', 0)} | {row.get('result_wrap_ms', 0)} | {row['rest_ms']} | "
                     f"{row['kernel_calls_per_token']:.0f} |")
    threads = r["threads"]
    lines += ["", "Each product alone, one activation row (best of 5 batches):", "",
              "| product | type | shape | MB | " + " | ".join(f"us, {t} thread(s) | GB/s" for t in threads) + " |",
              "|---|---|---|---:|" + "---:|---:|" * len(threads)]
    for s in r["shapes"]:
        lines.append(f"| {s['product']} | {s['type']} | {s['shape']} | {s['bytes'] / 1e6:.2f} | "
                     + " | ".join(f"{s[f'us_{t}t']} | {s[f'GBps_{t}t']}" for t in threads) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "decode_profile_cpu_linux-x86_64-2core.json"))
    args = p.parse_args()
    import applelm  # noqa: F401  (BLAS preload before mlx)
    from applelm.native_build import default_threads

    result = {"command": "python " + " ".join(["benchmarks/" + Path(__file__).name] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "commit": machine_info.commit() or None,
              "machine": machine_info.machine(), "load_start": machine_info.load_avg()}
    result["rounds"] = token_split(args.tokens, args.rounds)
    result["threads"] = sorted({1, default_threads()})
    result["shapes"] = shape_times(result["threads"])
    result["load_end"] = machine_info.load_avg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
