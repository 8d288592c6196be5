"""What the disk's reads cost the rest of the machine: paged decoding with real reads against the same
decoding with its reads stubbed (each returns after sleeping as long as it would take at the speed this run
just measured for its own streamed units; flash_bench.stub_reads), beside the fully resident run.

If the stubbed run decodes near resident speed while the real one does not, the gap is the cost of the
reads themselves on this machine (on a VM: the host's work for each read, interrupts, steal), not the
paging machinery (the ring, its threads, the waits). SmolLM2 bfloat16 and 8-bit stores under flash_bench's
budget (half the smallest resident form), the GGUF-blocks store under 75% of its own resident size (as
flash_bench pages it; at the shared budget it fits whole); fresh processes, rounds interleaved; the prompt's
reads are real.
The stubbed runs' tokens are not the model's: their ring slots hold other layers' bytes.

    python benchmarks/read_cost.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import flash_bench  # benchmarks/flash_bench.py: the blocks store's budget fraction
import paired_runs  # benchmarks/paired_runs.py: the study's runs, summary and markdown

BASELINE = "paged"
STUBBED = "paged, reads stubbed"


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` (twice: real and stubbed reads)."""
    return {"resident": {}, BASELINE: {"memory_budget": budget}, STUBBED: {"memory_budget": budget}}


def main() -> int:
    return paired_runs.study(__doc__, __file__, ("bf16", "8bit", "blocks"), runs, BASELINE, markdown,
                             specs={STUBBED: {"stub_reads": True}}, own_budget={"blocks": flash_bench.BLOCKS_BUDGET_FRACTION},
                             store_options=paired_runs.NATIVE_STORE_OPTIONS)


def markdown(result: dict) -> str:
    own = ", ".join(f"{k} {v} bytes" for k, v in result.get("store_budget_bytes", {}).items())
    return paired_runs.markdown(result, "What reads cost the rest of the machine", BASELINE,
                                f"budget {result['budget_bytes']} bytes" + (f" ({own})" if own else ""))


if __name__ == "__main__":
    sys.exit(main())
