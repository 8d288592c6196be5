"""Could sparse paging start layer L+1's reads while layer L computes? A measurement, not a feature.

Sparse paging reads a layer's active neurons only once that layer's FFN input is known, so its reads
do not overlap compute (flash_bench: "I/O hidden" near 0%). Deja Vu-style lookahead would apply layer
L+1's selector to layer L's FFN input, which is known one layer earlier, and read that set ahead. This
script measures how good that guess is on the prepared SmolLM2 flash layout (fully resident, float32,
one forward pass over GPL-3 text), for both selectors:

  - threshold: |act(gate_{L+1} . x)| > t_{L+1} (the calibrated threshold for the target sparsity)
  - predictor: the low-rank predictor of layer L+1, (x A) B + bias > tau

with x = layer L's FFN input (the guess) against x = layer L+1's own (the set it will use). It reports
neuron recall (share of the needed neurons the guess holds) and the guess's size, and the same in
4 KiB pages of the layer file (what direct I/O reads), with and without a looser guess threshold.

    python benchmarks/sparse_lookahead.py [--layout DIR] [--tokens 256] [--sparsity 0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import applelm  # noqa: F401  (preloads the fast BLAS before mlx)
import flash_bench
import machine_info
import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GPL3 = Path("/usr/share/common-licenses/GPL-3")
PAGE = 4096


def record_inputs(model, ids: list[int]) -> list[np.ndarray]:
    """Each layer's FFN input for every position of one forward pass over `ids`."""
    seen = {}
    for i, block in enumerate(model.layers):
        mlp = block.mlp

        def wrapped(x, _mlp=mlp, _i=i, _call=type(mlp).__call__):
            seen[_i] = x
            return _call(_mlp, x)

        block.mlp = _Hook(wrapped)
    mx.eval(model(mx.array([ids])))
    return [np.array(seen[i][0].astype(mx.float32)) for i in range(len(model.layers))]


class _Hook:
    """Stands in for a layer's FFN module and records its input (a plain callable is enough here)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


def pages_of(neurons: np.ndarray, bundle: int, n_bytes: int) -> np.ndarray:
    """The 4 KiB pages of the layer file that reading the first n_bytes of each neuron's bundle touches."""
    first = neurons * bundle // PAGE
    last = (neurons * bundle + n_bytes - 1) // PAGE
    return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)])) if len(neurons) else first


def compare(guess: np.ndarray, need: np.ndarray, bundle: int, n_bytes: int) -> dict:
    """Recall and size of one guessed set against the needed set (boolean masks over neurons)."""
    g, n = np.flatnonzero(guess), np.flatnonzero(need)
    gp, npg = pages_of(g, bundle, n_bytes), pages_of(n, bundle, n_bytes)
    return {"needed": len(n), "guessed": len(g), "hit": int(np.sum(guess & need)),
            "pages_needed": len(npg), "pages_guessed": len(gp), "pages_hit": len(np.intersect1d(gp, npg))}


