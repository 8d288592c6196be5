"""Interleaved A/B runs of load options on the SmolLM2 flash stores, for the focused studies (ring_depth,
lookahead_mlx, read_cost): every round runs each (store, options) row once in a fresh process (flash_bench's runner),
so the VM's drift over minutes spreads over all rows alike; the summary gives medians over rounds and in
how many rounds each row beat its store's baseline row."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import flash_bench  # benchmarks/flash_bench.py: layouts, the per-run process and the machine description
import machine_info  # benchmarks/machine_info.py

# Per-store options under which each store's runs load as flash_bench runs them: the per-neuron stores through
# the native kernel (also fully resident, where it is otherwise off); the GGUF-blocks store has no such kernel.
NATIVE_STORE_OPTIONS = {"bf16": {"native": True}, "8bit": {"native": True}}
KEEP = ("decode_tok_s_median", "plan", "bytes_per_token", "read_GBps", "io_wait_s", "cpu_during_decode",
        "neurons_read_per_token", "ahead_read_per_token", "ahead_used_share", "reads_stubbed_at_GBps", "layout_probe",
        "error")


def run_rounds(script: str, args, stores: dict[str, Path], runs: dict[str, dict], prompt: list[int],
               extra: dict, specs: dict[str, dict] | None = None,
               store_options: dict[str, dict] | None = None, store_budgets: dict[str, int] | None = None) -> dict:
    """Every store under every run's options, args.rounds times interleaved; the result (JSON-ready) holds
    each round's rows keyed "<store> <run>", the command, the machine and `extra`. specs[run]: more keys of
    that run's flash_bench spec (e.g. stub_reads); store_options[store]: options under all of its runs;
    store_budgets[store]: the memory budget of that store's runs that have one (instead of theirs)."""
    result = {**flash_bench.study_header(script), **extra, "tokens": args.tokens, "rounds": []}
    for rnd in range(args.rounds):
        rows = {}
        for store, model in stores.items():
            for label, options in runs.items():
                opts = {**(store_options or {}).get(store, {}), **options}
                if opts.get("memory_budget") and store in (store_budgets or {}):
                    opts["memory_budget"] = store_budgets[store]
                r = flash_bench.spawn({"device": "cpu", "label": label, "model": str(model), "tokens": args.tokens,
                                       "prompt": prompt, "options": opts, **(specs or {}).get(label, {})})
                rows[f"{store} {label}"] = {k: r.get(k) for k in KEEP}
                print(f"[round {rnd + 1}] {store} {label}: {r.get('decode_tok_s_median', r.get('error'))} tok/s, "
                      f"{(r.get('bytes_per_token') or 0) / 1e6:.1f} MB/token", file=sys.stderr, flush=True)
        result["rounds"].append(rows)
    result["load_end"] = machine_info.load_avg()
    return result


def faster_key(baseline: str) -> str:
    return "rounds_faster_than_" + baseline.replace(" ", "_")


def summarize(rounds: list[dict], tokens: int, baseline: str, pairs: dict[str, str] | None = None) -> dict:
    """Per row: medians over rounds, and in how many rounds it beat the `baseline` run of its store (or, for
    a run named in `pairs`, the run it names)."""
    out = {}
    for key, first in rounds[0].items():
        rows = [r[key] for r in rounds]
        store, label = key.split(" ", 1)
        versus = f"{store} {(pairs or {}).get(label, baseline)}"

        def med(field, scale, digits):
            m = flash_bench.median([x.get(field) for x in rows])
            return None if m is None else round(m * scale, digits)

        beat = sum((r[key].get("decode_tok_s_median") or 0) > (r[versus].get("decode_tok_s_median") or 0)
                   for r in rounds)
        out[key] = {"tok_s": flash_bench.median([x.get("decode_tok_s_median") for x in rows]),
                    "plan": first.get("plan") or first.get("error"),
                    "MB_per_token": med("bytes_per_token", 1e-6, 1), "read_GBps": med("read_GBps", 1, 2),
                    "io_wait_ms_per_token": med("io_wait_s", 1000 / tokens, 2), faster_key(baseline): beat}
        if label in (pairs or {}):
            out[key]["versus"] = pairs[label]
    return out


