"""Bounded sparse lookahead on the native kernel's path: what it reads, what it covers, what it costs.

Lookahead guesses the next layer's neurons from this layer's FFN input and reads the uncached guesses
with the highest scores, at most as many as that layer missed on the last token (paged_mlp). Three runs
per model, interleaved in fresh processes (flash_bench's runner): lookahead off; bounded lookahead (the
default when it is on); and guesses only (`ahead_limit` 0: the same guessing, nothing read ahead), which
separates what guessing costs from what the extra reads cost. Two models, each with its predictor:

  - relu: flash_bench's sparse ReLU model (2.5 GB, 1 GB budget, sparsity just below its natural one),
    whose neuron cache holds most of what a token needs, so its misses are few;
  - smollm2: the SmolLM2 bfloat16 store at sparsity 0.5 under flash_bench's budget, which misses most of
    each layer.

    python benchmarks/lookahead_bound.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import sys

import flash_bench
import machine_info
import paired_runs

RUNS = ("off", "bounded", "guesses only")
KEYS = ("decode_tok_s_median", "bytes_per_token", "reads_per_token", "io_wait_s", "ahead_read_per_token",
        "ahead_used_share", "neurons_read_per_token")


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    import applelm  # noqa: F401  (BLAS preload before mlx)
    from applelm.flash.budget import parse_size
    from applelm.flash.layout import read_layout

    smol, smol_budget, _, smol_prompt = paired_runs.smollm2_setup(work, ("bf16",))
    relu, _, relu_ids = flash_bench.relu_store(work)
    models = {"relu": (relu, parse_size(flash_bench.SYNTHETIC_BUDGET), flash_bench.relu_level(read_layout(relu)),
                       relu_ids[:16]),
              "smollm2": (smol["bf16"], smol_budget, 0.5, smol_prompt)}
    result = {**flash_bench.study_header(__file__), "tokens": args.tokens,
              "models": {k: {"budget_bytes": b, "sparsity": s} for k, (_, b, s, _) in models.items()}, "rounds": []}
    for rnd in range(args.rounds):
        rows = {}
        for name, (model, budget, level, prompt) in models.items():
            options = {"memory_budget": budget, "sparsity": level, "sparsity_mode": "predictor", "native": True}
            for run in RUNS:
                spec = {"device": "cpu", "label": run, "model": str(model), "tokens": args.tokens, "prompt": prompt,
                        "options": {**options, "lookahead": run != "off"},
                        **({"ahead_limit": 0} if run == "guesses only" else {})}
                r = flash_bench.spawn(spec)
                rows[f"{name} {run}"] = {k: r.get(k) for k in KEYS + ("plan", "error", "tokens")}
                print(f"[round {rnd + 1}] {name} {run}: {r.get('decode_tok_s_median', r.get('error'))} tok/s",
                      file=sys.stderr, flush=True)
        result["rounds"].append(rows)
    result["load_end"] = machine_info.load_avg()
    result["summary"] = summarize(result["rounds"], args.tokens)
    paired_runs.write(result, args.out, markdown(result))
    return 0


def summarize(rounds: list[dict], tokens: int) -> dict:
    """Per row: medians over rounds, rounds faster than the same model with lookahead off, and whether its
    greedy tokens equal the off run's in every round."""
    out = {}
    for key in rounds[0]:
        name = key.split(" ", 1)[0]
        rows = [r[key] for r in rounds]

        def med(field, scale=1.0, digits=3):
            m = flash_bench.median([x.get(field) for x in rows])
            return None if m is None else round(m * scale, digits)

        off = f"{name} off"
        out[key] = {"tok_s": med("decode_tok_s_median"), "plan": rows[0].get("plan") or rows[0].get("error"),
                    "MB_per_token": med("bytes_per_token", 1e-6, 1), "reads_per_token": med("reads_per_token", 1, 1),
                    "io_wait_ms_per_token": med("io_wait_s", 1000 / tokens, 2),
                    "ahead_read_per_token": med("ahead_read_per_token", 1, 1),
                    "ahead_used_share": med("ahead_used_share"),
                    "neurons_read_per_token": med("neurons_read_per_token", 1, 1),
                    "rounds_faster_than_off": sum((r[key].get("decode_tok_s_median") or 0)
                                                  > (r[off].get("decode_tok_s_median") or 0) for r in rounds),
                    "tokens_equal_off": all(r[key].get("tokens") and r[key].get("tokens") == r[off].get("tokens")
                                            for r in rounds)}
    return out


def markdown(result: dict) -> str:
    m, n = result["machine"], len(result["rounds"])
    setting = ", ".join(f"{k}: sparsity {v['sparsity']}, budget {v['budget_bytes']} bytes"
                        for k, v in result["models"].items())
    lines = [f"# Bounded sparse lookahead, native kernel path ({m.get('cpu', 'cpu')})", "",
             f"Command: `{result['command']}`  ",
             f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, predictor selection ({setting}), "
             f"{result['tokens']} tokens a run, load average at start {result['load_start']}, end {result['load_end']}",
             "", "| run | plan | tok/s (median) | faster than off (rounds) | MB read/token | read requests/token "
                 "| I/O wait ms/token | neurons read ahead/token | share of them used | misses/token "
                 "| tokens equal off |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, s in result["summary"].items():
        lines.append(f"| {key} | {s['plan']} | {s['tok_s']} | {s['rounds_faster_than_off']}/{n} | "
                     f"{s['MB_per_token']} | {s['reads_per_token']} | {s['io_wait_ms_per_token']} | "
                     f"{s['ahead_read_per_token']} | {s['ahead_used_share']} | {s['neurons_read_per_token']} | "
                     f"{s['tokens_equal_off']} |")
    lines += ["", "tok/s of every round:", ""]
    lines += [f"- {key}: {[r[key].get('decode_tok_s_median') for r in result['rounds']]}" for key in result["summary"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
