"""Size vs quality vs speed of SmolLM2-135M-Instruct at float16, 8/6/5/4/3/2-bit, mxfp4 and mixed-bit recipes.

Baseline: the embedded default model is a Q4_1 GGUF (token embedding Q8_0). Its weights, dequantized and stored
as float16, are the "float16" baseline; every other row quantizes that baseline again with applelm.convert, so
each row is lossy on top of the packaged (already lossy) weights. 4-bit in groups of 32 lands on Q4_1's own
grid (same group boundaries): a least-squares fit reproduces those layers almost exactly, so it looks almost
free; groups of 64 show the real cost of 4 bits.

Affine rows use applelm.convert's default least-squares fit of each group's scale and bias; q4_g32_mlxfit
rounds as mx.quantize (and mlx-lm's converter) does, for comparison.

Per row: weight bytes on disk, bits per weight, perplexity on the first N tokens of the GPL-3 text (sliding
window), and greedy decode tok/s of the model as stored (MLX's quantized kernels). Perplexity runs on the
layers dequantized to float32 (the same values, faster on MLX's CPU backend). Writes
benchmarks/results/compression_tradeoff.{json,md,png}.

    python benchmarks/compression_tradeoff.py [--tokens 4096] [--context 512] [--stride 256] [--only q4_g64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = Path("/usr/share/common-licenses/GPL-3")
# name -> convert() options
VARIANTS = {
    "float16": dict(dequantize=True),
    "q8_g64": dict(bits=8, group_size=64),
    "q6_g64": dict(bits=6, group_size=64),
    "q5_g64": dict(bits=5, group_size=64),
    "q4_g32": dict(bits=4, group_size=32),
    "q4_g32_mlxfit": dict(bits=4, group_size=32, fit="mlx"),  # mx.quantize's rounding, as mlx-lm writes it
    "q4_g64": dict(bits=4, group_size=64),
    "q4_g64_mlxfit": dict(bits=4, group_size=64, fit="mlx"),
    "mxfp4": dict(mode="mxfp4"),
    "q3_g64": dict(bits=3, group_size=64),
    "q2_g64": dict(bits=2, group_size=64),
    "mixed_4_8_g32": dict(recipe="mixed_4_8", group_size=32),
    "mixed_4_8_g64": dict(recipe="mixed_4_8", group_size=64),
    "mixed_3_6_g64": dict(recipe="mixed_3_6", group_size=64),
    "mixed_2_6_g64": dict(recipe="mixed_2_6", group_size=64),
}
# What a plain run measures (about 20 minutes on a quiet 2-core CPU, 30+ when it is shared); --only picks others.
DEFAULT = ["q8_g64", "q6_g64", "q4_g32", "q4_g32_mlxfit", "q4_g64", "q4_g64_mlxfit", "mxfp4", "q3_g64", "q2_g64",
           "mixed_4_8_g32", "mixed_4_8_g64", "mixed_3_6_g64"]


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def decode_tps(model, prompt, n: int) -> float:
    """Greedy tokens per second after the first (the first includes the prompt's prefill)."""
    import mlx.core as mx

    from applelm.generation import generate_step

    start, count = None, 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n + 1):
        if start is None:
            start = time.perf_counter()
        else:
            count += 1
    return count / (time.perf_counter() - start)


def run_variant(name: str, options: dict, src: Path, work: Path, tokens: list[int], args) -> dict:
    from applelm.convert import convert
    from applelm.loader import load_model
    from applelm.perplexity import perplexity

    out = work / name
    conv = convert(src, out, progress=False, **options)
    dense, _, _ = load_model(out, dequantize=True)
    ppl = perplexity(dense, tokens, args.context, args.stride)
    del dense
    stored, _, _ = load_model(out)
    tps = decode_tps(stored, tokens[: args.prompt_tokens], args.gen_tokens)
    row = {"name": name, "options": options, "size_mb": conv.size_bytes / 1e6,
           "bits_per_weight": round(conv.bits_per_weight, 3), "perplexity": ppl.perplexity, "nll": ppl.nll,
           "tokens_scored": ppl.tokens, "ppl_seconds": ppl.seconds, "decode_tps": tps}
    print(f"{name:>10}: {row['size_mb']:7.1f} MB  {row['bits_per_weight']:5.2f} bpw  ppl {ppl.perplexity:8.3f}  "
          f"decode {tps:5.1f} tok/s  (load {load_average()})", file=sys.stderr, flush=True)
    return row


