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
    "mxfp4": dict(mode="mxfp4"),
    "q3_g64": dict(bits=3, group_size=64),
    "q2_g64": dict(bits=2, group_size=64),
    "mixed_4_8": dict(recipe="mixed_4_8", group_size=64),
    "mixed_3_6": dict(recipe="mixed_3_6", group_size=64),
    "mixed_2_6": dict(recipe="mixed_2_6", group_size=64),
}
# What a plain run measures (about 15 minutes on a 2-core CPU, more when it is shared); --only picks others.
DEFAULT = ["q8_g64", "q6_g64", "q4_g32", "q4_g32_mlxfit", "q4_g64", "mxfp4", "q3_g64", "q2_g64", "mixed_4_8",
           "mixed_3_6"]


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
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, MLX {m['mlx']} ({m['device']}); "
        f"load average {result['load_before']} before, {result['load_after']} after (shared machine).",
        f"Text: first {result['tokens']} tokens of {result['text']}, context {result['context']}, "
        f"stride {result['stride']}. Decode: greedy, {result['gen_tokens']} tokens after a "
        f"{result['prompt_tokens']}-token prompt, quantized layers as stored. Total run {result['seconds']:.0f} s.",
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
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    base = rows[0]["perplexity"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        mixed = r["name"].startswith("mixed")
        ax.scatter(r["size_mb"], r["perplexity"], color="tab:orange" if mixed else "tab:blue", zorder=3)
        ax.annotate(r["name"], (r["size_mb"], r["perplexity"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axhline(base, color="gray", lw=0.8, ls="--", label=f"float16 baseline ({base:.2f})")
    ax.axhline(base * 1.1, color="tab:red", lw=0.8, ls=":", label="+10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights on disk (MB, log scale)")
    ax.set_ylabel(f"perplexity on GPL-3, first {result['tokens']} tokens (log scale)")
    ax.set_title("SmolLM2-135M: size vs perplexity (orange: mixed-bit recipes)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None, help="variant names (float16 is always run first)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

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
    result = {"model": src.name, "text": str(TEXT), "tokens": len(tokens), "context": args.context,
              "stride": args.stride, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
              "machine": machine(), "load_before": load_before, "load_after": load_average(),
              "seconds": time.perf_counter() - start, "source_gguf_mb": os.path.getsize(src) / 1e6, "rows": rows,
              "command": "python benchmarks/compression_tradeoff.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression_tradeoff.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "compression_tradeoff.md").write_text(markdown(result))
    plot(result, args.out / "compression_tradeoff.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
