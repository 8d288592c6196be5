"""Flash paging on a GPU: paged output equals resident output (the CPU tests' checks, on MLX's GPU).

The code paths only a CUDA GPU takes: streamed units moved to the device in bulk (flash/cuda_prefetch.py),
neuron caches written through MLX instead of host views, misses decoded on the device. On tiny random
models from the test suite (llama and gemma3, float32 store, float32 compute), for each of resident,
dense paging (several units per layer, half the layers streamed), naive loading, and threshold-sparse
decoding (window 2, a cache too small for a token's neurons) against the same decode with every neuron
cached and against the masks applied densely in one pass, and with lookahead reads against without:
max |logit difference| and greedy tokens. Then the GGUF-blocks store (prepare --gguf-blocks) of a tiny
6-layer GGUF (Q5_0 up, Q8_0 down, Q4_1 gate): resident, streamed and naive against the plain GGUF model
(on the CPU they are equal bit for bit; on the GPU each streamed chunk is an MLX copy into the GGUF matmuls).
Where the embedded SmolLM2 is installed (benchmarks/gpu_smollm2.sh carries it to the GPU machine), the same
on its real Q4_1 weights: the GGUF-blocks store against the plain GGUF model and its bfloat16 store paged
against fully resident. Exit 1 when a check fails.

    python benchmarks/flash_gpu_check.py [--device gpu|cpu] [--no-smollm2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the suite's tiny models and flash fixtures


def check(arch: str, root: Path) -> dict:
    import mlx.core as mx
    import numpy as np

    from applelm.cache import make_prompt_cache
    from applelm.flash.budget import ahead_buffer
    from applelm.loader import load_model
    from flash_fixtures import greedy, streaming_budget, tiny_flash

    x = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    prompt = [5, 7, 11]
    _, _, out = tiny_flash(root, arch, bits=32, predictors=False)
    resident, _, _ = load_model(out, dtype="float32")
    paged, _, _ = load_model(out, dtype="float32", memory_budget=streaming_budget(out, dtype="float32", max_unit_bytes=16384),
                             max_unit_bytes=16384)
    naive, _, _ = load_model(out, dtype="float32", memory_budget=10**9, naive=True, max_unit_bytes=16384)
    ref = np.array(resident(x))
    want = greedy(resident, prompt, 12)
    result = {"prefetch": paged.flash.prefetch.available or paged.flash.prefetch.error}
    for name, m in (("paged", paged), ("naive", naive)):
        result[name] = {"max_abs_diff": float(np.abs(np.array(m(x)) - ref).max()),
                        "greedy_equal": greedy(m, prompt, 12) == want, "prefetch_calls": m.flash.prefetch.calls}
    # Sparse decoding token by token against one forward pass applying each position's mask.
    full, _, _ = load_model(out, dtype="float32", sparsity=0.5, max_unit_bytes=4096)
    small_budget = full.flash.plan.total_bytes - full.flash.plan.cache_bytes + full.flash.plan.cache_bytes // 3
    # native=False: on the CPU (--device cpu) too, the MLX path a GPU takes, without lookahead unless asked.
    small, _, _ = load_model(out, dtype="float32", sparsity=0.5, window=2, max_unit_bytes=4096,
                             memory_budget=small_budget, native=False, lookahead=False)
    dense = np.array(full(x))[0]

    def token_by_token(m):
        cache = make_prompt_cache(m)
        return np.stack([np.array(m(x[:, i: i + 1], cache=cache))[0, 0] for i in range(x.shape[1])])

    steps = token_by_token(small)
    # With lookahead (off by default on the GPU) and the same cache capacity (its two buffers added to the
    # budget): the same logits, some misses taken from the buffers read ahead.
    extra = 2 * ahead_buffer(small.flash.geometry, 2)[1]  # threshold mode reads 2 parts a neuron
    ahead, _, _ = load_model(out, dtype="float32", sparsity=0.5, window=2, max_unit_bytes=4096,
                             memory_budget=small_budget + extra, native=False, lookahead=True)
    ahead_steps = token_by_token(ahead)
    # The same decode with every neuron cached (no evictions, no slot moves, no overflow): any difference
    # from `steps` comes from the small cache's bookkeeping, not from the GPU's arithmetic.
    full_steps = token_by_token(full)
    result["sparse"] = {"max_abs_diff": float(np.abs(steps - dense).max()),
                        "max_abs_diff_vs_full_cache": float(np.abs(steps - full_steps).max()),
                        "full_cache_vs_prompt": float(np.abs(full_steps - dense).max()),
                        "host_views": small.layers[0].mlp._cache.rows is not None,
                        "neurons_read_per_token": small.flash.report().get("neurons_read_per_token"),
                        "lookahead_max_abs_diff": float(np.abs(ahead_steps - steps).max()),
                        "lookahead_same_capacity": ahead.flash.plan.cache_capacity == small.flash.plan.cache_capacity,
                        "lookahead_used_share": ahead.flash.report().get("ahead_used_share")}
    for m in (resident, paged, naive, full, small, ahead):
        m.flash.close()
    # float32 matmuls on a GPU may round like TF32 (~1e-3 relative): a gate that close to its threshold
    # can flip a neuron between two equally valid computations, so the bound is loose.
    result["ok"] = bool(all(result[k]["greedy_equal"] and result[k]["max_abs_diff"] < 1e-2 for k in ("paged", "naive"))
                        and result["sparse"]["max_abs_diff_vs_full_cache"] < 1e-2
                        and result["sparse"]["lookahead_max_abs_diff"] < 1e-2 and result["sparse"]["lookahead_same_capacity"]
                        and (result["sparse"]["lookahead_used_share"] or 0) > 0)
    return result


def against(reference, runs: dict, x, prompt: list[int], tokens: int) -> tuple[dict, list[int]]:
    """Each of runs {name: (flash folder, load options)} against `reference`: its plan, whether its greedy
    tokens from `prompt` equal the reference's, and max |logit difference| on `x`; and the reference tokens."""
    import mlx.core as mx
    import numpy as np

    from applelm.loader import load_model
    from flash_fixtures import greedy

    ref, want = np.array(reference(x).astype(mx.float32)), greedy(reference, prompt, tokens)
    out = {}
    for name, (path, opts) in runs.items():
        m, _, _ = load_model(path, **opts)
        out[name] = {"plan": m.flash.plan.describe(), "max_abs_diff": float(np.abs(np.array(m(x).astype(mx.float32)) - ref).max()),
                     "greedy_equal": greedy(m, prompt, tokens) == want}
        m.flash.close()
    return out, want


