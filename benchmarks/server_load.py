"""Load test of `python -m applelm.server` on loopback: 1, 4 and 16 concurrent streaming clients.

For each concurrency level every client sends `--requests` streaming chat requests back to back, each
asking for exactly `--max-tokens` tokens (ignore_eos, no stop strings, stream_options.include_usage).
Reported per level: aggregate completion tok/s (all tokens / wall time), time to first token p50/p99,
and a check that every request got exactly the tokens it asked for (usage.completion_tokens ==
max_tokens, finish_reason "length", and no more text chunks than tokens). The server runs the default
model (SmolLM2-135M-Instruct Q4_1), once per mode: quantized, and --dequantize (dense float32, whose
matrix products scale with the batch on a CPU BLAS); each also with `-no-prompt-cache`
(--prompt-cache-mb 0), so prompt reuse is measured against prefilling every prompt whole, in the same run.
Every prompt is unique (its user message ends with the level and request number): what can be reused
is what real chats share, the chat template's system prompt and the start of the user turn.

    .venv/bin/python benchmarks/server_load.py [--modes quantized,quantized-no-prompt-cache]
        [--clients 1,4,16] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import machine_info  # benchmarks/machine_info.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TOPICS = ["the sea", "a mountain village", "how a compiler works", "the history of tea", "bicycles",
          "a rainy afternoon in a big city", "why the sky is blue", "volcanoes", "chess openings",
          "the life of bees", "a lighthouse keeper", "trains at night", "how bread rises", "desert plants",
          "the moon landing", "an old library"]


def one_request(url: str, i: int, max_tokens: int, tag: str = "") -> dict:
    """One streaming chat request; returns timing and the checks' inputs."""
    u = urlparse(url)
    words = " ".join(["Please be detailed."] * (i % 4))  # prompts of different lengths
    content = f"Write about {TOPICS[i % len(TOPICS)]}. {words} (request {tag}{i})"
    body = {"messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    chunks, finish, usage, done = 0, None, None, False
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            break
        obj = json.loads(data)
        if obj.get("usage"):
            usage = obj["usage"]
        for choice in obj.get("choices", []):
            if choice["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    conn.close()
    got = usage["completion_tokens"] if usage else -1
    prompt = (usage or {}).get("prompt_tokens", 0)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"status": resp.status, "ttft_s": (first or end) - start, "total_s": end - start, "tokens": got,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "ok": resp.status == 200 and done and finish == "length" and got == max_tokens and 0 < chunks <= got}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int):
        barrier.wait()
        for r in range(requests):
            res = one_request(url, c * requests + r, max_tokens, f"{clients}-")
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results if r["tokens"] > 0)
    ttft = [r["ttft_s"] for r in results]
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "per_request_tok_s_p50": round(statistics.median(r["tokens"] / r["total_s"] for r in results), 2),
            "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in results), 1),
            "cached_tokens_mean": round(statistics.mean(r["cached_tokens"] for r in results), 1),
            "all_exact": all(r["ok"] for r in results), "failed": sum(not r["ok"] for r in results)}


def bench_mode(mode: str, levels: list[int], requests: int, max_tokens: int, max_batch: int) -> dict:
    from server_fixtures import ServerProcess

    args = ["--port", "0", "--max-batch", str(max_batch), "--max-queue", "256"]
    base, _, variant = mode.partition("-")
    if base not in ("dense", "quantized") or variant not in ("", "no-prompt-cache"):
        raise SystemExit(f"unknown mode {mode!r}: dense or quantized, optionally with -no-prompt-cache")
    if base == "dense":
        args.append("--dequantize")
    if variant:
        args += ["--prompt-cache-mb", "0"]
    with ServerProcess(args, timeout=300) as server:
        one_request(server.url, 999, 8, "warm-up-")
        out = {"mode": mode, "server_args": args, "levels": []}
        for c in levels:
            level = run_level(server.url, c, requests, max_tokens)
            print(f"  {mode:9s} clients={c:2d}: {level['aggregate_tok_s']:7.1f} tok/s, "
                  f"TTFT p50 {level['ttft_p50_s']:.3f} s p99 {level['ttft_p99_s']:.3f} s, "
                  f"exact={level['all_exact']}", flush=True)
            out["levels"].append(level)
    base = out["levels"][0]["aggregate_tok_s"]
    out["speedup_vs_1_client"] = {str(lv["clients"]): round(lv["aggregate_tok_s"] / base, 2) for lv in out["levels"]}
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# server_load (CPU: {m['cpu']}, {m['cores']} cores; server and clients share the machine)", "",
             f"Command: `python benchmarks/server_load.py`; commit {report.get('commit') or '?'}; {m['platform']}; "
             f"load average before "
             f"{report['load_average_before']}, after {report['load_average_after']}  ",
             f"Model: {report['model']}; {report['requests_per_client']} streaming requests per client, "
             f"{report['max_tokens']} tokens each (ignore_eos, temperature 0.7, seeded)", "",
             "| mode | clients | aggregate tok/s | x one client | TTFT p50 s | TTFT p99 s | prompt tokens "
             "(cached), mean | every request exact |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode in report["modes"]:
        for lv in mode["levels"]:
            lines.append(f"| {mode['mode']} | {lv['clients']} | {lv['aggregate_tok_s']} | "
                         f"{mode['speedup_vs_1_client'][str(lv['clients'])]} | {lv['ttft_p50_s']} | "
                         f"{lv['ttft_p99_s']} | "
                         f"{lv.get('prompt_tokens_mean', '?')} ({lv.get('cached_tokens_mean', '?')}) | "
                         f"{lv['all_exact']} |")
    lines.append("")
    for mode in report["modes"]:
        x = mode["speedup_vs_1_client"].get("16")
        if x is not None:
            lines.append(f"Goal (16 clients >= 6x one), {mode['mode']}: {x}x, {'met' if x >= 6 else 'not met'}.  ")
    by_mode = {m["mode"]: {lv["clients"]: lv for lv in m["levels"]} for m in report["modes"]}
    for name, levels in by_mode.items():
        off = by_mode.get(f"{name}-no-prompt-cache")
        for c, lv in levels.items() if off else ():
            if c in off:
                on_tok, off_tok = lv["aggregate_tok_s"], off[c]["aggregate_tok_s"]
                lines.append(f"Prompt reuse, {name}, {c} clients: {on_tok} against {off_tok} tok/s "
                             f"({on_tok / off_tok:.2f}x), TTFT p50 {lv['ttft_p50_s']} against "
                             f"{off[c]['ttft_p50_s']} s.  ")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="quantized-no-prompt-cache,quantized,dense-no-prompt-cache,dense",
                   help="dense (--dequantize) and/or quantized, each optionally with -no-prompt-cache")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_load_cpu.json")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the markdown summary of a results file")
    args = p.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    levels = [int(c) for c in args.clients.split(",")]
    load_before = machine_info.load_avg()
    report = {"benchmark": "server_load", "machine": machine_info.machine(), "commit": machine_info.commit(),
              "model": "SmolLM2-135M-Instruct.Q4_1 (embedded)",
              "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "load_average_before": load_before, "modes": []}
    for mode in args.modes.split(","):
        report["modes"].append(bench_mode(mode, levels, args.requests, args.max_tokens, args.max_batch))
    report["load_average_after"] = machine_info.load_avg()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
    print(text)
    return 0 if all(lv["all_exact"] for m in report["modes"] for lv in m["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
