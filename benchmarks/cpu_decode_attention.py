"""On the CPU, one query's attention (decode): MLX's fused call, the same products written out, and the C kernel.

For the attention shapes of the supported architectures, 1/4/16 rows (the server's batch) and 32-2048 cached
keys: mx.fast.scaled_dot_product_attention, models.base.grouped_decode_attention (the query heads that share
a kv head stacked as rows of one product) and ops/cpu_attention.py's kernel (ops/attention_cpu.c as a graph
node), each timed in turn, median of repeated calls. Keys and values are what a cache hands out: the used
columns of a buffer grown 256 columns at a time. Rows beyond one carry the batch cache's boolean padding
mask, as the server's decode does. The dispatch rule in models/base.py cites this script's results.

Then end to end, on the embedded SmolLM2 (Q4_1 GGUF): greedy decode after a 512-token prompt (one row), and
16 rows of 160-token prompts (the server's batch), each path on its own cache, in alternating chunks of
tokens, so all see the same machine; tok/s per path and whether they produced the same tokens.

    python benchmarks/cpu_decode_attention.py [--out FILE.json] [--seconds 0.15] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import applelm  # noqa: F401  (preloads the fast BLAS before mlx; see applelm/_blas.py)
import mlx.core as mx
from applelm.models import base
from applelm.models.base import grouped_decode_attention
from applelm.ops import cpu_attention

import machine_info  # benchmarks/machine_info.py

# (name, query heads, kv heads, head dim)
SHAPES = [("SmolLM2-135M", 9, 3, 64), ("Gemma-3-270M", 4, 1, 256), ("Qwen2-0.5B", 14, 2, 64),
          ("Llama-3.2-1B", 32, 8, 64), ("Llama-3-8B", 32, 8, 128), ("no GQA (8 heads)", 8, 8, 64)]
ROWS = [1, 4, 16]
KEYS = [32, 64, 96, 127, 128, 192, 256, 512, 1024, 2048]


def median_ms(fns: list, seconds: float) -> list[float]:
    """Median ms of each function's calls, the functions called in turn for about `seconds` each."""
    for fn in fns:
        mx.eval(fn())
    times = [[] for _ in fns]
    end = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < end or len(times[0]) < 5:
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            mx.eval(fn())
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def fused_attention(q, k, v, *, scale, mask):
    """MLX's fused call in grouped_decode_attention's place (the path before it)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=None if isinstance(mask, str) else mask)


PATHS = ("fused", "grouped", "kernel")


def use(path: str) -> None:
    """Send the models' one-query CPU attention down `path` (the kernel only where it is available)."""
    base.grouped_decode_attention = fused_attention if path == "fused" else grouped_decode_attention
    cpu_attention.available = _available if path == "kernel" else (lambda: False)


_available = cpu_attention.available


