"""OpenMP wait policy: decode speed with OpenMP workers that spin after each call against ones that sleep.

applelm sets OMP_WAIT_POLICY=PASSIVE when imported (unless already set): the preloaded BLAS (MKL's GNU
threading layer) and the C kernels run on libgomp, whose idle workers otherwise spin for a while after each
parallel call, on a core that MLX's own CPU thread or the direct reads need next. Each run is a fresh process
(flash_bench's runner) with the policy set before anything loads; runs are interleaved over rounds:
  - smollm2-gguf:   the embedded SmolLM2 GGUF loaded as `make run` loads it (packed blocks, C kernel)
  - flash-resident: its flash layout (bfloat16 bundles) fully resident through the native kernel
  - paged-bf16 / paged-8bit: the same layouts paged under flash_bench's budget (half the resident form)

    python benchmarks/omp_wait.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import flash_bench  # benchmarks/flash_bench.py: layouts, the per-run process and the machine description
import machine_info  # benchmarks/machine_info.py

SETTINGS = {"active": "ACTIVE", "passive": "PASSIVE"}
TITLE = "OpenMP wait policy and decode speed"
COLUMNS = {"active": "ACTIVE (spin)", "passive": "PASSIVE (sleep)"}


def runs(work: Path) -> list[tuple[str, str, dict]]:
    """(label, model path, load options) of every run; prepares the flash layouts if missing."""
    bf16, q8, budget = flash_bench.smollm2_stores(work)
    from applelm.loader import default_model_path

    return [("smollm2-gguf", str(default_model_path()), {}), ("flash-resident", str(bf16), {"native": True}),
            ("paged-bf16", str(bf16), {"memory_budget": budget}), ("paged-8bit", str(q8), {"memory_budget": budget})]


def env_study(args, script: str, var: str, settings: dict[str, str], plan: list[tuple[str, str, dict]],
              prompt: list[int], title: str, columns: dict[str, str]) -> int:
    """A study's body (args: flash_bench.round_args's): every run of `plan` ((label, model path, load options)) once under each of
    `settings` ({name: value of the environment variable `var`}, the first the baseline), fresh processes,
    interleaved over rounds; the summary gives medians per setting, the last setting over the first, and
    in how many rounds the last was faster. `columns` {name: column header} and `title` label the table."""
    base, last = list(settings)[0], list(settings)[-1]
    result = {**flash_bench.study_header(script), "rounds": []}
    for rnd in range(args.rounds):
        rows = {}
        for label, model, options in plan:
            for name, value in settings.items():
                os.environ[var] = value  # the child process starts with it
                r = flash_bench.spawn({"device": "cpu", "label": label, "model": model, "tokens": args.tokens,
                                       "prompt": prompt, "options": options})
                rows[f"{label} {value}"] = {k: r.get(k) for k in ("decode_tok_s_median", "cpu_during_decode",
                                                                  "read_GBps", "bytes_per_token", "error")}
                print(f"[round {rnd + 1}] {label} {value}: {r.get('decode_tok_s_median', r.get('error'))} tok/s, "
                      f"cpu {r.get('cpu_during_decode')}", file=sys.stderr, flush=True)
        result["rounds"].append(rows)
    result["load_end"] = machine_info.load_avg()
    summary = {}
    for label, _, _ in plan:
        med = {name: flash_bench.median([r[f"{label} {value}"]["decode_tok_s_median"] for r in result["rounds"]])
               for name, value in settings.items()}
        wins = sum((r[f"{label} {settings[last]}"]["decode_tok_s_median"] or 0) >
                   (r[f"{label} {settings[base]}"]["decode_tok_s_median"] or 0) for r in result["rounds"])
        summary[label] = {**{f"{name}_tok_s": med[name] for name in settings},
                          f"{last}_over_{base}": round(med[last] / med[base], 2) if med[base] else None,
                          f"rounds_{last}_faster": wins}
    result["summary"] = summary
    text = markdown(result, title, columns)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(text)
    print(text)
    return 0


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    plan = runs(work)
    from applelm.flash.loader import flash_tokenizer

    prompt = flash_tokenizer(plan[1][1]).encode(flash_bench.SMOL_PROMPT)
    return env_study(args, __file__, "OMP_WAIT_POLICY", SETTINGS, plan, prompt, TITLE, COLUMNS)


def markdown(result: dict, title: str = TITLE, columns: dict[str, str] = COLUMNS) -> str:
    base, last = list(columns)[0], list(columns)[-1]
    m = result["machine"]
    lines = [f"# {title} ({m.get('cpu', 'cpu')})", "",
             f"Command: `{result['command']}`  ", f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, "
             f"load average at start {result['load_start']}, end {result['load_end']}", "",
             "| run | " + " | ".join(f"{h} tok/s" for h in columns.values()) + f" | {last} / {base} | rounds {last} faster |",
             "|---|" + "---:|" * (len(columns) + 2)]
    for label, s in result["summary"].items():
        lines.append(f"| {label} | " + " | ".join(str(s[f"{name}_tok_s"]) for name in columns) +
                     f" | {s[f'{last}_over_{base}']} | {s[f'rounds_{last}_faster']}/{len(result['rounds'])} |")
    lines += ["", "Every round (tok/s; CPU busy / steal shares of the machine while decoding):", ""]
    for i, rows in enumerate(result["rounds"]):
        cells = [f"{k}: {v['decode_tok_s_median']} ({(v['cpu_during_decode'] or {}).get('busy')} / "
                 f"{(v['cpu_during_decode'] or {}).get('steal')})" for k, v in rows.items()]
        lines.append(f"- round {i + 1}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
