"""SmolLM2's three flash stores paged under the same budget: which one decodes fastest.

The bfloat16 store (per-neuron bundles of the dequantized Q4_1 FFN), the 8-bit store (the same, re-quantized
to 8-bit affine) and the GGUF-blocks store (prepare --gguf-blocks: the file's own Q4_1 blocks, a third of
the bfloat16 bytes), each fully resident (the bundle stores through the native kernel, as flash_bench runs
them) and paged under flash_bench's budget (half the smallest resident form of the bfloat16 store). Fresh
processes, rounds interleaved; besides the per-store summary, in how many rounds each paged store beat the
others' paged runs.

    python benchmarks/store_compare.py [--rounds 5] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "resident"
STORES = ("bf16", "8bit", "blocks")


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget`."""
    return {BASELINE: {}, "paged": {"memory_budget": budget}}


def main() -> int:
    return paired_runs.study(__doc__, __file__, STORES, runs, BASELINE, markdown,
                             store_options=paired_runs.NATIVE_STORE_OPTIONS)


def markdown(result: dict) -> str:
    text = paired_runs.markdown(result, "SmolLM2's flash stores under the same budget", BASELINE,
                                f"budget {result['budget_bytes']} bytes")
    rounds = result["rounds"]
    lines = ["", "Paged against paged (rounds in which the row's store decoded faster):", "",
             "| paged store | " + " | ".join(f"than {s}" for s in STORES) + " |", "|---|" + "---:|" * len(STORES)]
    for a in STORES:
        cells = []
        for b in STORES:
            wins = sum((r[f"{a} paged"].get("decode_tok_s_median") or 0) > (r[f"{b} paged"].get("decode_tok_s_median") or 0)
                       for r in rounds)
            cells.append("" if a == b else f"{wins}/{len(rounds)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return text + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
