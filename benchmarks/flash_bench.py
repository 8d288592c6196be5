"""Flash paging benchmark: models bigger than a memory budget, streamed from the SSD.

Two models, each prepared once (python -m applelm.flash prepare) into a flash layout:
  - synthetic:  a random Llama-shaped model whose FFN is ~2 GB in 16-bit, run with a 1 GB budget
  - synthetic-relu: the same shape with a gated-ReLU FFN built to have a ReLU LLM's activation statistics
                (~89% of neurons off, predictable by a low-rank predictor; not in the default --models):
                where neuron-level paging (the paper's 20-25x on a GPU) has something to skip
  - smollm2:    the embedded SmolLM2-135M GGUF, run with half of its fully resident footprint (by default
                the smallest resident form: attention and embedding as the GGUF's packed blocks through
                ops/gguf_cpu.c, FFN as stored bundles through the native kernel; --smollm2-resident)
  - smollm2-8bit: the same SmolLM2 prepared with 8-bit bundles (about half the bytes), same budget
  - smollm2-blocks: the same SmolLM2 prepared with --gguf-blocks (the file's Q4_1 blocks, a third of the
                bfloat16 bytes), at 75% of its own resident size and at the smollm2 budget, beside the
                plain GGUF file (not in the default --models)
and, in the same run, for each:
  - resident : the same prepared weights all in memory (load(OUT) without a budget; SmolLM2 with
               native=True, which pins the FFN as stored bundles)
  - naive    : every layer's FFN read synchronously each token, page cache bypassed, then evaluated
               (on the CPU with the same native kernel as paged, so the two differ only in I/O)
               (no pinning, no prefetch, no bundling benefit, no windowing)
  - paged    : applelm dense paging under the budget (pinned layers, prefetch ring, async pipeline;
               on the CPU a token's streamed units and pinned layers, held as stored bundles, go
               through the native kernel, flash/native.py)
  - paged-mlx: the same on the CPU without the native kernel (MLX copies and converts each unit)
  - sparse   : neuron-level paging (predictors + windowing cache, or resident gates + thresholds);
               on the CPU through the native kernel (cache of stored bundles), "-mlx" without it
with decode tok/s (median per-token time), bytes read per token, achieved read GB/s and I/O overlap,
peak RSS growth over a warmed-up runtime and MLX's peak allocation, beside the disk's own direct-I/O
sequential and 4 KiB / 32 KiB random read speeds, measured in the same script (before and after), and
in each run just before and just after it decodes: the probe file, and a read of the run's own streamed
units alone (their mean is the I/O bound of the dense goal); and the machine's CPU busy and steal
shares while each run decodes (on this VM reads cost steal: benchmarks/io_contention.py).
SmolLM2 also gets perplexity on GPL-3 text for each sparsity setting. Every run is a fresh process.

    python benchmarks/flash_bench.py [--device cpu|gpu]
                                     [--models synthetic,synthetic-relu,smollm2,smollm2-8bit,smollm2-blocks]
                                     [--work DIR] [--tokens N] [--out FILE]

--device gpu runs the same plan on MLX's GPU (float16 compute); compute is then fast and reads
dominate (the paper reports 20-25x over naive there). The native kernel is the CPU's: on a GPU, SmolLM2's
pinned layers are float16 in MLX (benchmarks/gpu_smollm2.sh carries the model there). Results: JSON + a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import machine_info  # benchmarks/machine_info.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GPL3 = Path("/usr/share/common-licenses/GPL-3")
SMOL_PROMPT = ("The history of astronomy spans thousands of years. Ancient observers tracked the motions of the "
               "Sun, the Moon and the planets, and")


# ----------------------------------------------------------------------------------------------------------
# machine, disk


def machine(device: str) -> dict:
    import mlx.core as mx

    from applelm.loader import physical_memory

    return {**machine_info.machine(), "mlx": mx.__version__, "device": device, "commit": machine_info.commit(),
            "ram_gb": round(physical_memory() / 1e9, 1)}


def disk_speeds(work: Path, size: int = 1 << 30) -> dict:
    """Direct-I/O read speeds of the disk holding `work` (GB/s), on a 1 GiB file of random bytes."""
    from applelm.flash.io import measure_disk

    probe = work / "disk_probe.bin"
    if not probe.exists() or probe.stat().st_size != size:
        with open(probe, "wb") as fh:
            block = os.urandom(1 << 24)
            for _ in range(size >> 24):
                fh.write(block)
    out = {}
    for name, block, threads, seq in (("seq_4MiB_1stream", 4 << 20, 1, True), ("seq_4MiB_2streams", 4 << 20, 2, True),
                                      ("rand_4KiB_qd1", 4096, 1, False), ("rand_4KiB_qd8", 4096, 8, False),
                                      ("rand_32KiB_qd1", 32768, 1, False), ("rand_32KiB_qd8", 32768, 8, False)):
        out[name] = round(measure_disk(str(probe), size, block, seconds=1.5, threads=threads, sequential=seq) / 1e9, 3)
    out["seq_best"] = max(out["seq_4MiB_1stream"], out["seq_4MiB_2streams"])
    return out


# ----------------------------------------------------------------------------------------------------------
# models


# The synthetic model's default shape (hidden, intermediate, layers) and budget; pin_layout.py --synthetic too.
SYNTHETIC_SHAPE, SYNTHETIC_BUDGET = "1024,14336,24", "1GB"


def synthetic_layout_name(hidden: int, inter: int, layers: int) -> str:
    """The work-folder name of the synthetic model's flash layout of this shape."""
    return f"synthetic_{hidden}_{inter}_{layers}_flash"


def synthetic_prompt(vocab_size: int, n: int = 256) -> tuple[list[int], list[int]]:
    """The synthetic model's calibration ids (n) and its prompt (their first 16)."""
    import numpy as np

    ids = [int(v) for v in np.random.default_rng(1).integers(0, vocab_size, n)]
    return ids, ids[:16]


def synthetic_config(hidden: int, inter: int, layers: int, hidden_act: str = "silu") -> dict:
    heads = hidden // 64
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), rms_norm_eps=1e-5,
                vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096,
                hidden_act=hidden_act)


