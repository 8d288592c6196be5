"""Prompt prefix reuse (applelm/prompt_cache.py and the server engine's use of it): what is matched, stored
and dropped; that rows started from stored keys and values compute what they compute from scratch; and
what clients see (usage.prompt_tokens_details.cached_tokens, /health, the CLI option)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import urllib.request

import mlx.core as mx
import numpy as np
import pytest

from applelm.batch_engine import BatchEngine, Request, _Row
from applelm.generation import stream_generate
from applelm.prompt_cache import PromptCache, shared_prefix
from conftest import ARCHS, build_tiny
from server_fixtures import FakeTokenizer, collect, live_server, running, tiny_engine

SYSTEM = "system: you are a small model that answers in a few words.\n"


def kv(n: int, layers: int = 2, heads: int = 2, dim: int = 4, seed: int = 0) -> list:
    mx.random.seed(seed)
    return [(mx.random.normal((1, heads, n, dim)), mx.random.normal((1, heads, n, dim))) for _ in range(layers)]


def test_shared_prefix():
    a = np.array([1, 2, 3, 4])
    assert [shared_prefix(a, np.array(b)) for b in ([1, 2, 3, 4], [1, 2, 9], [5], [], [1, 2, 3, 4, 5])] == [
        4, 2, 0, 0, 4]


def test_match_picks_the_longest_shared_prefix():
    pc = PromptCache(1 << 20)
    long_kv = kv(4, seed=1)
    pc.add([1, 2, 3, 4], long_kv)
    pc.add([1, 2, 9], kv(3, seed=2))
    n, entry = pc.match([1, 2, 3, 7, 8])
    assert n == 3 and entry.tokens.tolist() == [1, 2, 3, 4]
    first = pc.layers(entry, 2)
    assert all(k.shape == (1, 2, 2, 4) and mx.array_equal(k, lk[:, :, :2]) and mx.array_equal(v, lv[:, :, :2])
               for (k, v), (lk, lv) in zip(first, long_kv))
    assert pc.match([5, 1, 2]) == (0, None)
    assert pc.stats()["lookups"] == 2 and pc.stats()["hits"] == 1


def test_add_skips_covered_prompts_and_replaces_extended_ones():
    pc = PromptCache(1 << 20)
    assert pc.add([1, 2, 3], kv(3))
    assert not pc.add([1, 2], kv(2))  # [1, 2, 3] already holds it
    assert not pc.add([1, 2, 3], kv(3))
    assert pc.add([1, 2, 3, 4], kv(4))  # extends the stored prompt: that one goes
    assert len(pc) == 1 and pc.match([1, 2, 3, 4])[1].tokens.tolist() == [1, 2, 3, 4]
    assert pc.nbytes == 2 * 2 * (1 * 2 * 4 * 4) * 4  # layers x (k, v) x elements x float32 bytes
    with pytest.raises(ValueError, match="one key and value per prompt token"):
        pc.add([1, 2], kv(3))


def test_least_recently_used_goes_first_beyond_the_budget():
    one = sum(k.nbytes + v.nbytes for k, v in kv(3))
    pc = PromptCache(int(2.5 * one))
    pc.add([1, 1, 1], kv(3))
    pc.add([2, 2, 2], kv(3))
    pc.match([1, 1, 1])  # now [2, 2, 2] is the least recently used
    pc.add([3, 3, 3], kv(3))
    assert len(pc) == 2 and pc.nbytes == 2 * one
    assert pc.match([2, 2, 2]) == (0, None)
    assert pc.match([1, 1, 1])[0] == 3 and pc.match([3, 3, 3])[0] == 3
    assert not PromptCache(one - 1).add([1, 1, 1], kv(3))  # larger than the whole budget: not stored
    with pytest.raises(ValueError):
        PromptCache(-1)


def test_entries_do_not_keep_the_batch_cache_alive():
    """An entry cut from a big batch cache is a copy: the big buffer is freed when the batch drops it."""
    big = mx.random.normal((4, 2, 2048, 256))
    mx.eval(big)
    pc = PromptCache(1 << 20)
    pc.add(list(range(16)), [(big[1:2, :, 100:116], big[2:3, :, 100:116])])
    before = mx.get_active_memory()
    del big
    gc.collect()
    assert before - mx.get_active_memory() >= 4 * 2 * 2048 * 256 * 4
    assert pc.nbytes == 2 * (2 * 16 * 256 * 4)


def admitted(engine: BatchEngine, prompts: list[list[int]]):
    """Admit `prompts` as one wave in this thread, as the worker does: (last-position logits, cached tokens
    per row, the logits of one more decode step fed token 5)."""
    rows = [_Row(Request(p, 4), engine.tokenizer, 4) for p in prompts]
    logits, cache = engine._prefill_rows(rows)
    step = engine.model(mx.full((len(rows), 1), 5, dtype=mx.int32), cache=cache)[:, -1, :]
    return logits, [r.cached for r in rows], step


def bare_engine(model, prompt_cache_bytes: int) -> BatchEngine:
    engine = BatchEngine(lambda: None, prompt_cache_bytes=prompt_cache_bytes)
    engine.model, engine.tokenizer, engine.context_length = model, FakeTokenizer(), 256
    return engine


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_from_the_prompt_cache_compute_what_a_full_prefill_does(arch):
    """A wave mixing rows that share a stored prefix (of different lengths, one equal to a stored prompt)
    with a row that shares nothing gives the logits of the same wave prefilled from scratch, at the
    first token and at the next decode step (so positions and padding of the reused part are right)."""
    model, _ = build_tiny(arch)
    tok = FakeTokenizer()
    first = tok.encode(SYSTEM + "user: hello\n")
    wave = [tok.encode(SYSTEM + "user: what is the sea made of?\n"), first, tok.encode("zebra"),
            tok.encode(SYSTEM + "u")]
    reuse, scratch = bare_engine(model, 1 << 20), bare_engine(model, 0)
    admitted(reuse, [first])
    got, cached, got_step = admitted(reuse, wave)
    want, none, want_step = admitted(scratch, wave)
    # The longest part not in the cache (the first row's question) runs for every row;
    # "zebra" shares only BOS and is shorter, so all of it runs.
    run = len("what is the sea made of?\n")
    assert cached == [len(p) - run for p in wave[:2]] + [0, len(wave[3]) - run] and none == [0] * 4
    assert cached[0] == len(tok.encode(SYSTEM + "user: "))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(got_step), np.array(want_step), atol=2e-4, rtol=1e-4)
    assert reuse.prompt_cache.stats()["reused_tokens"] == sum(cached)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_engine_with_reuse_generates_what_stream_generate_does(arch):
    """Greedy requests sharing a system prompt, one at a time and then together, through the running
    engine: each gets stream_generate's text, and reports the prompt tokens it took from the cache."""
    model, _ = build_tiny(arch)
    tok = FakeTokenizer()
    prompts = [SYSTEM + q for q in ("user: hello\n", "user: the quick brown fox\n", "user: a\n", "user: why?\n")]
    expected = []
    for p in prompts:
        text = "".join(r.text for r in stream_generate(model, tok, p, max_tokens=16))
        expected.append(text)
    with running(BatchEngine(lambda: (model, tok), max_batch=8, context_length=256).start()) as engine:
        alone = []
        for p in prompts[:2]:
            req = engine.submit(Request(tok.encode(p), 16))
            alone.append(collect(req))
        together = [collect(r) for r in [engine.submit(Request(tok.encode(p), 16)) for p in prompts]]
    assert [t for t, _ in alone] == expected[:2] and [t for t, _ in together] == expected
    assert alone[0][1].cached_tokens == 0
    assert alone[1][1].cached_tokens == len(tok.encode(SYSTEM + "user: "))
    assert all(ev.cached_tokens >= len(tok.encode(SYSTEM)) for _, ev in together)


def test_reuse_off_reports_no_cached_tokens():
    with running(tiny_engine(prompt_cache_bytes=0)) as engine:
        tok = engine.tokenizer
        for _ in range(2):
            _, ev = collect(engine.submit(Request(tok.encode(SYSTEM), 3)))
            assert ev.cached_tokens == 0
        assert engine.prompt_cache is None


def test_usage_and_health_report_the_prompt_cache():
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "temperature": 0}
    with live_server(tiny_engine()) as (url, _):
        def post() -> dict:
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req, timeout=30))["usage"]

        first, second = post(), post()
        health = json.load(urllib.request.urlopen(url + "/health", timeout=30))
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": second["prompt_tokens"] - 1}
    stats = health["prompt_cache"]
    assert stats["entries"] == 1 and stats["hits"] == 1 and stats["reused_tokens"] == second["prompt_tokens"] - 1
    assert 0 < stats["bytes"] <= stats["max_bytes"] == 256 << 20


def test_cli_rejects_a_negative_prompt_cache_size():
    result = subprocess.run([sys.executable, "-m", "applelm.server", "--prompt-cache-mb", "-1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--prompt-cache-mb" in result.stderr and "must be >= 0" in result.stderr
