"""Prefetch ring depth against pinned layers: the evidence behind budget.ring_depths and MIN_READ_AHEAD.

Under a budget, ring slots and pinned FFN layers share the same bytes: a ring one unit shallower can pin
one more layer when a unit is a whole layer (SmolLM2), which removes that layer's reads from every token,
but it also queues fewer reads. For the SmolLM2 bfloat16 and 8-bit stores under flash_bench's budget
(half the smallest resident form) this decodes with rings of 4, 3 and 2 units, and the plan's own choice
(`auto`), beside the fully resident run; each run a fresh process (flash_bench's runner), interleaved
over rounds. Reported per run: tok/s, layers pinned, MB read per token, read GB/s while decoding (bytes over
the time reads were in flight) and the I/O wait per token.

    python benchmarks/ring_depth.py [--rounds 4] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import flash_bench  # benchmarks/flash_bench.py: layouts, the per-run process and the machine description
import machine_info  # benchmarks/machine_info.py

KEEP = ("decode_tok_s_median", "plan", "bytes_per_token", "read_GBps", "io_wait_s", "cpu_during_decode", "error")


def runs(budget: int) -> dict[str, dict]:
    """Load options of every run: fully resident, then paged under `budget` with each ring depth and without
    one (the plan's choice)."""
    paged = {"memory_budget": budget}
    return {"resident": {"native": True}, **{f"ring {d}": {**paged, "ring_depth": d} for d in (4, 3, 2)},
            "auto": paged}


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    bf16, q8, budget = flash_bench.smollm2_stores(work)
    from applelm.flash.loader import flash_tokenizer

    prompt = flash_tokenizer(bf16).encode(flash_bench.SMOL_PROMPT)
    result = {"command": "python " + " ".join([os.path.relpath(__file__, flash_bench.ROOT)] + sys.argv[1:]),
              "machine": flash_bench.machine("cpu"), "load_start": machine_info.load_avg(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "budget_bytes": budget, "tokens": args.tokens, "rounds": []}
    for rnd in range(args.rounds):
        rows = {}
        for store, model in (("bf16", bf16), ("8bit", q8)):
            for label, options in runs(budget).items():
                r = flash_bench.spawn({"device": "cpu", "label": label, "model": str(model), "tokens": args.tokens,
                                       "prompt": prompt, "options": options})
                rows[f"{store} {label}"] = {k: r.get(k) for k in KEEP}
                print(f"[round {rnd + 1}] {store} {label}: {r.get('decode_tok_s_median', r.get('error'))} tok/s, "
                      f"{(r.get('bytes_per_token') or 0) / 1e6:.1f} MB/token", file=sys.stderr, flush=True)
        result["rounds"].append(rows)
    result["load_end"] = machine_info.load_avg()
    result["summary"] = summarize(result["rounds"], args.tokens)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def summarize(rounds: list[dict], tokens: int) -> dict:
    """Per run: medians over rounds, and in how many rounds it beat the ring of 4 of its store."""
    out = {}
    for key, first in rounds[0].items():
        rows = [r[key] for r in rounds]
        store = key.split()[0]

        def med(field, scale, digits):
            m = flash_bench.median([x.get(field) for x in rows])
            return None if m is None else round(m * scale, digits)

        beat = sum((r[key].get("decode_tok_s_median") or 0) > (r[f"{store} ring 4"].get("decode_tok_s_median") or 0)
                   for r in rounds)
        out[key] = {"tok_s": flash_bench.median([x.get("decode_tok_s_median") for x in rows]),
                    "plan": first.get("plan") or first.get("error"),
                    "MB_per_token": med("bytes_per_token", 1e-6, 1), "read_GBps": med("read_GBps", 1, 2),
                    "io_wait_ms_per_token": med("io_wait_s", 1000 / tokens, 2), "rounds_faster_than_ring_4": beat}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Prefetch ring depth against pinned layers ({m.get('cpu', 'cpu')})", "",
             f"Command: `{result['command']}`  ",
             f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, budget {result['budget_bytes']} bytes, "
             f"{result['tokens']} tokens a run, load average at start {result['load_start']}, end {result['load_end']}",
             "", "| run | plan | tok/s (median) | faster than ring 4 (rounds) | MB read/token | read GB/s | "
                 "I/O wait ms/token |", "|---|---|---:|---:|---:|---:|---:|"]
    n = len(result["rounds"])
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {s['plan']} | {s['tok_s']} | {s['rounds_faster_than_ring_4']}/{n} | "
                     f"{s['MB_per_token']} | {s['read_GBps']} | {s['io_wait_ms_per_token']} |")
    lines += ["", "tok/s of every round:", ""]
    for key in result["summary"]:
        lines.append(f"- {key}: {[r[key].get('decode_tok_s_median') for r in result['rounds']]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
