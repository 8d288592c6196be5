"""Run in a fresh process: load a flash layout under a budget, generate, print memory figures as JSON.

    python flash_memory_probe.py FOLDER BUDGET_BYTES [extra load options as JSON [prompt length]]
"""

import json
import os
import resource
import sys

import applelm  # noqa: F401  (before mlx: BLAS preload)
import mlx.core as mx


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so imports do not count."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    from applelm.generation import generate_step
    from applelm.loader import load_model

    folder, budget = sys.argv[1], int(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    # Baseline: the runtime itself, warmed up (BLAS kernels loaded, MLX initialized, a thread pool started).
    a = mx.random.normal((256, 256))
    mx.eval(a @ a, mx.fast.rms_norm(a, None, 1e-5))
    base = rss()
    reset_peak_rss()
    mx.reset_peak_memory()
    model, _, _ = load_model(folder, memory_budget=budget, **extra)
    after_load = rss()
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 5  # over 16: prompts take the dequantizing matmuls
    prompt = ([1, 5, 9, 33, 2] * n)[:n]
    toks = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
    print(json.dumps({
        "base_rss": base, "after_load_rss": after_load, "final_rss": rss(),
        "peak_rss": peak_rss(),
        "mx_peak": mx.get_peak_memory(), "mx_cache": mx.get_cache_memory(), "plan_total": model.flash.plan.total_bytes,
        "plan": model.flash.plan.describe(), "tokens": toks, "report": model.flash.report(),
    }))


if __name__ == "__main__":
    main()
