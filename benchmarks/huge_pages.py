"""Direct reads into 4 KiB pages against reads into transparent huge pages, and what that does to paging.

The flash runtime reads with O_DIRECT into its own buffers (flash/io.py AlignedBuffer). The block layer
cuts a direct read at max_segments pages (254 on this VM's virtio disk: ~1 MiB of 4 KiB pages); in 2 MiB
huge pages the same read goes out as requests of up to max_sectors_kb. Interleaved over rounds, on one
machine, in one run:
  - reads: GB/s and CPU seconds per GB read (this process, reader threads included) of the disk probe
    file (sequential 4 MiB, one and four in flight) and of flash layouts' own units (flash_bench's reader
    settings), into 4 KiB-page buffers and into huge-page buffers;
  - decode: tok/s of naive and paged SmolLM2 (bfloat16 and 8-bit stores, flash_bench's budget) with
    APPLELM_HUGE_PAGES=off against the default (on), each a fresh process.

    python benchmarks/huge_pages.py [--rounds 3] [--tokens 24] [--out FILE.json]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import flash_bench  # benchmarks/flash_bench.py: layouts, unit reads, the per-run process
import machine_info  # benchmarks/machine_info.py

KINDS = {"4KiB pages": False, "huge pages": True}


def queue_limits(path: Path) -> dict:
    """The block queue limits of the disk holding `path` (Linux sysfs), where readable."""
    try:
        dev = os.stat(path).st_dev
        sys_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = sys_dir / "queue" if (sys_dir / "queue").exists() else sys_dir / ".." / "queue"
        return {k: (queue / k).read_text().strip() for k in ("max_segments", "max_segment_size", "max_sectors_kb",
                                                            "logical_block_size") if (queue / k).exists()}
    except OSError:
        return {}


def timed_read(fn) -> tuple[float, float]:
    """(GB/s, CPU s per GB) of fn(), which returns bytes/s and runs for a known time."""
    c0, w0 = time.process_time(), time.perf_counter()
    speed = fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return round(speed / 1e9, 3), round(cpu / (speed * wall / 1e9), 4)


def read_rows(probe: Path, layouts: dict) -> dict:
    from applelm.flash.io import measure_disk
    from applelm.flash.layout import read_layout

    size = probe.stat().st_size
    units_of = {name: flash_bench.layout_units(read_layout(folder)) for name, folder in layouts.items()}
    out = {}
    for kind, huge in KINDS.items():
        out[f"probe seq 4MiB x1, {kind}"] = timed_read(lambda: measure_disk(
            str(probe), size, 4 << 20, seconds=1.5, threads=1, sequential=True, huge_pages=huge))
        out[f"probe seq 4MiB x4, {kind}"] = timed_read(lambda: measure_disk(
            str(probe), size, 4 << 20, seconds=1.5, threads=4, sequential=True, huge_pages=huge))
        for name, units in units_of.items():
            out[f"{name} units, {kind}"] = timed_read(lambda: flash_bench.read_units_speed(
                units, seconds=1.5, huge_pages=huge))
    return out


def main() -> int:
    args, work = flash_bench.round_args(__doc__)
    bf16, q8, budget = flash_bench.smollm2_stores(work)
    disk = flash_bench.disk_speeds(work)  # writes the probe file if missing
    from applelm.flash.loader import flash_tokenizer

    prompt = flash_tokenizer(bf16).encode(flash_bench.SMOL_PROMPT)
    decodes = [("naive-bf16", bf16, {"memory_budget": budget, "naive": True}),
               ("paged-bf16", bf16, {"memory_budget": budget}),
               ("paged-8bit", q8, {"memory_budget": budget})]
    result = {**flash_bench.study_header(__file__), "queue_limits": queue_limits(work / "disk_probe.bin"),
              "disk_start_default_buffers": disk, "rounds": []}
    for rnd in range(args.rounds):
        row = {"reads": read_rows(work / "disk_probe.bin", {"smollm2_bf16": bf16, "smollm2_q8": q8}), "decode": {}}
        for label, model, options in decodes:
            for kind, huge in KINDS.items():
                os.environ["APPLELM_HUGE_PAGES"] = "on" if huge else "off"  # the child process reads it
                r = flash_bench.spawn({"device": "cpu", "label": label, "model": str(model), "tokens": args.tokens,
                                       "prompt": prompt, "options": options})
                row["decode"][f"{label}, {kind}"] = {k: r.get(k) for k in ("decode_tok_s_median", "read_GBps",
                                                                            "bytes_per_token", "io_overlap",
                                                                            "cpu_during_decode", "error")}
        os.environ.pop("APPLELM_HUGE_PAGES", None)
        print(f"round {rnd + 1}: {json.dumps(row)}", file=sys.stderr, flush=True)
        result["rounds"].append(row)
    result["load_end"] = machine_info.load_avg()
    result["summary"] = summarize(result["rounds"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def summarize(rounds: list[dict]) -> dict:
    med = flash_bench.median
    reads = {k: {"GBps": med([r["reads"][k][0] for r in rounds]), "cpu_s_per_GB": med([r["reads"][k][1] for r in rounds])}
             for k in rounds[0]["reads"]}
    decode = {k: med([r["decode"][k]["decode_tok_s_median"] for r in rounds]) for k in rounds[0]["decode"]}
    return {"reads": reads, "decode_tok_s": decode}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    lines = [f"# Direct reads into 4 KiB pages vs huge pages ({m.get('cpu')}, {m.get('cores')} cores)", "",
             f"Command: `{result['command']}`  ", f"{result['date']}, commit {m.get('commit')}, MLX {m.get('mlx')}, "
             f"{m.get('platform')}; load average at start {result['load_start']}, end {result['load_end']}  ",
             f"Block queue limits of the disk: {result['queue_limits']}", "",
             f"Medians of {len(result['rounds'])} interleaved rounds.", "",
             "| reads | 4 KiB pages GB/s | huge pages GB/s | 4 KiB pages CPU s/GB | huge pages CPU s/GB |",
             "|---|---:|---:|---:|---:|"]
    names = [k.rsplit(", ", 1)[0] for k in s["reads"] if k.endswith("4KiB pages")]
    for n in names:
        a, b = s["reads"][f"{n}, 4KiB pages"], s["reads"][f"{n}, huge pages"]
        lines.append(f"| {n} | {a['GBps']} | {b['GBps']} | {a['cpu_s_per_GB']} | {b['cpu_s_per_GB']} |")
    lines += ["", "| decode (fresh process each) | APPLELM_HUGE_PAGES=off tok/s | default (huge pages) tok/s |",
              "|---|---:|---:|"]
    for n in dict.fromkeys(k.rsplit(", ", 1)[0] for k in s["decode_tok_s"]):
        lines.append(f"| {n} | {s['decode_tok_s'][f'{n}, 4KiB pages']} | {s['decode_tok_s'][f'{n}, huge pages']} |")
    lines += ["", "Every round:", ""]
    for i, r in enumerate(result["rounds"]):
        reads = "; ".join(f"{k} {v[0]} GB/s" for k, v in r["reads"].items())
        dec = "; ".join(f"{k} {v['decode_tok_s_median']} tok/s (read {v['read_GBps'] and round(v['read_GBps'], 2)} "
                        f"GB/s)" for k, v in r["decode"].items())
        lines.append(f"- round {i + 1}: reads: {reads}; decode: {dec}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
