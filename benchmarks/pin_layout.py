"""Where pinned FFN layers sit among streamed ones: spread evenly against the last layers (the tail).

Under a budget the plan pins whole FFN layers and streams the rest through a ring of `depth` units. With the
pinned layers at the tail (the default), the ring fills within the first pinned layer's compute and then
idles for the rest of the run of them; spread evenly, each pinned layer's compute overlaps the reads of the
next streamed unit, so reads stay in flight through the token. The question is which decodes faster. This decodes the SmolLM2 bfloat16, 8-bit and GGUF-blocks
stores paged both ways (flash_bench's budget; the blocks store at 75% of its own size, as in read_cost), and
fully resident, each run a fresh process, interleaved over rounds. Reported per run: tok/s, MB read per token,
read GB/s while decoding and the I/O wait per token; in how many rounds `spread` beat `tail`.

    python benchmarks/pin_layout.py [--rounds 4] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import flash_bench  # benchmarks/flash_bench.py: the blocks store's budget fraction
import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "tail"


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` with each pin layout."""
    return {"resident": {}, "tail": {"memory_budget": budget, "pin_layout": "tail"},
            "spread": {"memory_budget": budget, "pin_layout": "spread"}}


def main() -> int:
    return paired_runs.study(__doc__, __file__, ("bf16", "8bit", "blocks"), runs, BASELINE, markdown,
                             store_options=paired_runs.NATIVE_STORE_OPTIONS,
                             own_budget={"blocks": flash_bench.BLOCKS_BUDGET_FRACTION})


def markdown(result: dict) -> str:
    return paired_runs.markdown(result, "Pinned layers spread among streamed ones, against the tail", BASELINE,
                                f"budget {result['budget_bytes']} bytes (blocks "
                                f"{result.get('store_budget_bytes', {}).get('blocks')} bytes)")


if __name__ == "__main__":
    sys.exit(main())