def end_to_end(rounds: int, chunk: int = 8) -> list[dict]:
    """Decode tok/s of the embedded SmolLM2 through each attention path, chunks of `chunk` tokens in turn."""
    from pathlib import Path

    from applelm import flash, load
    from applelm.batch_cache import make_batch_cache
    from applelm.cache import make_prompt_cache
    from applelm.generation import prefill

    model, tok = load(None)
    text = Path(flash.__file__).with_name("calibration.txt").read_text()
    ids = tok.encode(text)
    paths = PATHS if _available() else PATHS[:2]
    out = []
    try:
        for rows, prompt_len in ((1, 512), (16, 160)):
            prompts = mx.array([(ids * 4)[r * 7: r * 7 + prompt_len] for r in range(rows)], dtype=mx.int32)
            state = {}
            for name in paths:
                use(name)
                cache = make_prompt_cache(model) if rows == 1 else make_batch_cache(model, [0] * rows)
                last = mx.argmax(model(prefill(model, prompts, cache, 512), cache=cache)[:, -1], axis=-1)
                mx.eval(last)
                state[name] = {"cache": cache, "last": last, "tokens": [], "seconds": []}
            for _ in range(rounds):
                for name in paths:
                    use(name)
                    s = state[name]
                    t0 = time.perf_counter()
                    for _ in range(chunk):
                        s["last"] = mx.argmax(model(s["last"][:, None], cache=s["cache"])[:, -1], axis=-1)
                        s["tokens"].append(s["last"].tolist())
                    s["seconds"].append(time.perf_counter() - t0)
            row = {"rows": rows, "prompt_tokens": prompt_len, "tokens_per_row": rounds * chunk,
                   "same_tokens": all(state[p]["tokens"] == state["fused"]["tokens"] for p in paths)}
            for name in paths:
                row[f"{name}_tok_s"] = round(statistics.median(rows * chunk / t for t in state[name]["seconds"]), 2)
                row[f"{name}_chunk_tok_s"] = [round(rows * chunk / t, 2) for t in state[name]["seconds"]]
            fused_s, grouped_s = state["fused"]["seconds"], state["grouped"]["seconds"]
            row["grouped_faster_chunks"] = sum(g < f for f, g in zip(fused_s, grouped_s))
            if "kernel" in state:
                row["kernel_faster_chunks"] = sum(k < g for g, k in zip(grouped_s, state["kernel"]["seconds"]))
            print(row, flush=True)
            out.append(row)
    finally:  # the models' own paths again, also when a step raised
        base.grouped_decode_attention, cpu_attention.available = grouped_decode_attention, _available
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--seconds", type=float, default=0.15, help="time per path per cell")
    ap.add_argument("--rounds", type=int, default=5, help="chunks of 8 tokens per path, end to end")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    kernel = _available()
    cells = []
    for name, heads, kv_heads, dim in SHAPES:
        for b in ROWS:
            for t in KEYS:
                q = mx.random.normal((b, heads, 1, dim))
                width = -(-t // 256) * 256  # the cache's buffer, grown 256 columns at a time
                kb, vb = mx.random.normal((b, kv_heads, width, dim)), mx.random.normal((b, kv_heads, width, dim))
                k, v = kb[:, :, :t], vb[:, :, :t]
                # a batch's rows are left-padded to a common width: a padding mask, with one row unpadded
                mask = (mx.arange(t)[None] >= mx.array([0] + [i % 7 for i in range(1, b)])[:, None])[:, None, None]
                mask = None if b == 1 else mask
                mx.eval(q, kb, vb) if mask is None else mx.eval(q, kb, vb, mask)
                scale = dim ** -0.5
                fns = [lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
                       lambda: grouped_decode_attention(q, k, v, scale=scale, mask=mask)]
                if kernel:
                    fns.append(lambda: cpu_attention.decode_attention(q, k, v, scale=scale, mask=mask))
                err = max(mx.abs(fns[0]() - fn()).max().item() for fn in fns[1:])
                ms = median_ms(fns, args.seconds)
                cell = {"shape": name, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "rows": b,
                        "keys": t, "max_abs_diff": err}
                cell.update({f"{p}_ms": round(x, 4) for p, x in zip(PATHS, ms)})
                cells.append(cell)
                print(f"{name:18s} rows {b:2d} keys {t:5d}: " + "  ".join(f"{p} {x:8.3f} ms" for p, x in zip(PATHS, ms))
                      + f"  diff {err:.1e}", flush=True)
    gqa = [c for c in cells if c["kv_heads"] < c["heads"]]
    slower = {"gqa": sum(c["grouped_ms"] > c["fused_ms"] for c in gqa),
              "no_gqa": sum(c["grouped_ms"] > c["fused_ms"] for c in cells if c not in gqa)}
    result = {"machine": machine_info.machine(), "commit": machine_info.commit(), "mlx": mx.__version__,
              "command": "python benchmarks/cpu_decode_attention.py", "timings": cells,
              "grouped_slower_cells": slower, "cells": {"gqa": len(gqa), "no_gqa": len(cells) - len(gqa)}}
    if kernel:
        result["kernel_slower_cells"] = sum(c["kernel_ms"] > min(c["fused_ms"], c["grouped_ms"]) for c in cells)
    result["end_to_end"] = end_to_end(args.rounds)
    machine_info.write_results(result, markdown(result), args.out, "cpu_decode_attention")
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    kernel = "kernel_slower_cells" in r
    paths = PATHS if kernel else PATHS[:2]
    lines = [f"# One query's attention on the CPU: MLX's fused call, the grouped products and the C kernel "
             f"({m['cpu']})", "",
             f"Command: `{r['command']}`  ",
             f"Commit {r['commit']}, MLX {r['mlx']}, {m['platform']}, {m['cores']} cores, load average at start "
             f"{m['load_avg']}", "",
             f"ms per call (median), float32: {' / '.join(paths)}; keys and values are the used columns of a "
             "buffer grown 256 at a time. Rows beyond one carry a boolean padding mask.", "",
             "| shape (heads/kv heads x dim) | rows | " + " | ".join(f"{t} keys" for t in KEYS) + " |",
             "|---|---:|" + "---:|" * len(KEYS)]
    by = {}
    for c in r["timings"]:
        by.setdefault((c["shape"], c["heads"], c["kv_heads"], c["head_dim"], c["rows"]), {})[c["keys"]] = c
    for (name, h, kv, d, b), row in by.items():
        cells = [" / ".join(f"{c[p + '_ms']:.3f}" for p in paths) for c in (row[t] for t in KEYS)]
        lines.append(f"| {name} ({h}/{kv} x {d}) | {b} | " + " | ".join(cells) + " |")
    worst = max(r["timings"], key=lambda c: c["max_abs_diff"])
    slower, n = r["grouped_slower_cells"], r["cells"]
    lines += ["", f"Cells where the grouped products were slower than the fused call: {slower['gqa']} of {n['gqa']} "
              f"with GQA, {slower['no_gqa']} of {n['no_gqa']} without (the same products)."]
    if kernel:
        lines.append(f"Cells where the kernel was slower than the faster of the other two: {r['kernel_slower_cells']} "
                     f"of {n['gqa'] + n['no_gqa']}.")
    lines += [f"Largest difference from the fused call's output: {worst['max_abs_diff']:.1e}.", ""]
    if r.get("end_to_end"):
        lines += ["Embedded SmolLM2 (Q4_1 GGUF), greedy decode, the paths in alternating chunks of 8 tokens:", "",
                  "| rows x prompt tokens | tokens per row | " + " | ".join(f"{p} tok/s" for p in paths)
                  + " | grouped faster than fused (chunks) |" + (" kernel faster than grouped (chunks) |" if kernel
                                                                 else "") + " same tokens |",
                  "|---|---:|" + "---:|" * len(paths) + "---:|" + ("---:|" if kernel else "") + "---|"]
        for e in r["end_to_end"]:
            chunks = len(e["fused_chunk_tok_s"])
            lines.append(f"| {e['rows']} x {e['prompt_tokens']} | {e['tokens_per_row']} | "
                         + " | ".join(str(e[f"{p}_tok_s"]) for p in paths)
                         + f" | {e['grouped_faster_chunks']}/{chunks} |"
                         + (f" {e['kernel_faster_chunks']}/{chunks} |" if kernel else "") + f" {e['same_tokens']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
