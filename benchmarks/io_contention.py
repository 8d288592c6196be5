"""Do direct reads and compute compete on this machine? The flash goal's I/O bound assumes they do not.

The dense flash goal (benchmarks/flash_bench.py) takes the disk's speed measured with idle CPUs and
assumes reads can hide behind compute for free, as DMA from an SSD does on a Mac. On a virtual machine
the disk may be served by host threads that share the VM's CPU allowance; then reads slow compute down
and compute slows reads down. This script measures both directions, in the same run, in rounds:

  - read alone:        direct-I/O sequential 4 MiB reads of a 1 GiB probe file (another process)
  - read + CPU busy:   the same while `--workers` processes spin on float32 64x64 matmuls (one thread each)
  - CPU alone / + read: the workers' matmuls per second without and with the reader running
  - decode alone / + read: applelm decoding the embedded SmolLM2 (the flash benchmark's resident model
                       compute: GGUF dequantized to float32) without and with the reader running

    python benchmarks/io_contention.py [--rounds 3] [--work .flash_bench] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import machine_info  # benchmarks/machine_info.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The history of astronomy spans thousands of years. Ancient observers tracked"


def read_forever(path: str, streams: int, block: int) -> None:
    """Reader process: direct sequential `block`-byte reads of `path` until SIGTERM, then print GB/s."""
    sys.path.insert(0, str(ROOT))
    from applelm.flash.io import measure_disk

    size, done, t0, cpu0 = os.path.getsize(path), 0.0, time.perf_counter(), sum(os.times()[:2])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:  # 0.25 s slices: measure_disk returns bytes/s of its slice
        t = time.perf_counter()
        done += measure_disk(path, size, block, seconds=0.25, threads=streams, sequential=True) * \
            (time.perf_counter() - t)
    wall, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - cpu0  # user + system seconds while reading
    print(json.dumps({"GBps": done / wall / 1e9, "cpu_share": cpu / wall}), flush=True)


class Reader:
    """A reader process running for the duration of a `with` block; `.GBps` afterwards."""

    def __init__(self, path: str, streams: int, block: int = 4 << 20):
        self.path, self.streams, self.block, self.GBps, self.cpu_share = path, streams, block, None, None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--read", self.path, str(self.streams),
                                      str(self.block)],
                                     stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # let the reads reach their pace before the measured work starts
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        report = json.loads(out.strip().splitlines()[-1])
        self.GBps, self.cpu_share = report["GBps"], report["cpu_share"]


def _spin(seconds: float, queue) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # one thread per worker (set before numpy loads its BLAS)
    import numpy as np

    a, n, t0 = np.random.rand(64, 64).astype(np.float32), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            a = a @ a * 0.01
        n += 100
    queue.put(n / (time.perf_counter() - t0))


class BusyCPUs:
    """`workers` single-threaded processes spinning on matmuls for `seconds` from the start of a `with`
    block; `.rate` afterwards: their matmuls per second, summed (the block waits for them to finish)."""

    def __init__(self, workers: int, seconds: float):
        self.workers, self.seconds, self.rate = workers, seconds, None

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.procs = [ctx.Process(target=_spin, args=(self.seconds, self.queue)) for _ in range(self.workers)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)  # spawned interpreters start spinning after their imports
        return self

    def __exit__(self, *exc):
        self.rate = sum(self.queue.get() for _ in self.procs)
        for p in self.procs:
            p.join()


def cpu_work(workers: int, seconds: float) -> float:
    """Matmuls per second summed over `workers` single-threaded processes."""
    with BusyCPUs(workers, seconds) as busy:
        pass
    return busy.rate


def disk_alone(path: str, streams: int, seconds: float) -> float:
    with Reader(path, streams) as r:
        time.sleep(seconds)
    return r.GBps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="spinning processes (default: cores)")
    p.add_argument("--streams", type=int, default=2, help="reads in flight in the reader process")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--work", default=str(ROOT / ".flash_bench"))
    p.add_argument("--out", default=None)
    p.add_argument("--blocks", default="1,4,16", help="read sizes in MiB for the CPU-with-reads test")
    p.add_argument("--read", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read:
        read_forever(args.read[0], int(args.read[1]), int(args.read[2]))
        return 0
    sys.path.insert(0, str(ROOT))
    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx

    from applelm import load, stream_generate

    import flash_bench

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    probe = str(work / "disk_probe.bin")
    flash_bench.disk_speeds(work)  # writes the 1 GiB probe file if missing (its speeds are not used here)
    model, tokenizer = load(dequantize=True)

    def decode() -> float:
        last = None
        for last in stream_generate(model, tokenizer, PROMPT, max_tokens=args.tokens):
            pass
        return last.generation_tps

    decode()  # warm-up
    blocks = [int(b) for b in args.blocks.split(",")]
    rounds: dict[str, list] = defaultdict(list)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        rounds["read_alone_GBps"].append(disk_alone(probe, args.streams, args.seconds))
        rounds["cpu_alone"].append(cpu_work(args.workers, args.seconds))
        for mib in blocks:  # does the cost follow the bytes read, or the time spent reading?
            before = machine_info.cpu_times()
            with Reader(probe, args.streams, mib << 20) as rd:
                rounds[f"cpu_with_read_{mib}MiB"].append(cpu_work(args.workers, args.seconds))
            rounds[f"read_cpu_busy_{mib}MiB_GBps"].append(rd.GBps)
            rounds[f"reader_cpu_share_{mib}MiB"].append(rd.cpu_share)  # of one core
            steal = machine_info.cpu_shares(before, machine_info.cpu_times())["steal"]
            rounds[f"steal_share_{mib}MiB"].append(steal)  # of all cores
        rounds["decode_alone_tok_s"].append(decode())
        with Reader(probe, args.streams) as rd:
            rounds["decode_with_read_tok_s"].append(decode())
        rounds["read_during_decode_GBps"].append(rd.GBps)
    med = {k: round(statistics.median(v), 3) for k, v in rounds.items()}
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "machine": {**machine_info.machine(), "mlx": mx.__version__}, "workers": args.workers,
        "streams": args.streams, "blocks_MiB": blocks,
        "rounds": {k: [round(x, 3) for x in v] for k, v in rounds.items()}, "median": med,
        "cpu_left_with_read": {mib: round(med[f"cpu_with_read_{mib}MiB"] / med["cpu_alone"], 3) for mib in blocks},
        "decode_left_with_read": round(med["decode_with_read_tok_s"] / med["decode_alone_tok_s"], 3),
        "read_left_cpu_busy": {mib: round(med[f"read_cpu_busy_{mib}MiB_GBps"] / med["read_alone_GBps"], 3)
                               for mib in blocks},
    }
    machine_info.write_results(result, markdown(result), args.out, "io_contention")
    return 0


def markdown(r: dict) -> str:
    m, med = r["machine"], r["median"]
    lines = [f"# Direct reads vs compute on one machine ({m['cpu']}, {m['cores']} cores)", "",
             f"Command: `{r['command']}`  ", f"{m['platform']}, MLX {m['mlx']}, load average at start "
             f"{m['load_avg']}; {r['workers']} spinning workers; the reader keeps {r['streams']} reads in flight", "",
             "| measure (median of rounds) | alone | with the other running | left |", "|---|---:|---:|---:|"]
    for mib in r["blocks_MiB"]:
        lines += [f"| workers' matmuls/s, reader of {mib} MiB reads (it read "
                  f"{med[f'read_cpu_busy_{mib}MiB_GBps']} GB/s meanwhile) | {med['cpu_alone']:.0f} | "
                  f"{med[f'cpu_with_read_{mib}MiB']:.0f} | {r['cpu_left_with_read'][mib]:.0%} |"]
    lines += [f"| the reader's own CPU use (share of one core) and the steal the guest saw (share of all cores) "
              f"during those tests | | {', '.join(str(med[f'reader_cpu_share_{mib}MiB']) for mib in r['blocks_MiB'])}; "
              f"steal {', '.join(str(med[f'steal_share_{mib}MiB']) for mib in r['blocks_MiB'])} | |"]
    if 4 in r["blocks_MiB"]:
        lines += [f"| direct read GB/s, 4 MiB reads, vs {r['workers']} busy workers | {med['read_alone_GBps']} | "
                  f"{med['read_cpu_busy_4MiB_GBps']} | {r['read_left_cpu_busy'][4]:.0%} |"]
    lines += [f"| applelm SmolLM2 decode tok/s, vs the reader (it read {med['read_during_decode_GBps']} GB/s) | "
              f"{med['decode_alone_tok_s']} | {med['decode_with_read_tok_s']} | {r['decode_left_with_read']:.0%} |",
              "", "Every round: " + ", ".join(f"{k} {v}" for k, v in r["rounds"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