def markdown(result: dict) -> str:
    base = result["rows"][0]["perplexity"]
    m = result["machine"]
    lines = [
        "# Compression trade-off: SmolLM2-135M-Instruct",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, MLX {m['mlx']} ({m['device']}), shared with "
        "other work: decode tok/s are noisy, perplexities are not.",
        f"Text: first {result['tokens']} tokens of {result['text']}, context {result['context']}, "
        f"stride {result['stride']}. Decode: greedy, {result['gen_tokens']} tokens after a "
        f"{result['prompt_tokens']}-token prompt, quantized layers as stored.",
        "",
        *[f"- `{r['command'].strip()}`: {r['seconds']:.0f} s, load average {r['load_before']} before, "
          f"{r['load_after']} after" for r in result["runs"]],
        "",
        "Baseline: the packaged Q4_1 GGUF dequantized to float16 (not an original float checkpoint); every other "
        "row re-quantizes it, lossy on top of lossy. q4_g32 coincides with Q4_1's own groups of 32, so its "
        "linear layers come back almost exactly: groups of 64 show what 4 bits cost. Affine rows use "
        "applelm.convert's least-squares fit; q4_g32_mlxfit rounds as mx.quantize (and mlx-lm) does.",
        "",
        "| variant | size (MB) | bits/weight | perplexity | vs float16 | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | "
                     f"{100 * (r['perplexity'] / base - 1):+.1f}% | {r['decode_tps']:.1f} |")
    return "\n".join(lines + ["", *findings(result)]) + "\n"


def findings(result: dict) -> list[str]:
    """A few sentences on what the rows show (only for the rows present)."""
    rows = {r["name"]: r for r in result["rows"]}
    base = rows["float16"]["perplexity"]

    def pct(name: str) -> str:
        return f"{100 * (rows[name]['perplexity'] / base - 1):+.1f}%"

    out = ["## Reading the table", ""]
    if "q4_g32" in rows:
        verdict = "within" if rows["q4_g32"]["perplexity"] <= 1.1 * base else "NOT within"
        out.append(f"- 4-bit, groups of 32 (q4_g32): {pct('q4_g32')} perplexity, {verdict} 10% of float16, at "
                   f"{rows['q4_g32']['size_mb'] / rows['float16']['size_mb']:.0%} of its size.")
    if "q4_g32_mlxfit" in rows:
        out.append(f"- The same format rounded as mx.quantize / mlx-lm do (q4_g32_mlxfit): {pct('q4_g32_mlxfit')}. "
                   "The least-squares fit matters most here because these weights already sit on Q4_1's grid.")
    if "q4_g64" in rows:
        extra = ""
        if "q4_g64_mlxfit" in rows:
            extra = f" (MLX rounding: {pct('q4_g64_mlxfit')})"
            if rows["q4_g64_mlxfit"]["perplexity"] < rows["q4_g64"]["perplexity"]:
                extra += "; here the fit's smaller weight error does not give a lower perplexity"
        out.append(f"- Groups of 64 straddle two Q4_1 groups: q4_g64 is {pct('q4_g64')}{extra}.")
    low = [n for n in ("mxfp4", "q3_g64", "q2_g64") if n in rows]
    if low:
        out.append("- Quality falls off below 4 affine bits: " + ", ".join(f"{n} {pct(n)}" for n in low) +
                   " (a 135M model has little redundancy; 2 bits destroys it).")
    mixed = [n for n in rows if n.startswith("mixed")]
    if mixed:
        out.append("- Mixed recipes (embeddings/head, first/last block and sensitive v/down_proj at the high width): "
                   + ", ".join(f"{n} {pct(n)} at {rows[n]['size_mb']:.0f} MB" for n in mixed) + ".")
    out.append("- Decode tok/s is MLX's CPU path for each format on a shared machine; smaller is not faster here.")
    return out