# The sparse ReLU model: each neuron fires on a share of tokens drawn log-uniformly from this range (mean
# ~11%, so ~89% of neurons are off, as ReLU LLMs measure: ProSparse ~89%, OPT ~97%), with a few hot neurons.
RELU_RATES, RELU_GATE_RANK, RELU_CHANNEL = (0.003, 0.6), 16, 8.0
RELU_CALIBRATION_TOKENS = 4096


def relu_store(work: Path, shape: str = SYNTHETIC_SHAPE,
               calibration_tokens: int = RELU_CALIBRATION_TOKENS) -> tuple[Path, float, list[int]]:
    """The sparse ReLU model of `shape` ("hidden,intermediate,layers") under `work`, written and prepared
    (bfloat16 bundles, rank-32 predictors) if missing: (flash folder, seconds preparing took, calibration
    ids, whose first 16 are its prompt)."""
    hidden, inter, layers = (int(v) for v in shape.split(","))
    cfg = synthetic_config(hidden, inter, layers, hidden_act="relu")
    src = write_synthetic(work / f"synthetic_relu_{hidden}_{inter}_{layers}", cfg)
    ids = synthetic_prompt(cfg["vocab_size"], calibration_tokens)[0]
    layout, seconds = prepared(src, work / f"synthetic_relu_{hidden}_{inter}_{layers}_flash", bits=16,
                               dtype="bfloat16", train_predictors=True, calibration_ids=ids,
                               calibration_tokens=len(ids), predictor_rank=32)
    return layout, seconds, ids


def relu_level(layout) -> float:
    """The sparsity the ReLU model's sparse runs use (layout: a read FlashLayout): just below its natural
    sparsity every threshold is 0, so only the predictor's misses change results (at most 0.85)."""
    return round(min(0.85, min(layout.index["sparsity"]["zero_fraction"]) - 0.02), 2)


def relu_gate(rng, f: int, h: int, x0: float):
    """(f, h) gate rows for the sparse ReLU model: gate . x is a rank-RELU_GATE_RANK function of the hidden
    state (plus 5% noise), so a low-rank predictor can learn it, shifted per neuron through hidden channel 0
    (held at RELU_CHANNEL by the embeddings, x0 after the norm) so that neuron i fires on about rates[i]."""
    import numpy as np
    from statistics import NormalDist

    r = RELU_GATE_RANK
    w = rng.standard_normal((f, r), dtype=np.float32) @ rng.standard_normal((r, h), dtype=np.float32)
    w *= 0.02 / r**0.5
    w += rng.standard_normal((f, h), dtype=np.float32) * 0.02 * 0.05**0.5
    w[:, 0] = 0.0
    lo, hi = np.log(RELU_RATES[0]), np.log(RELU_RATES[1])
    rates = np.exp(rng.uniform(lo, hi, f))
    sigma = np.linalg.norm(w, axis=1)  # std of w_i . x over tokens: the other channels are ~N(0, 1) after the norm
    z = np.array([NormalDist().inv_cdf(1 - p) for p in rates], np.float32)
    w[:, 0] = -sigma * z / x0
    return w


