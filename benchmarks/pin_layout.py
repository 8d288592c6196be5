"""Where pinned FFN layers sit among streamed ones: spread evenly against the last layers (the tail), and auto.

Under a budget the plan pins whole FFN layers and streams the rest through a ring of `depth` units. With the
pinned layers at the tail, the ring fills within the first pinned layer's compute and then idles
for the rest of the run of them; spread evenly, each pinned layer's compute overlaps the reads of the next
streamed unit, so reads stay in flight through the token. The question is which decodes faster. This decodes
the SmolLM2 bfloat16, 8-bit and GGUF-blocks stores paged both ways (flash_bench's budget; the blocks store at
75% of its own size, as in read_cost), and fully resident, each run a fresh process, interleaved over rounds.
Reported per run: tok/s, MB read per token, read GB/s while decoding and the I/O wait per token; in how many
rounds `spread` beat `tail`. The third paged run, `auto` (the default), measures at load which of the two
the model needs (flash/auto_layout.py); the table lists what it measured and chose in every round.

With --synthetic, the same three paged runs on flash_bench's synthetic model instead (2.5 GB, 1 GB budget,
8 tokens a run; the model whose reads are the limit; prepared by `flash_bench.py --models synthetic`).

    python benchmarks/pin_layout.py [--rounds 4] [--tokens 24] [--synthetic] [--out FILE.json]
"""

from __future__ import annotations

import sys

import flash_bench  # benchmarks/flash_bench.py: the blocks store's budget fraction
import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "tail"


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` with each pin layout."""
    return {"resident": {}, "tail": {"memory_budget": budget, "pin_layout": "tail"},
            "spread": {"memory_budget": budget, "pin_layout": "spread"},
            "auto": {"memory_budget": budget, "pin_layout": "auto"}}


def synthetic_main() -> int:
    """The tail, spread and auto layouts on flash_bench's synthetic layout under its 1 GB budget."""
    args, work = flash_bench.round_args(__doc__, flags=("--synthetic",))
    shape = [int(v) for v in flash_bench.SYNTHETIC_SHAPE.split(",")]
    layout = work / flash_bench.synthetic_layout_name(*shape)
    from applelm.flash.budget import parse_size
    from applelm.flash.layout import INDEX_FILE

    if not (layout / INDEX_FILE).exists():
        raise SystemExit(f"{layout}: not prepared; run benchmarks/flash_bench.py --models synthetic first")

    budget = parse_size(flash_bench.SYNTHETIC_BUDGET)
    prompt = flash_bench.synthetic_prompt(flash_bench.synthetic_config(*shape)["vocab_size"])[1]
    args.tokens = min(args.tokens, 8)
    result = paired_runs.run_rounds(__file__, args, {"synthetic": layout},
                                    {k: v for k, v in runs(budget).items() if k != "resident"}, prompt,
                                    {"budget_bytes": budget})
    result["summary"] = paired_runs.summarize(result["rounds"], args.tokens, BASELINE)
    paired_runs.write(result, args.out, markdown(result))
    return 0


def main() -> int:
    if "--synthetic" in sys.argv[1:]:
        return synthetic_main()
    return paired_runs.study(__doc__, __file__, ("bf16", "8bit", "blocks"), runs, BASELINE, markdown,
                             store_options=paired_runs.NATIVE_STORE_OPTIONS,
                             own_budget={"blocks": flash_bench.BLOCKS_BUDGET_FRACTION})


def markdown(result: dict) -> str:
    blocks = result.get("store_budget_bytes", {}).get("blocks")
    return paired_runs.markdown(result, "Pinned layers spread among streamed ones, against the tail", BASELINE,
                                f"budget {result['budget_bytes']} bytes"
                                + (f" (blocks {blocks} bytes)" if blocks else ""))


if __name__ == "__main__":
    sys.exit(main())