def check_blocks(root: Path) -> dict:
    import mlx.core as mx

    try:
        from gguf_fixtures import Q, write_tiny_llama_gguf
    except ImportError as e:  # the gguf package writes the tiny file
        return {"ok": True, "skipped": f"no tiny GGUF writer here ({e})"}
    from applelm.flash.prepare import prepare
    from applelm.loader import load_model
    from flash_fixtures import streaming_budget

    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.gguf"
    write_tiny_llama_gguf(path, types={"ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "ffn_gate": Q.Q4_1}, num_hidden_layers=6)
    out = prepare(path, root / "blocks", gguf_blocks=True, show_progress=False)
    plain, _, _ = load_model(path)
    budget = streaming_budget(out, ring=2)  # 3 of the 6 layers pinned
    x = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    result, _ = against(plain, {"resident": (out, {}), "streamed": (out, {"memory_budget": budget, "ring_depth": 2}),
                                "naive": (out, {"memory_budget": budget, "naive": True})}, x, [5, 7, 11], 12)
    result["ok"] = all(r["greedy_equal"] and r["max_abs_diff"] < 1e-3 for r in result.values())
    return result


def check_smollm2(root: Path, tokens: int = 16) -> dict:
    """The embedded SmolLM2 (real Q4_1 weights) where it is installed (on the GPU machine: after
    benchmarks/gpu_smollm2.sh unpack): its GGUF-blocks store resident, half streamed and naive against the
    plain GGUF model, and its bfloat16 store paged against the same store fully resident; greedy tokens
    from a chat prompt and the first forward pass's logits."""
    import mlx.core as mx

    from applelm.errors import UserError
    from applelm.flash.loader import flash_tokenizer
    from applelm.flash.prepare import prepare
    from applelm.loader import default_model_path, load_model
    from flash_fixtures import streaming_budget

    try:
        gguf = default_model_path()
    except UserError as e:
        return {"ok": True, "skipped": str(e)}
    blocks = prepare(gguf, root / "blocks", gguf_blocks=True, show_progress=False)
    bf16 = prepare(gguf, root / "bf16", bits=16, dtype="bfloat16", train_predictors=False, show_progress=False)
    prompt = flash_tokenizer(blocks).encode("The capital of France is")
    x = mx.array([prompt])

    def compare(reference, runs: dict) -> dict:
        out, want = against(reference, runs, x, prompt, tokens)
        return {**out, "reference_tokens": want}

    plain, _, _ = load_model(gguf)
    half = streaming_budget(blocks, ring=2)
    result = {"gguf": str(gguf), "blocks_vs_gguf": compare(plain, {
        "resident": (blocks, {}), "streamed": (blocks, {"memory_budget": half, "ring_depth": 2}),
        "naive": (blocks, {"memory_budget": half, "naive": True})})}
    resident, _, _ = load_model(bf16)
    half = streaming_budget(bf16)
    result["bf16_vs_resident"] = compare(resident, {"paged": (bf16, {"memory_budget": half}),
                                                    "naive": (bf16, {"memory_budget": half, "naive": True})})
    resident.flash.close()
    # Greedy tokens must match; logits within float rounding of a real model's range (~±30).
    result["ok"] = all(r["greedy_equal"] and r["max_abs_diff"] < 0.1 for part in ("blocks_vs_gguf", "bf16_vs_resident")
                       for k, r in result[part].items() if k != "reference_tokens")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--out", default=None)
    p.add_argument("--no-smollm2", action="store_true", help="skip the embedded SmolLM2 even where it is installed")
    args = p.parse_args()
    import applelm  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    with tempfile.TemporaryDirectory() as tmp:
        results = {arch: check(arch, Path(tmp) / arch) for arch in ("llama", "gemma3")}
        results["gguf_blocks"] = check_blocks(Path(tmp) / "blocks")
        if not args.no_smollm2:
            results["smollm2"] = check_smollm2(Path(tmp) / "smollm2")
    results["device"] = str(mx.default_device())
    results["mlx"] = mx.__version__
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(r["ok"] for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