def plot(result: dict, path: Path) -> None:
    """Left: every row (log-log); right: the rows within 2x of float16's perplexity, linear scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rows = result["rows"]
    base = rows[0]["perplexity"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, subset in ((axes[0], rows), (axes[1], [r for r in rows if r["perplexity"] < 2 * base])):
        for r in subset:
            mixed = r["name"].startswith("mixed")
            ax.scatter(r["size_mb"], r["perplexity"], color="tab:orange" if mixed else "tab:blue", zorder=3)
            ax.annotate(r["name"], (r["size_mb"], r["perplexity"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, rotation=20)
        ax.axhline(base, color="gray", lw=0.8, ls="--", label=f"float16 baseline ({base:.2f})")
        ax.axhline(base * 1.1, color="tab:red", lw=0.8, ls=":", label="float16 + 10%")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("weights on disk (MB, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"perplexity, GPL-3 first {result['tokens']} tokens (log scale)")
    axes[0].set_title("all variants")
    axes[1].set_ylabel("perplexity")
    axes[1].set_title("within 2x of float16")
    fig.suptitle(f"SmolLM2-135M-Instruct: size vs perplexity (orange: mixed-bit recipes) - {result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None, help="variant names (float16 is always run first)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--merge", action="store_true",
                   help="add the measured rows to the existing results (same text and window; float16 re-measured)")
    p.add_argument("--replot", action="store_true", help="only redraw the table and plot from the existing JSON")
    args = p.parse_args()
    json_path = args.out / "compression_tradeoff.json"
    if args.replot:
        write_outputs(json.loads(json_path.read_text()), args.out)
        return 0

    from applelm import load
    from applelm.loader import default_model_path

    sys.path.insert(0, str(HERE))
    from generate_bench import machine

    start, load_before = time.perf_counter(), load_average()
    src = default_model_path()
    _, tokenizer = load(src)
    tokens = tokenizer.encode(TEXT.read_text())[: args.tokens]
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    names = ["float16"] + [n for n in (args.only or DEFAULT) if n != "float16"]
    with tempfile.TemporaryDirectory(prefix="applelm-compress-") as work:
        rows = [run_variant(n, VARIANTS[n], src, Path(work), tokens, args) for n in names]
    run = {"command": "python benchmarks/compression_tradeoff.py " + " ".join(sys.argv[1:]),
           "load_before": load_before, "load_after": load_average(), "seconds": time.perf_counter() - start,
           "variants": names}
    result = {"model": src.name, "text": str(TEXT), "tokens": len(tokens), "context": args.context,
              "stride": args.stride, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
              "machine": machine(), "source_gguf_mb": os.path.getsize(src) / 1e6, "runs": [run], "rows": rows}
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        same = ("text", "tokens", "context", "stride", "prompt_tokens", "gen_tokens")
        if any(old[k] != result[k] for k in same):
            p.error("--merge needs the same text, tokens, window and decode settings as the existing results")
        fresh = {r["name"] for r in rows[1:]}
        result["rows"] = [r for r in old["rows"] if r["name"] not in fresh] + rows[1:]
        result["runs"] = old["runs"] + [run]
    write_outputs(result, args.out)
    print(markdown(result))
    return 0


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_tradeoff.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compression_tradeoff.md").write_text(markdown(result))
    plot(result, out / "compression_tradeoff.png")


if __name__ == "__main__":
    sys.exit(main())
