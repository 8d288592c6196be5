"""Paged against fully resident decoding, interleaved in one process: the goal check without the VM's drift.

flash_bench measures each run in its own process, one after another. On this shared VM the speed of the
same run drifts by tens of percent over minutes (fully resident SmolLM2 alone: 15.8-23.6 tok/s across
rounds of one study), so a ratio of two such runs carries that drift. Here, per store, one process holds
the fully resident model, the paged model and a second fully resident copy (the control), and decodes
`--chunk` tokens from each in turn, `--cycles` times, rotating which goes first. Each chunk is timed between
two `mx.synchronize()` calls, so every chunk holds exactly its own tokens' work, and runs under its own
model's cap on MLX's buffer pool (a budget sets one, process-wide). Per cycle:
paged / resident, and control / resident (the method's own spread and bias: it should sit around 1.0).

Goal per cycle (flash_bench's): paged >= 80% of min(resident, I/O bound), the I/O bound being the direct-read
speed of the paged run's own streamed units (measured before and after the cycles, mean) / its bytes per
token. Stores as read_cost pages them: bfloat16 and 8-bit at flash_bench's budget (half the smallest fully
resident form), GGUF blocks at 75% of its own resident size. Greedy tokens: paged must equal resident.

    python benchmarks/interleaved_decode.py [--cycles 30] [--chunk 8] [--stores bf16,8bit,blocks] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import flash_bench  # benchmarks/flash_bench.py: layouts, read speeds, machine description
import machine_info  # benchmarks/machine_info.py
import paired_runs  # benchmarks/paired_runs.py: the stores and their budgets, as the focused studies use them

MODELS = ("resident", "paged", "control")
GOAL = 0.8


def decode_in_turn(steps: dict, tokens: dict, cycles: int, chunk: int, before=None, after=None) -> dict:
    """Decode `chunk` tokens from each generate_step generator of `steps` in turn, `cycles` times, rotating
    which goes first, appending them to tokens[name]. Each chunk is timed between two `mx.synchronize()`
    calls; before(name) and after(name) run just outside that span. Returns every chunk's tok/s per name."""
    import mlx.core as mx

    names = list(steps)
    chunks = {name: [] for name in names}
    for cycle in range(cycles):
        shift = cycle % len(names)
        for name in names[shift:] + names[:shift]:
            mx.synchronize()
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            tokens[name] += [int(next(steps[name])[0]) for _ in range(chunk)]
            mx.synchronize()
            chunks[name].append(chunk / (time.perf_counter() - t0))
            if after is not None:
                after(name)
    return chunks


def child(spec: dict) -> dict:
    """One store: load the three models, decode them interleaved, return every chunk's tok/s and the paging
    report (JSON-ready)."""
    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx

    from applelm.generation import generate_step
    from applelm.loader import load_model

    opts = spec["options"]
    models = {name: load_model(spec["model"], **opts)[0] for name in MODELS if name != "paged"}
    # A budget caps MLX's pool of freed buffers process-wide: each model decodes under its own setting.
    unbudgeted = mx.set_cache_limit(0)  # returns the limit it replaces
    mx.set_cache_limit(unbudgeted)
    models["paged"] = load_model(spec["model"], **opts, memory_budget=spec["budget"])[0]
    limits = {name: unbudgeted for name in models}
    limits["paged"] = mx.set_cache_limit(unbudgeted)
    paged = models["paged"].flash
    prompt = mx.array(spec["prompt"], dtype=mx.int32)
    steps = {name: generate_step(prompt, m, max_tokens=1 << 20) for name, m in models.items()}
    tokens = {name: [next(g)[0] for _ in range(2)] for name, g in steps.items()}  # prompt and first steps
    read_before = flash_bench.layout_read_speed(paged) / 1e9
    paged.reset_stats()
    chunks = decode_in_turn({name: steps[name] for name in MODELS}, tokens, spec["cycles"], spec["chunk"],
                            before=lambda name: mx.set_cache_limit(limits[name]))
    report = paged.report()
    read_after = flash_bench.layout_read_speed(paged) / 1e9
    out = {"plan": paged.plan.describe(), "chunk_tok_s": {k: [round(v, 3) for v in c] for k, c in chunks.items()},
           "bytes_per_token": report["bytes_per_token"], "read_GBps": round(report["read_GBps"], 3),
           "io_overlap": round(report["io_overlap"], 3),
           "layout_read_GBps": [round(read_before, 3), round(read_after, 3)],
           "paged_tokens_equal_resident": tokens["paged"] == tokens["resident"],
           "control_tokens_equal_resident": tokens["control"] == tokens["resident"]}
    for m in models.values():
        m.flash.close()
    return out


