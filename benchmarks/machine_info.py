"""What every benchmark records about the machine it ran on (results files name their machine)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages, rounded (a shared machine's numbers move with them)."""
    return [round(v, 2) for v in os.getloadavg()]


def commit() -> str:
    """The repository's short HEAD commit ("" outside a git checkout): results name the code they measured."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "load_avg": load_avg()}


def peak_rss_bytes():
    """This process's resident high-water mark from /proc/self/status (VmHWM), or None where there is none.
    Not ru_maxrss on Linux: that is carried across exec, so a worker process would report its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_results(result: dict, markdown: str, out, name: str, device: str = "cpu") -> None:
    """Write `result` as JSON and `markdown` beside it (same name, .md), then print the markdown. Without
    `out`, the file is benchmarks/results/{name}_{device}_{os}-{arch}-{cores}core.json (names its machine)."""
    import json
    from pathlib import Path

    if out is None:
        tag = f"{device}_{platform.system().lower()}-{platform.machine()}-{os.cpu_count()}core"
        out = Path(__file__).resolve().parent / "results" / f"{name}_{tag}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def cpu_times():
    """The machine's CPU time counters from /proc/stat (user nice system idle iowait irq softirq steal),
    or None where there are none."""
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:9]]
    except OSError:
        return None


def cpu_shares(before, after):
    """Shares of all CPU time between two `cpu_times()` readings: busy in the guest, and stolen by the
    hypervisor (on this VM, reads cost steal: benchmarks/io_contention.py). None without both readings."""
    if not before or not after:
        return None
    d = [b - a for a, b in zip(before, after)]
    total = max(1, sum(d))
    return {"busy": (d[0] + d[1] + d[2] + d[5] + d[6]) / total, "steal": d[7] / total}
