"""BatchKVCache: rows prefilled apart, merged into a running batch, and filtered out as they finish
decode exactly what each sequence decodes alone, on every architecture (Gemma 3's sliding layers too)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from applelm.batch_cache import BatchKVCache, filter_caches, make_batch_cache, merge_caches
from applelm.cache import make_prompt_cache
from conftest import ARCHS, TINY_CONFIGS, build_tiny

LENGTHS = (9, 3, 14, 6)  # 14 > Gemma's tiny sliding window of 5


def greedy_alone(model, prompt: list[int], steps: int) -> list[int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        out.append(int(mx.argmax(logits, -1).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


def prefill_batch(model, prompts: list[list[int]]):
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    cache = make_batch_cache(model, pads)
    logits = model(mx.array([[0] * d + p for d, p in zip(pads, prompts)]), cache=cache)[:, -1]
    return cache, mx.argmax(logits, -1).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_filter_keep_every_row_exact(arch):
    model, _ = build_tiny(arch)
    rng = np.random.default_rng(0)
    vocab = TINY_CONFIGS[arch]["vocab_size"]
    prompts = [rng.integers(0, vocab, n).tolist() for n in LENGTHS]
    budget = [8, 5, 8, 3]  # rows finish at different steps and leave the batch
    expected = [greedy_alone(model, p, b) for p, b in zip(prompts, budget)]

    cache, first = prefill_batch(model, prompts[:2])
    rows, outs = [0, 1], {0: [first[0]], 1: [first[1]]}
    for step in range(20):
        if step == 2:  # two more requests join the running batch
            new_cache, new_first = prefill_batch(model, prompts[2:])
            cache = merge_caches(cache, new_cache)
            rows += [2, 3]
            outs.update({2: [new_first[0]], 3: [new_first[1]]})
        keep = [i for i, r in enumerate(rows) if len(outs[r]) < budget[r]]
        if len(keep) < len(rows):
            cache = filter_caches(cache, keep)
            rows = [rows[i] for i in keep]
        if not rows:
            break
        assert step < 19
        logits = model(mx.array([[outs[r][-1]] for r in rows]), cache=cache)[:, -1]
        for r, t in zip(rows, mx.argmax(logits, -1).tolist()):
            outs[r].append(t)
    assert [outs[i] for i in range(4)] == expected


def test_filter_drops_shared_padding_and_keeps_positions():
    model, _ = build_tiny("llama")
    cache, _ = prefill_batch(model, [[5] * 12, [6] * 3])
    assert cache[0].columns == 12 and cache[0].left_padding.tolist() == [0, 9]
    kept = filter_caches(cache, [1])
    assert kept[0].columns == 3 and kept[0].left_padding.tolist() == [0]
    assert kept[0].offset.tolist() == [3]  # RoPE position: the row's own length
    assert filter_caches(cache, []) is None


def test_merge_pads_the_shorter_side():
    a, b = BatchKVCache([0]), BatchKVCache([2, 0])
    a.update_and_fetch(mx.ones((1, 1, 4, 2)), mx.ones((1, 1, 4, 2)))
    b.update_and_fetch(mx.ones((2, 1, 7, 2)), mx.ones((2, 1, 7, 2)))
    merged = merge_caches([a], [b])[0]
    assert merged.columns == 7 and merged.left_padding.tolist() == [3, 2, 0]
    assert merged.offset.tolist() == [4, 5, 7]
    assert merged.make_mask(1).shape == (3, 1, 1, 8)