def summarize(r: dict) -> dict:
    """Per-cycle ratios and the goal check of one store's child result."""
    c = r["chunk_tok_s"]
    gbps = sum(r["layout_read_GBps"]) / 2
    bound = gbps * 1e9 / r["bytes_per_token"] if r["bytes_per_token"] else None
    ratio = [p / q for p, q in zip(c["paged"], c["resident"])]
    control = [a / b for a, b in zip(c["control"], c["resident"])]
    met = [p >= GOAL * min(q, bound or q) for p, q in zip(c["paged"], c["resident"])]
    med = flash_bench.median
    return {"resident_tok_s": round(med(c["resident"]), 3), "paged_tok_s": round(med(c["paged"]), 3),
            "control_tok_s": round(med(c["control"]), 3), "io_bound_tok_s": None if bound is None else round(bound, 2),
            "paged_over_resident_median": round(med(ratio), 3),
            "paged_over_resident_range": [round(min(ratio), 3), round(max(ratio), 3)],
            "control_over_resident_median": round(med(control), 3),
            "control_over_resident_range": [round(min(control), 3), round(max(control), 3)],
            # The same check on the control, a copy of resident: how often the drift alone fails a cycle.
            "control_cycles_below_goal": sum(x < GOAL for x in control), "cycles_met": sum(met), "cycles": len(met)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Paged against resident, interleaved in one process (" + m.get("cpu", "cpu") + ")", "",
             f"Command: `{result['command']}`  ",
             f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, budget {result['budget_bytes']} bytes "
             f"(blocks {result['store_budget_bytes'].get('blocks')} bytes), {result['cycles']} cycles of "
             f"{result['chunk']} tokens per model, load average at start {result['load_start']}, "
             f"end {result['load_end']}",
             "", "| store | paged plan | resident tok/s | paged tok/s | control tok/s | I/O bound tok/s | "
                 "paged / resident (median, range) | control / resident (median, range) | goal met (cycles) | "
                 "control below 80% (cycles) | MB read/token | read GB/s | I/O hidden | tokens equal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for store, r in result["stores"].items():
        if "error" in r:
            lines.append(f"| {store} | error: {r['error']} |" + " |" * 12)
            continue
        s = r["summary"]
        lines.append(f"| {store} | {r['plan']} | {s['resident_tok_s']} | {s['paged_tok_s']} | {s['control_tok_s']} | "
                     f"{s['io_bound_tok_s']} | {s['paged_over_resident_median']} {s['paged_over_resident_range']} | "
                     f"{s['control_over_resident_median']} {s['control_over_resident_range']} | "
                     f"{s['cycles_met']}/{s['cycles']} | "
                     f"{s['control_cycles_below_goal']}/{s['cycles']} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['read_GBps']} | {r['io_overlap']:.0%} | "
                     f"{r['paged_tokens_equal_resident']} |")
    lines += ["", "Goal per cycle: paged >= 80% of min(resident, I/O bound) of the same cycle.", "",
              "tok/s of every chunk:", ""]
    for store, r in result["stores"].items():
        for name, v in r.get("chunk_tok_s", {}).items():
            lines.append(f"- {store} {name}: {v}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=30)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--stores", default="bf16,8bit,blocks")
    p.add_argument("--work", default=str(flash_bench.ROOT / ".flash_bench"))
    p.add_argument("--out", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    stores = tuple(args.stores.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths, budget, budgets, prompt = paired_runs.smollm2_setup(
        work, stores, {"blocks": flash_bench.BLOCKS_BUDGET_FRACTION} if "blocks" in stores else None)
    result = {**flash_bench.study_header(__file__), "budget_bytes": budget, "store_budget_bytes": budgets,
              "cycles": args.cycles, "chunk": args.chunk, "stores": {}}
    for store, path in paths.items():
        spec = {"model": str(path), "options": paired_runs.NATIVE_STORE_OPTIONS.get(store, {}), "prompt": prompt,
                "budget": budgets.get(store, budget), "cycles": args.cycles, "chunk": args.chunk}
        r = flash_bench.run_child(__file__, "--child", spec)
        result["stores"][store] = r if "error" in r else {**r, "summary": summarize(r)}
        print(f"{store}: {result['stores'][store].get('summary', result['stores'][store].get('error'))}",
              file=sys.stderr, flush=True)
    result["load_end"] = machine_info.load_avg()
    paired_runs.write(result, args.out, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