def write_synthetic(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random Llama-shaped checkpoint in bfloat16, one safetensors shard per layer (bounded memory). With
    hidden_act relu, the sparse ReLU model: gates from relu_gate, attention and FFN outputs kept small so
    that channel 0 stays where the gates expect it through the layers."""
    import mlx.core as mx
    import numpy as np

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    relu = config.get("hidden_act") == "relu"
    x0 = RELU_CHANNEL / ((RELU_CHANNEL**2 + h - 1) / h) ** 0.5  # channel 0 after the RMS norm

    def rnd(*shape, scale=0.02):
        return mx.array(rng.standard_normal(shape, dtype=np.float32) * scale).astype(mx.bfloat16)

    weight_map = {}
    shards = n + 1
    for i in range(n):
        p = f"model.layers.{i}."
        part = {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, h, scale=0.02 / 4 if relu else 0.02),
                # (drawn in this order: the dense model's weights stay those of earlier runs)
                p + "mlp.gate_proj.weight": (mx.array(relu_gate(rng, f, h, x0)).astype(mx.bfloat16) if relu
                                             else rnd(f, h)),
                p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f, scale=0.02 / 4),
                p + "input_layernorm.weight": mx.ones((h,), mx.bfloat16),
                p + "post_attention_layernorm.weight": mx.ones((h,), mx.bfloat16)}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / name), part)
        weight_map.update({k: name for k in part})
        print(f"  synthetic layer {i + 1}/{n}", file=sys.stderr, flush=True)
    embed = rng.standard_normal((config["vocab_size"], h), dtype=np.float32)
    if relu:
        embed[:, 0] = RELU_CHANNEL
    rest = {"model.embed_tokens.weight": mx.array(embed).astype(mx.bfloat16),
            "model.norm.weight": mx.ones((h,), mx.bfloat16)}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    mx.save_safetensors(str(folder / name), rest)
    weight_map.update({k: name for k in rest})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def prepared(src, out: Path, **options) -> tuple[Path, float]:
    """Prepare once per (source, options); returns (folder, seconds spent now or when it was made)."""
    from applelm.flash import is_flash_layout
    from applelm.flash.prepare import prepare

    stamp = out / "bench_stamp.json"
    want = {"src": str(src), **{k: v for k, v in options.items() if k != "calibration_ids"}}
    if is_flash_layout(out) and stamp.exists() and json.loads(stamp.read_text()).get("options") == want:
        return out, json.loads(stamp.read_text())["seconds"]
    t0 = time.perf_counter()
    prepare(src, out, **options)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"options": want, "seconds": seconds}))
    return out, seconds


# ----------------------------------------------------------------------------------------------------------
# one run in a fresh process


def resident_size(layout, **load_options) -> tuple[int, int]:
    """(bytes the flash layout holds fully resident, bytes of its resident part alone) from its plan."""
    from applelm.loader import load_model

    full = load_model(layout, **load_options)[0].flash
    try:
        return full.plan.total_bytes, full.plan.resident_bytes
    finally:
        full.close()


def round_args(doc: str, flags: tuple[str, ...] = ()) -> tuple[argparse.Namespace, Path]:
    """The options of the interleaved-round SmolLM2 studies (omp_wait, huge_pages, ring_depth) and their work
    folder, created if missing; `flags`: a study's own on/off switches."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in flags:
        p.add_argument(flag, action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--work", default=str(ROOT / ".flash_bench"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return args, work


# smollm2-blocks budget, a fraction of its own fully resident size (at 0.5 it is below the store's minimum)
BLOCKS_BUDGET_FRACTION = 0.75
# The SmolLM2 stores every study here prepares alike (prepared() rebuilds a folder whose options differ).
SMOL_STORES = {"smollm2_bf16": dict(bits=16, dtype="bfloat16", train_predictors=True),
               "smollm2_q8": dict(bits=8, train_predictors=False),
               "smollm2_blocks": dict(gguf_blocks=True)}


def smollm2_store(work: Path, name: str) -> tuple[Path, float]:
    """The embedded SmolLM2 prepared as SMOL_STORES[name] under `work` (see prepared)."""
    from applelm.loader import default_model_path

    return prepared(default_model_path(), work / name, **SMOL_STORES[name])


def smollm2_stores(work: Path, resident_options: Optional[dict] = None) -> tuple[Path, Path, int]:
    """The embedded SmolLM2's bfloat16 and 8-bit flash layouts under `work` (prepared if missing) and this
    benchmark's SmolLM2 budget: half of the smallest fully resident form (the default of --smollm2-*), the
    bfloat16 store loaded with `resident_options` (default: the CPU's, through the native kernel)."""
    import applelm  # noqa: F401  (BLAS preload before mlx)
    from applelm.loader import load_model

    (bf16, _), (q8, _) = smollm2_store(work, "smollm2_bf16"), smollm2_store(work, "smollm2_q8")
    full, _, _ = load_model(bf16, **({"native": True} if resident_options is None else resident_options))
    budget = full.flash.plan.total_bytes // 2
    full.flash.close()
    return bf16, q8, budget


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    peak = machine_info.peak_rss_bytes()
    if peak is not None:
        return peak
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def read_units_speed(units, threads: int = 4, split: int = 8 << 20, in_flight: int = 4,
                     seconds: float = 1.0, start: int = 0, huge_pages: Optional[bool] = None) -> float:
    """Direct-I/O read speed (bytes/s) of flash units (ring.Unit) read in the given order from `start`,
    `in_flight` reads kept queued on a reader of `threads` threads and `split`-sized requests, into
    slots of one buffer as the runtime's ring reads them (`huge_pages`: see flash/io.py AlignedBuffer)."""
    from collections import deque

    from applelm.flash.io import AlignedBuffer, DirectReader

    reader = DirectReader(threads=threads, split=split)
    block = AlignedBuffer(in_flight * max(u.read_bytes for u in units), huge_pages)
    buffers = block.slots(in_flight)
    queue, done, k = deque(), 0, start
    t0 = time.perf_counter()
    for b in buffers:
        u = units[k % len(units)]
        queue.append((b, u, reader.read(u.path, u.file_offset, u.read_bytes, b)))
        k += 1
    while queue:
        b, u, futures = queue.popleft()
        for f in futures:
            f.result()
        done += u.read_bytes
        if time.perf_counter() - t0 < seconds:
            u = units[k % len(units)]
            queue.append((b, u, reader.read(u.path, u.file_offset, u.read_bytes, b)))
            k += 1
    elapsed = time.perf_counter() - t0
    reader.close()
    for b in buffers:
        b.close()
    block.close()
    return done / elapsed


def layout_units(layout, unit_bytes: int = 16 << 20) -> list:
    """Every layer of a flash layout as streamed units of at most ~unit_bytes, in forward order."""
    from applelm.flash.ring import split_layer

    return [u for i in range(layout.n_layers)
            for u in split_layer(i, layout.intermediate, layout.codec.bundle_bytes, str(layout.layers[i].path),
                                 unit_bytes)]


def layout_read_speed(rt, seconds: float = 1.0, in_flight: int = 4) -> float:
    """Direct-I/O read speed (bytes/s) of the very bytes this run streams: its units in forward order,
    `in_flight` reads kept queued, for about `seconds`. The probe file can be cached by the host in ways
    the layer files are not (or the reverse); this bound compares like with like."""
    units = list(rt.ring.units) if rt.ring is not None else [u for i in sorted(rt.units) for u in rt.units[i]]
    return read_units_speed(units, in_flight=in_flight, seconds=seconds)


def stub_reads(gbps: float):
    """Make every os.preadv return at once after sleeping as long as it would take at `gbps` GB/s, leaving
    its buffer as it was; returns the function that puts the real one back. A diagnostic of paging without
    the disk's cost to the rest of the machine: the ring's slots keep what earlier real reads put there
    (the prompt's), so the kernel computes on real bytes, but of other layers: the tokens are not the model's."""
    real = os.preadv

    def sleeper(fd, buffers, offset, *flags):
        n = sum(memoryview(b).nbytes for b in buffers)
        time.sleep(n / (gbps * 1e9))
        return n

    os.preadv = sleeper
    return lambda: setattr(os, "preadv", real)


def run_one(spec: dict) -> dict:
    """Load spec["model"] with spec["options"], decode spec["tokens"] tokens after spec["prompt"].
    spec["stub_reads"]: decode with stub_reads at this run's own streamed-unit read speed, measured just
    before (the prompt's reads are real). spec["ahead_limit"]: lookahead reads at most that many neurons a
    layer, whatever the misses (0: it guesses and reads nothing; what guessing alone costs)."""
    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx

    if spec["device"] == "gpu":
        mx.set_default_device(mx.gpu)
    from applelm.generation import generate_step
    from applelm.loader import load_model

    a = mx.random.normal((512, 512))
    mx.eval(a @ a, mx.fast.rms_norm(a, None, 1e-5))  # warm the runtime before the baseline
    base = _rss()
    _reset_peak_rss()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, _, _ = load_model(spec["model"], **spec["options"])
    load_s = time.perf_counter() - t0
    rt = getattr(model, "flash", None)
    disk = {}
    if spec.get("probe"):  # the disk's own speed right now, just before this run decodes
        from applelm.flash.io import measure_disk

        size = Path(spec["probe"]).stat().st_size
        disk = {"seq_4MiB": measure_disk(spec["probe"], size, 4 << 20, seconds=1.0, threads=1, sequential=True) / 1e9,
                "rand_32KiB_qd8": measure_disk(spec["probe"], size, 32768, seconds=1.0, threads=8) / 1e9}
        if rt is not None and (rt.ring is not None or rt.plan.mode == "naive"):
            disk["layout_seq"] = layout_read_speed(rt) / 1e9
    stub_gbps = None
    if spec.get("ahead_limit") is not None:  # lookahead reads at most this many neurons a layer (0: guesses only)
        from applelm.flash import paged_mlp

        paged_mlp.AHEAD_MISS_FACTOR, paged_mlp.AHEAD_MIN_NEURONS = 0.0, spec["ahead_limit"]
    if spec.get("stub_reads") and rt is not None and rt.ring:  # the reading above when the probe took one
        stub_gbps = disk.get("layout_seq") or layout_read_speed(rt) / 1e9
    prompt = mx.array(spec["prompt"], dtype=mx.int32)
    times, tokens, stamp = [], [], time.perf_counter()
    first = cpu0 = None
    restore = None
    try:
        for i, (tok, _) in enumerate(generate_step(prompt, model, max_tokens=spec["tokens"] + 1)):
            now = time.perf_counter()
            if i == 0:
                first = now - stamp
                if stub_gbps:
                    restore = stub_reads(stub_gbps)
                if rt is not None:
                    rt.reset_stats()
                cpu0 = machine_info.cpu_times()
            else:
                times.append(now - stamp)
            tokens.append(tok)
            stamp = now
    finally:
        if restore:
            restore()
    cpu = machine_info.cpu_shares(cpu0, machine_info.cpu_times())
    cpu = {k: round(v, 3) for k, v in cpu.items()} if cpu else None
    report = rt.report() if rt is not None else {}
    if disk and rt is not None:  # the same speed again right after decoding: the bound uses the mean of both
        if "layout_seq" in disk:
            disk["layout_seq_after"] = layout_read_speed(rt) / 1e9
        disk["rand_32KiB_qd8_after"] = measure_disk(spec["probe"], size, 32768, seconds=1.0, threads=8) / 1e9
    decode_s = sum(times)
    med = sorted(times)[len(times) // 2]
    out = {"label": spec["label"], "load_s": round(load_s, 2), "prefill_and_first_token_s": round(first, 3),
           "decode_tok_s_median": round(1 / med, 3), "decode_tok_s_mean": round(len(times) / decode_s, 3),
           "token_times_s": [round(t, 3) for t in times], "tokens": tokens,
           "peak_rss_growth_bytes": _peak_rss() - base, "base_rss_bytes": base, "mlx_peak_bytes": mx.get_peak_memory(),
           "plan": rt.plan.describe() if rt is not None else "", "plan_bytes": rt.plan.total_bytes if rt else None,
           "budget_bytes": rt.plan.budget if rt else None, "disk_GBps_in_run": disk, "cpu_during_decode": cpu,
           "reads_stubbed_at_GBps": round(stub_gbps, 3) if stub_gbps else None}
    if report:
        out.update({k: report[k] for k in ("bytes_per_token", "read_GBps", "io_overlap", "io_busy_s", "io_wait_s",
                                           "compute_wait_s", "forced_evals", "direct_io", "pin_layout")})
        if "layout_probe" in report:  # what --pin-layout auto measured at load, and chose
            out["layout_probe"] = report["layout_probe"]
        out["io_busy_per_token_s"] = report["io_busy_s"] / max(1, len(times))
        out["reads_per_token"] = report["reads"] / max(1, len(times))  # read requests (coalesced runs)
        for k in ("neurons_used_per_token", "neurons_read_per_token", "ahead_read_per_token", "ahead_used_share"):
            if k in report:
                out[k] = report[k]
    if rt is not None:
        rt.close()
    return out


def run_child(script, flag: str, payload: dict) -> dict:
    """`python script flag JSON` in a fresh process: the JSON its last stdout line holds, or {"error": the
    last line of its stderr} when it fails."""
    proc = subprocess.run([sys.executable, str(script), flag, json.dumps(payload)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(spec: dict) -> dict:
    r = run_child(__file__, "--run", spec)
    return {"label": spec["label"], **r} if "error" in r else r


def command_line(script) -> str:
    """How `script` was run, with the APPLELM_* switches set in the environment before it."""
    switches = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("APPLELM_")]
    return " ".join(switches + ["python", os.path.relpath(script, ROOT)] + sys.argv[1:])


def study_header(script) -> dict:
    """What every focused study's results start with: its command line, the machine, load and date."""
    return {"command": command_line(script),
            "machine": machine("cpu"), "load_start": machine_info.load_avg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


# ----------------------------------------------------------------------------------------------------------
# perplexity (a small loop; applelm/perplexity.py is another engineer's)


def nll(model, ids: list[int], chunk: int = 256, token_by_token: bool = False) -> float:
    """Mean negative log-likelihood of ids[1:] given the prefix (prompt path, or one token at a time)."""
    import mlx.core as mx

    from applelm.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    total, count = 0.0, 0
    step = 1 if token_by_token else chunk
    for s in range(0, len(ids) - 1, step):
        x = mx.array(ids[s: s + step], dtype=mx.int32)[None]
        target = mx.array(ids[s + 1: s + 1 + x.shape[1]], dtype=mx.int32)
        logits = model(x, cache=cache)[0, : target.shape[0]].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total += float(-mx.take_along_axis(lp, target[:, None], axis=-1).sum())
        count += target.shape[0]
    return total / count


def perplexities(layout16: Path, layout: Path, tokens: int, tbt_tokens: int, levels: list[float],
                 other_stores: Optional[dict] = None) -> dict:
    """Perplexity on GPL-3 text: applelm.perplexity (512-token windows, prompt path) for the resident
    model and threshold sparsity (whose prompt path applies each position's mask, equal to decoding it
    token by token: tests/test_flash_paging.py); predictor sparsity only exists when decoding, so it is
    scored token by token on the first `tbt_tokens` tokens, beside the others on the same tokens."""
    import math

    from applelm.flash.loader import flash_tokenizer
    from applelm.loader import load_model
    from applelm.perplexity import perplexity, text_tokens

    if not GPL3.exists():
        return {"error": f"{GPL3} not found"}
    ids = text_tokens(flash_tokenizer(layout), GPL3.read_text(), max_tokens=tokens)
    out = {"text": str(GPL3), "tokens": len(ids), "context": 512, "token_by_token_tokens": tbt_tokens}
    ppl = lambda v: round(math.exp(v), 4)  # noqa: E731

    @contextmanager
    def loaded(path, **options):
        # One load per configuration: the scores only read weights, so they can share a model.
        m, _, _ = load_model(path, dequantize=True, **options)
        try:
            yield m
        finally:
            m.flash.close()

    def full(m) -> float:
        return round(perplexity(m, ids, context=512).perplexity, 4)

    with loaded(layout16) as m:
        out["resident_float16_store"] = full(m)
    for name, path in (other_stores or {}).items():
        with loaded(path) as m:
            out[f"resident_{name}_store"] = full(m)
    with loaded(layout) as m:
        out["resident"] = full(m)
        out["resident_first_tbt"] = ppl(nll(m, ids[:tbt_tokens], token_by_token=True))
    for s in levels:
        with loaded(layout, sparsity=s) as m:
            out[f"threshold_{s}"] = full(m)
            out[f"threshold_{s}_first_tbt"] = ppl(nll(m, ids[:tbt_tokens]))
        with loaded(layout, sparsity=s, sparsity_mode="predictor") as m:
            out[f"predictor_{s}_first_tbt"] = ppl(nll(m, ids[:tbt_tokens], token_by_token=True))
            out[f"predictor_{s}_neurons_used_per_token"] = round(m.flash.report().get("neurons_used_per_token", 0))
    return out


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def equal_prefix(a: list, b: list) -> int:
    """How many leading tokens of `a` and `b` are equal (up to the shorter one's length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def summarize(rounds: list[dict]) -> dict:
    """Per label: the round with the median tok/s, plus every round's tok/s."""
    out = {}
    for label in rounds[0]:
        runs = [r[label] for r in rounds if "error" not in r[label]]
        if not runs:
            out[label] = rounds[0][label]
            continue
        runs.sort(key=lambda r: r["decode_tok_s_median"])
        out[label] = dict(runs[len(runs) // 2], rounds_tok_s=[r[label].get("decode_tok_s_median") for r in rounds])
        probes = [r[label].get("layout_probe") for r in rounds]
        if any(probes):
            out[label]["rounds_layout_probe"] = probes
    return out


def tokens_equal(rounds: list[dict]) -> dict:
    """Per run: how many of its greedy tokens (prompt's next token included) equal the resident run's, in
    order, in each round (sparse runs may differ; dense ones must not)."""
    out = {}
    for label in rounds[0]:
        counts = []
        for rd in rounds:
            want, got = rd.get("resident", {}).get("tokens"), rd[label].get("tokens")
            if want and got:
                counts.append(equal_prefix(want, got))
        out[label] = {"equal_leading": counts, "of": len(rounds[0].get("resident", {}).get("tokens") or [])}
    return out


def model_entry(rows: dict, rounds: list[dict], **fields) -> dict:
    """A model's results: `fields` (description, budget, ...), its runs, goal checks and token agreement."""
    return {**fields, "runs": rows, "goals": goals(rows, rounds), "tokens_equal": tokens_equal(rounds),
            "all_rounds": rounds}


def goals(rows: dict, rounds: list[dict]) -> dict:
    """Goal per paged run: tok/s >= 80% of min(resident tok/s, disk speed / bytes read per token), with the
    disk speed measured inside the same run, just before and just after it decoded (the mean of the two:
    the disk here drifts and bursts within seconds). For dense paging that speed is a read of the run's own
    streamed units alone (layout_seq). Kept beside it: the bound from the reading before decoding alone
    (before_bound_tok_s, what earlier results used) and from the probe file's sequential speed
    (probe_bound_tok_s; in-run probes of that file swung between 0.9 and 4.7 GB/s between runs)."""
    res = rows.get("resident", {}).get("decode_tok_s_median")
    naive = rows.get("naive", {}).get("decode_tok_s_median")
    out = {}
    for label, r in rows.items():
        if label in ("resident", "naive") or "error" in r or not r.get("bytes_per_token"):
            continue
        kind = "layout_seq" if label.startswith("paged") else "rand_32KiB_qd8"
        per_round = []
        for rd in rounds:
            run = rd.get(label, {})
            if "error" in run or not run.get("bytes_per_token"):
                continue
            speeds, bpt = run["disk_GBps_in_run"], run["bytes_per_token"]
            before = speeds.get(kind, speeds["seq_4MiB"] if label.startswith("paged") else 0)
            disk = (before + speeds[f"{kind}_after"]) / 2 if f"{kind}_after" in speeds else before
            bound = disk * 1e9 / bpt
            target = 0.8 * min(x for x in (res, bound) if x)
            per_round.append({"tok_s": run["decode_tok_s_median"], "io_bound_tok_s": round(bound, 3),
                              "before_bound_tok_s": round(before * 1e9 / bpt, 3),
                              "probe_bound_tok_s": round(speeds["seq_4MiB"] * 1e9 / bpt, 3),
                              "disk_GBps": round(disk, 3), "target_tok_s": round(target, 3),
                              "met": run["decode_tok_s_median"] >= target})
        g = {"tok_s": r["decode_tok_s_median"], "resident_tok_s": res, "disk_measure": kind,
             "io_bound_tok_s": median([p["io_bound_tok_s"] for p in per_round]),
             "before_bound_tok_s": median([p["before_bound_tok_s"] for p in per_round]),
             "probe_bound_tok_s": median([p["probe_bound_tok_s"] for p in per_round]),
             "target_tok_s": median([p["target_tok_s"] for p in per_round]),
             "met_rounds": f"{sum(p['met'] for p in per_round)}/{len(per_round)}", "rounds": per_round,
             "vs_naive": round(r["decode_tok_s_median"] / naive, 2) if naive else None}
        g["met"] = g["target_tok_s"] is not None and g["tok_s"] >= g["target_tok_s"]
        out[label] = g
    return out


def bench_model(name: str, budget: int, spec_base: dict, sparse_runs: list[tuple[str, dict]],
                rounds: int, resident_options: Optional[dict] = None, mlx_variant: bool = True) -> tuple[dict, list]:
    """Every run `rounds` times, interleaved (the machine's load and the disk change over minutes).
    On the CPU, "paged-mlx" (and "sparse-...-mlx") is paging without the native kernel (flash/native.py),
    for its effect (mlx_variant=False: a store the kernel does not read). `resident_options`: how the fully
    resident run loads (default: no budget). A run's options may name another "model" (a peer)."""
    runs = [("resident", resident_options or {}), ("naive", {"memory_budget": budget, "naive": True}),
            ("paged", {"memory_budget": budget})]
    if spec_base["device"] == "cpu" and mlx_variant:
        runs.append(("paged-mlx", {"memory_budget": budget, "native": False}))
    # Without the native kernel (any GPU run) a "-mlx" variant is its twin without "-mlx" run again.
    names = {k for k, _ in sparse_runs}
    runs += [(k, {"memory_budget": budget, **o}) for k, o in sparse_runs
             if spec_base["device"] == "cpu" or k.replace("-mlx", "") not in names]
    all_rounds = []
    for rnd in range(rounds):
        rows = {}
        for label, opts in runs:
            print(f"[{name} round {rnd + 1}] {label} ...", file=sys.stderr, flush=True)
            opts = dict(opts)
            model = opts.pop("model", spec_base["model"])
            rows[label] = spawn({**spec_base, "label": label, "model": model,
                                 "options": {**spec_base["options"], **opts}})
            r = rows[label]
            print(f"[{name} round {rnd + 1}] {label}: {r.get('decode_tok_s_median', r.get('error'))} tok/s, "
                  f"{(r.get('bytes_per_token') or 0) / 1e6:.1f} MB/token, disk {r.get('disk_GBps_in_run')}",
                  file=sys.stderr, flush=True)
        all_rounds.append(rows)
    return summarize(all_rounds), all_rounds


def cpu_cell(cpu: Optional[dict]) -> str:
    return f"{cpu['busy']:.0%} / {cpu['steal']:.0%}" if cpu else ""


def probe_text(p: Optional[dict]) -> str:
    """What --pin-layout auto measured at load: the share of a probe step spent waiting on reads, the median
    step with the tail (and, when it tried it, the spread) layout, and its choice."""
    if not p:
        return "-"
    spread = f", spread {p['spread_step_s']} s" if "spread_step_s" in p else ""
    return f"(wait {p['read_wait_share']}, tail {p.get('tail_step_s')} s{spread} -> {p['chose']})"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Flash paging benchmark ({m['device']}, {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM)", "",
             f"Command: `{result['command']}`  ", f"Commit {m['commit']}, MLX {m['mlx']}, {m['platform']}  ",
             f"Load average (1/5/15 min) at start {result['load_start']}, end {result['load_end']}  ",
             f"Disk (direct I/O, GB/s) start: {result['disk_start']}  ", f"end: {result['disk_end']}", ""]
    for name, model in result["models"].items():
        lines += [f"## {name}: {model['description']}", "",
                  "| run | plan | tok/s (median) | MB read/token | read GB/s | I/O hidden | CPU busy / steal while "
                  "decoding | peak RSS growth MB | MLX peak MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in model["runs"].items():
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {label} | {r['plan']} | {r['decode_tok_s_median']:.2f} | "
                         f"{(r.get('bytes_per_token') or 0) / 1e6:.1f} | {r.get('read_GBps', 0):.2f} | "
                         f"{100 * r.get('io_overlap', 0):.0f}% | {cpu_cell(r.get('cpu_during_decode'))} | "
                         f"{r['peak_rss_growth_bytes'] / 1e6:.0f} | "
                         f"{r['mlx_peak_bytes'] / 1e6:.0f} |")
        lines += ["", "| goal check (medians over rounds) | tok/s | resident tok/s | I/O bound tok/s (disk measured "
                      "in the run, before and after decoding) | target = 80% of min | met (rounds met) | vs naive | "
                      "I/O bound from the reading before decoding only | I/O bound from the probe file |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for label, g in model["goals"].items():
            lines.append(f"| {label} | {g['tok_s']:.2f} | {g['resident_tok_s']} | {g['io_bound_tok_s']} "
                         f"({g['disk_measure']}) | {g['target_tok_s']} | {'yes' if g['met'] else 'no'} "
                         f"({g['met_rounds']}) | {g['vs_naive']}x | {g.get('before_bound_tok_s')} | "
                         f"{g.get('probe_bound_tok_s')} |")
        lines += ["", "tok/s of every round: " + ", ".join(f"{k} {v.get('rounds_tok_s')}"
                                                         for k, v in model["runs"].items())]
        probed = {k: v["rounds_layout_probe"] for k, v in model["runs"].items() if v.get("rounds_layout_probe")}
        if probed:
            lines += ["", "Pin layout chosen at load (`--pin-layout auto`), every round: " + "; ".join(
                f"{k} " + ", ".join(probe_text(p) for p in v) for k, v in probed.items())]
        if model.get("tokens_equal"):
            lines += ["", "Greedy tokens equal to the resident run's, leading count per round: " + "; ".join(
                f"{k} {v['equal_leading']} of {v['of']}" for k, v in model["tokens_equal"].items() if k != "resident")]
        if model.get("perplexity"):
            lines += ["", f"Perplexity: `{json.dumps(model['perplexity'])}`"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--models", default="synthetic,smollm2,smollm2-8bit", help="smollm2-8bit needs smollm2")
    p.add_argument("--work", default=str(ROOT / ".flash_bench"), help="where models and layouts are written")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per run (default 8 synthetic, 24 smollm2)")
    p.add_argument("--synthetic", default=SYNTHETIC_SHAPE, help="hidden,intermediate,layers")
    p.add_argument("--synthetic-budget", default=SYNTHETIC_BUDGET)
    p.add_argument("--relu-calibration-tokens", type=int, default=RELU_CALIBRATION_TOKENS,
                   help="synthetic-relu: calibration tokens for its predictors (fewer overfit: held-out recall "
                        "0.68 at 1024 against 0.93 at 4096 on a 4-layer version)")
    p.add_argument("--smollm2-budget-fraction", type=float, default=0.5)
    p.add_argument("--blocks-budget-fraction", type=float, default=BLOCKS_BUDGET_FRACTION,
                   help="smollm2-blocks budget, a fraction of its own fully resident size (at 0.5 the resident "
                        "part, two read units and the prompt scratch do not fit)")
    p.add_argument("--smollm2-resident", choices=("packed", "float32"), default="packed",
                   help="SmolLM2 fully resident as the GGUF's packed blocks (attention, tied embedding; computed by "
                        "ops/gguf_cpu.c) and the FFN as stored bundles (flash/native_ffn.c): the smallest and, on "
                        "the CPU, fastest resident form; or as float32 (the earlier runs). The budget is a "
                        "fraction of the fully resident model held that way")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="0: no perplexity (it does not depend on "
                                                                    "--smollm2-resident beyond float rounding)")
    p.add_argument("--tbt-tokens", type=int, default=192, help="tokens decoded one at a time for predictor ppl")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run")
    p.add_argument("--out", default=None)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(json.loads(args.run))))
        return 0

    import applelm  # noqa: F401
    import mlx.core as mx

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    from applelm.flash.budget import format_size, parse_size
    from applelm.loader import default_model_path, load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(__file__), "machine": machine(args.device), "load_start": machine_info.load_avg(), "models": {}}
    print("disk ...", file=sys.stderr, flush=True)
    result["disk_start"] = disk_speeds(work)
    base = {"device": args.device, "options": {"dtype": "float16"} if args.device == "gpu" else {},
            "probe": str(work / "disk_probe.bin")}
    models = args.models.split(",")

    if "smollm2" in models:
        layout, prep_s = smollm2_store(work, "smollm2_bf16")
        dequantize = args.smollm2_resident == "float32"
        # The native kernel is the CPU's; a GPU holds pinned layers as float16 in MLX.
        resident_options = {} if dequantize or args.device == "gpu" else {"native": True}
        full, _, _ = load_model(layout, **base["options"], dequantize=dequantize, **resident_options)
        full_bytes = full.flash.plan.total_bytes
        full.flash.close()
        budget = int(full_bytes * args.smollm2_budget_fraction)
        from applelm.flash.loader import flash_tokenizer

        spec = {**base, "model": str(layout), "tokens": args.tokens or 24,
                "prompt": flash_tokenizer(layout).encode(SMOL_PROMPT),
                "options": {**base["options"], "dequantize": dequantize}}
        # Resident gates (threshold mode; bfloat16 bytes with the kernel) need more than half: also at 60%, 75%.
        # Dense paging at 60% (at 75% every layer fits as stored bfloat16 bundles: nothing would stream).
        big = int(full_bytes * 0.75)
        rows, rounds = bench_model("smollm2", budget, spec, [
            ("sparse-predictor-0.5", {"sparsity": 0.5, "sparsity_mode": "predictor"}),
            ("sparse-predictor-0.5-mlx", {"sparsity": 0.5, "sparsity_mode": "predictor", "native": False}),
            ("sparse-predictor-0.5-mlx-lookahead", {"sparsity": 0.5, "sparsity_mode": "predictor", "native": False,
                                                    "lookahead": True}),
            ("sparse-predictor-0.5-lookahead", {"sparsity": 0.5, "sparsity_mode": "predictor", "lookahead": True}),
            ("sparse-threshold-0.5", {"sparsity": 0.5}),
            ("sparse-threshold-0.5@60%", {"sparsity": 0.5, "memory_budget": int(full_bytes * 0.6)}),
            ("sparse-threshold-0.5@75%", {"sparsity": 0.5, "memory_budget": big}),
            ("sparse-threshold-0.3@75%", {"sparsity": 0.3, "memory_budget": big}),
            ("paged@60%", {"memory_budget": int(full_bytes * 0.6)})], args.rounds, resident_options)
        result["models"]["smollm2"] = model_entry(
            rows, rounds,
            description=f"SmolLM2-135M-Instruct Q4_1 GGUF prepared as bfloat16 bundles; fully resident "
                        f"{format_size(full_bytes)} (resident part "
                        f"{'and FFN as float32' if dequantize else 'as packed GGUF blocks, FFN as stored bundles'}"
                        f"), budget "
                        f"{format_size(budget)} ({args.smollm2_budget_fraction:.0%})",
            prepare_s=round(prep_s, 1), resident_bytes=full_bytes, budget_bytes=budget)
        q8 = None
        if "smollm2-8bit" in models:
            # 8-bit bundles read about half the bfloat16 store's bytes per token. A 4-bit store re-quantizes
            # the Q4_1 weights along another axis: only its perplexity is measured (resident_4bit_store).
            q8, q8_prep_s = smollm2_store(work, "smollm2_q8")
            # With the kernel, resident gates stay as stored 8-bit bytes: threshold sparsity fits this budget.
            rows, rounds = bench_model("smollm2-8bit", budget, {**spec, "model": str(q8)},
                                       [("sparse-threshold-0.5", {"sparsity": 0.5}),
                                        ("sparse-threshold-0.5-lookahead", {"sparsity": 0.5, "lookahead": True}),
                                        ("sparse-threshold-0.7", {"sparsity": 0.7})], args.rounds,
                                       resident_options)
            result["models"]["smollm2-8bit"] = model_entry(
                rows, rounds,
                description=f"the same SmolLM2 prepared as 8-bit affine bundles (groups of 64 along the hidden "
                            f"axis, float16 scale and bias); same budget {format_size(budget)}; its perplexity "
                            f"is in the smollm2 entry (resident_8bit_store)",
                prepare_s=round(q8_prep_s, 1), resident_bytes=full_bytes, budget_bytes=budget)
        result["models"]["smollm2"]["perplexity"] = None
        if args.ppl_tokens:  # the float16 and 4-bit stores exist for these scores only
            t16, _ = prepared(default_model_path(), work / "smollm2_f16", bits=16, dtype="float16",
                              train_predictors=False)
            stores = {}
            if q8:
                q4, _ = prepared(default_model_path(), work / "smollm2_q4", bits=4, train_predictors=False)
                stores = {"8bit": q8, "4bit": q4}
            print("perplexity ...", file=sys.stderr, flush=True)
            result["models"]["smollm2"]["perplexity"] = perplexities(t16, layout, args.ppl_tokens, args.tbt_tokens,
                                                                     [0.3, 0.5, 0.7], stores)

    if "smollm2-blocks" in models:
        # The GGUF's own Q4_1 blocks (prepare --gguf-blocks): a third of the bfloat16 store's bytes. Whole
        # layers page (no sparsity on this store); beside it the plain GGUF file, loaded as it is.
        from applelm.flash.loader import flash_tokenizer

        layout, prep_s = smollm2_store(work, "smollm2_blocks")
        full_bytes, minimum = resident_size(layout, **base["options"])
        budget = int(full_bytes * args.blocks_budget_fraction)
        _, _, shared = smollm2_stores(work, base["options"] if args.device == "gpu" else None)
        spec = {**base, "model": str(layout), "tokens": args.tokens or 24,
                "prompt": flash_tokenizer(layout).encode(SMOL_PROMPT), "options": dict(base["options"])}
        rows, rounds = bench_model("smollm2-blocks", budget, spec, [
            ("paged@55%", {"memory_budget": int(full_bytes * 0.55)}),  # just above the minimum: all layers stream
            ("paged@smollm2-budget", {"memory_budget": shared}),
            ("plain-gguf", {"model": str(default_model_path()), "memory_budget": None})], args.rounds,
            mlx_variant=False)
        result["models"]["smollm2-blocks"] = model_entry(
            rows, rounds,
            description=f"the same SmolLM2 prepared with --gguf-blocks (FFN as the file's Q4_1 blocks, one "
                        f"chunk per layer); fully resident {format_size(full_bytes)}, budget "
                        f"{format_size(budget)} ({args.blocks_budget_fraction:.0%}); paged@55%: every layer "
                        f"streamed; paged@smollm2-budget: "
                        f"the smollm2 entries' budget {format_size(shared)}; plain-gguf: the GGUF file "
                        f"without a flash layout",
            prepare_s=round(prep_s, 1), resident_bytes=full_bytes, resident_part_bytes=minimum,
            budget_bytes=budget)

    if "synthetic" in models:
        hidden, inter, layers = (int(v) for v in args.synthetic.split(","))
        cfg = synthetic_config(hidden, inter, layers)
        src = write_synthetic(work / f"synthetic_{hidden}_{inter}_{layers}", cfg)
        ids, prompt = synthetic_prompt(cfg["vocab_size"])
        layout, prep_s = prepared(src, work / synthetic_layout_name(hidden, inter, layers), bits=16, dtype="bfloat16",
                                  train_predictors=True, calibration_ids=ids, calibration_tokens=128,
                                  predictor_rank=32)
        budget = parse_size(args.synthetic_budget)
        spec = {**base, "model": str(layout), "tokens": args.tokens or 8, "prompt": prompt,
                "options": dict(base["options"])}
        rows, rounds = bench_model("synthetic", budget, spec, [
            ("sparse-predictor-0.5", {"sparsity": 0.5, "sparsity_mode": "predictor"}),
            ("sparse-predictor-0.5-mlx", {"sparsity": 0.5, "sparsity_mode": "predictor", "native": False}),
            ("sparse-predictor-0.5-mlx-lookahead", {"sparsity": 0.5, "sparsity_mode": "predictor", "native": False,
                                                    "lookahead": True}),
            ("sparse-predictor-0.5-lookahead", {"sparsity": 0.5, "sparsity_mode": "predictor", "lookahead": True}),
            ("sparse-threshold-0.5", {"sparsity": 0.5})], args.rounds)
        from applelm.flash.layout import read_layout

        lay = read_layout(layout)
        result["models"]["synthetic"] = model_entry(
            rows, rounds,
            description=f"random Llama ({hidden} hidden, {inter} intermediate, {layers} layers, GQA 4:1, vocab "
                        f"32000), FFN {format_size(lay.ffn_bytes)} in bfloat16 bundles + resident "
                        f"{format_size(lay.index['resident']['n_bytes'])} on disk; budget {args.synthetic_budget}",
            prepare_s=round(prep_s, 1), budget_bytes=budget)

    if "synthetic-relu" in models:
        hidden, inter, layers = (int(v) for v in args.synthetic.split(","))
        layout, prep_s, ids = relu_store(work, args.synthetic, args.relu_calibration_tokens)
        budget = parse_size(args.synthetic_budget)
        from applelm.flash.layout import read_layout

        lay = read_layout(layout)
        zeros = lay.index["sparsity"]["zero_fraction"]
        level = relu_level(lay)
        spec = {**base, "model": str(layout), "tokens": args.tokens or 8, "prompt": ids[:16],
                "options": dict(base["options"])}
        sparse = {"sparsity": level, "sparsity_mode": "predictor"}
        rows, rounds = bench_model("synthetic-relu", budget, spec, [
            (f"sparse-predictor-{level}", sparse),
            (f"sparse-predictor-{level}-mlx", {**sparse, "native": False}),
            (f"sparse-predictor-{level}-mlx-lookahead", {**sparse, "native": False, "lookahead": True}),
            (f"sparse-predictor-{level}-lookahead", {**sparse, "lookahead": True})], args.rounds)
        pr = lay.index["predictors"]
        result["models"]["synthetic-relu"] = model_entry(
            rows, rounds,
            description=f"random gated-ReLU Llama of the synthetic model's shape ({hidden} hidden, {inter} "
                        f"intermediate, {layers} layers), built to have a ReLU LLM's activation statistics "
                        f"(write_synthetic: ~89% of neurons off, rank-{RELU_GATE_RANK} gates a low-rank "
                        f"predictor can learn, skewed neuron frequencies); its tokens mean nothing, it "
                        f"measures the paging. FFN {format_size(lay.ffn_bytes)} in bfloat16 bundles; budget "
                        f"{args.synthetic_budget}; natural sparsity (exact zeros) {min(zeros):.3f}-"
                        f"{max(zeros):.3f} by layer; predictors (rank {pr['rank']}, {len(ids)} calibration "
                        f"tokens): held-out recall {pr['mean_recall']:.3f} reading "
                        f"{pr['mean_predicted_fraction']:.3f} of neurons; sparse runs at sparsity {level}",
            prepare_s=round(prep_s, 1), budget_bytes=budget, natural_sparsity=zeros)

    result["disk_end"] = disk_speeds(work)
    result["load_end"] = machine_info.load_avg()
    machine_info.write_results(result, markdown(result), args.out, "flash_bench", args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