def markdown(result: dict, title: str, baseline: str, setting: str) -> str:
    """The summary table (`setting`: what the runs share, e.g. the budget) and every round's tok/s."""
    m = result["machine"]
    lines = [f"# {title} ({m.get('cpu', 'cpu')})", "", f"Command: `{result['command']}`  ",
             f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, {setting}, "
             f"{result['tokens']} tokens a run, load average at start {result['load_start']}, end {result['load_end']}",
             "", f"| run | plan | tok/s (median) | faster than {baseline} (rounds) | MB read/token | read GB/s | "
                 "I/O wait ms/token |", "|---|---|---:|---:|---:|---:|---:|"]
    n = len(result["rounds"])
    for key, s in result["summary"].items():
        versus = f" (than {s['versus']})" if "versus" in s else ""
        lines.append(f"| {key} | {s['plan']} | {s['tok_s']} | {s[faster_key(baseline)]}/{n}{versus} | "
                     f"{s['MB_per_token']} | {s['read_GBps']} | {s['io_wait_ms_per_token']} |")
    lines += ["", "tok/s of every round:", ""]
    for key in result["summary"]:
        lines.append(f"- {key}: {[r[key].get('decode_tok_s_median') for r in result['rounds']]}")
    probed = [key for key in result["summary"] if result["rounds"][0][key].get("layout_probe")]
    if probed:
        lines += ["", "`--pin-layout auto` at load, every round (share of a probe step spent waiting on reads, "
                      "median probe step per layout tried -> layout chosen):", ""]
        lines += [f"- {key}: " + ", ".join(flash_bench.probe_text(r[key].get("layout_probe")) for r in result["rounds"])
                  for key in probed]
    stubbed = [key for key in result["summary"] if result["rounds"][0][key].get("reads_stubbed_at_GBps")]
    if stubbed:
        lines += ["", "Stubbed reads slept as long as at these speeds (GB/s, every round):", ""]
        lines += [f"- {key}: {[r[key].get('reads_stubbed_at_GBps') for r in result['rounds']]}" for key in stubbed]
    return "\n".join(lines) + "\n"


def write(result: dict, out: str | None, text: str) -> None:
    """The JSON next to its markdown (when --out is given), and the markdown on stdout."""
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
        Path(out).with_suffix(".md").write_text(text)
    print(text)


def smollm2_setup(work: Path, stores: tuple[str, ...], own_budget: dict[str, float] | None = None):
    """The SmolLM2 `stores` ("bf16", "8bit", "blocks") under `work` (prepared if missing) as {name: folder},
    flash_bench's budget, {store: own_budget[store] x its own fully resident size}, and the prompt's ids."""
    bf16, q8, budget = flash_bench.smollm2_stores(work)
    from applelm.flash.loader import flash_tokenizer

    prompt = flash_tokenizer(bf16).encode(flash_bench.SMOL_PROMPT)
    paths = {"bf16": bf16, "8bit": q8}
    if "blocks" in stores:
        paths["blocks"] = flash_bench.smollm2_store(work, "smollm2_blocks")[0]
    chosen = {name: paths[name] for name in stores}
    budgets = {name: int(f * flash_bench.resident_size(chosen[name])[0]) for name, f in (own_budget or {}).items()}
    return chosen, budget, budgets, prompt


def study(doc: str, script: str, stores: tuple[str, ...], runs: Callable[[int], dict[str, dict]], baseline: str,
          markdown_of: Callable[[dict], str], pairs: dict[str, str] | None = None,
          specs: dict[str, dict] | None = None, store_options: dict[str, dict] | None = None,
          own_budget: dict[str, float] | None = None) -> int:
    """A whole study's main(): its options (flash_bench.round_args), the SmolLM2 `stores` ("bf16", "8bit",
    "blocks") under flash_bench's budget, every run of runs(budget) over args.rounds interleaved rounds, the
    summary against `baseline` (and `pairs`), written by markdown_of; `specs`, `store_options` as in run_rounds;
    own_budget[store]: that store's budgeted runs get this fraction of its own fully resident size instead."""
    args, work = flash_bench.round_args(doc)
    chosen, budget, budgets, prompt = smollm2_setup(work, stores, own_budget)
    extra = {"budget_bytes": budget, **({"store_budget_bytes": budgets} if budgets else {})}
    result = run_rounds(script, args, chosen, runs(budget), prompt, extra, specs, store_options, budgets)
    result["summary"] = summarize(result["rounds"], args.tokens, baseline, pairs)
    write(result, args.out, markdown_of(result))
    return 0