def summarize(rows: list[dict], layer_pages: int) -> dict:
    t = {k: sum(r[k] for r in rows) for k in rows[0]}
    return {"neuron_recall": round(t["hit"] / max(1, t["needed"]), 3),
            "guess_over_needed": round(t["guessed"] / max(1, t["needed"]), 3),
            "page_recall": round(t["pages_hit"] / max(1, t["pages_needed"]), 3),
            "pages_guess_over_needed": round(t["pages_guessed"] / max(1, t["pages_needed"]), 3),
            "pages_needed_share_of_layer": round(t["pages_needed"] / len(rows) / layer_pages, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default=None, help="a flash layout prepared with --train-predictors (default: "
                   "flash_bench's SmolLM2 bfloat16 layout, .flash_bench/smollm2_bf16, prepared if missing)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", default=None, help="JSON path (markdown beside it)")
    args = p.parse_args()

    from applelm.flash.layout import read_layout
    from applelm.flash.loader import _predictors, _thresholds, flash_tokenizer
    from applelm.loader import load_model
    from applelm.perplexity import text_tokens

    if not GPL3.is_file():
        sys.exit(f"{GPL3} not found (Debian's base-files ships it)")
    if args.layout is None:  # the very layout flash_bench measures (prepared the same way, once)
        args.layout = str(flash_bench.smollm2_store(ROOT / ".flash_bench", "smollm2_bf16")[0])
    layout = read_layout(args.layout)
    model, _, _ = load_model(args.layout)  # no budget: every layer pinned as float32 (up, down^T, gate)
    gates = [block.mlp._pinned[2] for block in model.layers]
    act = model.layers[0].mlp._act
    ids = text_tokens(flash_tokenizer(layout), GPL3.read_text(), max_tokens=args.tokens)
    xs = record_inputs(model, ids)
    thr = _thresholds(layout, args.sparsity)
    preds, _ = _predictors(layout, mx.float32, args.sparsity)
    codec = layout.codec
    bundle = codec.bundle_bytes
    result = {"command": "python " + " ".join(["benchmarks/sparse_lookahead.py"] + sys.argv[1:]),
              "machine": flash_bench.machine("cpu"),
              "layout": os.path.relpath(args.layout, ROOT), "tokens": len(ids), "sparsity": args.sparsity,
              "bundle_bytes": bundle, "part_bytes": codec.part_bytes, "selectors": {}}
    n_layers = len(xs)
    layer_pages = -(-layout.intermediate * bundle // PAGE)
    # (selector, looser guess): the threshold times a factor, or the predictor's logit cut minus a margin.
    variants = [("threshold", 1.0), ("threshold", 0.75), ("threshold", 0.5), ("predictor", 0.0), ("predictor", 1.0)]
    for mode, loosen in variants:
        n_bytes = 2 * codec.part_bytes if mode == "threshold" else bundle  # what each selector's reads fetch
        rows = []
        for layer in range(n_layers - 1):
            nxt = layer + 1
            if mode == "threshold":
                need = np.abs(np.array(act(mx.array(xs[nxt]) @ gates[nxt].T))) > thr[nxt]
                guess = np.abs(np.array(act(mx.array(xs[layer]) @ gates[nxt].T))) > thr[nxt] * loosen
            else:
                a, b, bias, tau = preds[nxt]
                need = np.array((mx.array(xs[nxt]) @ a) @ b + bias) > tau
                guess = np.array((mx.array(xs[layer]) @ a) @ b + bias) > tau - loosen
            rows += [compare(guess[pos], need[pos], bundle, n_bytes) for pos in range(need.shape[0])]
        s = summarize(rows, layer_pages)
        label = f"threshold x{loosen}" if mode == "threshold" else f"predictor, logit cut -{loosen}"
        result["selectors"][label] = s
        print(label, s, file=sys.stderr, flush=True)
    machine_info.write_results(result, markdown(result), args.out, "sparse_lookahead")
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Sparse lookahead: layer L+1's selection guessed from layer L's FFN input ({m['cpu']}, {m['cores']} cores)",
             "", f"Command: `{result['command']}`  ", f"Commit {m['commit']}, MLX {m['mlx']}, {m['platform']}  ",
             f"Layout {result['layout']}, {result['tokens']} tokens of GPL-3 in one forward pass, sparsity "
             f"{result['sparsity']}, bundle {result['bundle_bytes']} B (threshold mode reads up+down: "
             f"{2 * result['part_bytes']} B)", "",
             "| guess | neuron recall | guessed / needed neurons | page recall | guessed / needed pages | "
             "needed pages / layer pages |", "|---|---:|---:|---:|---:|---:|"]
    for label, s in result["selectors"].items():
        lines.append(f"| {label} | {s['neuron_recall']} | {s['guess_over_needed']} | {s['page_recall']} | "
                     f"{s['pages_guess_over_needed']} | {s['pages_needed_share_of_layer']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
