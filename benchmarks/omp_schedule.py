"""OpenMP loop schedule of the C kernels: static shares against dynamic chunks, in decode speed.

The CPU kernels (ops/gguf_cpu.c for GGUF blocks, applelm/flash/native_ffn.c for flash bundles) cut their
work into fixed chunks (32 rows; 64 neurons, each with its own accumulator, summed in chunk order) and hand
them to threads by OpenMP's runtime schedule. Static gives each thread one contiguous share, as the
kernels did before; dynamic hands out one chunk at a time, so a thread that loses its core for a while
(MLX's own thread, a reader, the hypervisor) leaves its chunks to the others. Both give the same results.
Each run is a fresh process (flash_bench's runner) started with OMP_SCHEDULE set; runs interleave over rounds:
  - smollm2-gguf:    the embedded SmolLM2 GGUF as `make run` loads it (every matmul through gguf_cpu.c)
  - 8bit-resident / 8bit-paged: its 8-bit flash store fully resident, and paged under flash_bench's budget
  - blocks-resident / blocks-paged: its GGUF-blocks store fully resident, and paged at 75% of its size

    python benchmarks/omp_schedule.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import flash_bench  # benchmarks/flash_bench.py: the per-run process and the machine description
import omp_wait  # benchmarks/omp_wait.py: the environment A/B study
import paired_runs  # benchmarks/paired_runs.py: the stores and their budgets

SETTINGS = {"static": "static", "dynamic": "dynamic,1"}


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    chosen, budget, budgets, prompt = paired_runs.smollm2_setup(work, ("8bit", "blocks"),
                                                                {"blocks": flash_bench.BLOCKS_BUDGET_FRACTION})
    from applelm.loader import default_model_path

    q8, blocks = str(chosen["8bit"]), str(chosen["blocks"])
    plan = [("smollm2-gguf", str(default_model_path()), {}), ("8bit-resident", q8, {"native": True}),
            ("8bit-paged", q8, {"native": True, "memory_budget": budget}), ("blocks-resident", blocks, {}),
            ("blocks-paged", blocks, {"memory_budget": budgets["blocks"]})]
    return omp_wait.env_study(args, __file__, "OMP_SCHEDULE", SETTINGS, plan, prompt,
                              "OpenMP loop schedule of the C kernels and decode speed",
                              {"static": "static", "dynamic": "dynamic, 1 chunk"})


if __name__ == "__main__":
    sys.exit(main())
