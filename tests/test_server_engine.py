"""The continuous-batching worker: batched output equals single-request output, per-request sampling,
stop strings, lengths, cancellation and the bounded queue."""

from __future__ import annotations

import time

import pytest

from applelm.batch_engine import BatchEngine, EngineUnavailable, QueueFull, Request, SamplingParams
from applelm.generation import stream_generate
from conftest import ARCHS, build_tiny
from server_fixtures import FakeTokenizer, GatedModel, collect, running, tiny_engine

PROMPTS = ["hello", "the quick brown fox jumps", "a", "over the lazy dog, and then some more text"]


def single(model, tok, prompt: str, **kw) -> tuple[str, str]:
    text, last = "", None
    for last in stream_generate(model, tok, prompt, **kw):
        text += last.text
    return text, last.finish_reason


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_of_four_equals_singles(arch):
    """Four prompts of different lengths, two joining while the first two decode, give the tokens each
    gives alone through stream_generate."""
    model, _ = build_tiny(arch)
    tok = FakeTokenizer()
    expected = [single(model, tok, p, max_tokens=24) for p in PROMPTS]
    with running(BatchEngine(lambda: (model, tok), max_batch=8, context_length=256).start()) as engine:
        first = [engine.submit(Request(tok.encode(p), 24)) for p in PROMPTS[:2]]
        while engine.steps < 3:
            time.sleep(0.001)
        later = [engine.submit(Request(tok.encode(p), 24)) for p in PROMPTS[2:]]
        got = [collect(r) for r in first + later]
        assert engine.max_active_seen == 4 or all(e.finish_reason == "stop" for _, e in got)
    for (text, ev), (want_text, want_reason) in zip(got, expected):
        assert (text, ev.finish_reason) == (want_text, want_reason)


def test_usage_counts_and_length():
    with running(tiny_engine()) as engine:
        tok = engine.tokenizer
        req = engine.submit(Request(tok.encode("hi there"), 7, ignore_eos=True))
        text, ev = collect(req)
        assert ev.finish_reason == "length"
        assert (ev.prompt_tokens, ev.completion_tokens) == (len(tok.encode("hi there")), 7)
        assert len(text) == 7  # one character per token


def test_context_window_caps_length():
    with running(tiny_engine(context_length=20)) as engine:
        req = engine.submit(Request(list(range(3, 18)), 100, ignore_eos=True))  # 15 prompt tokens
        _, ev = collect(req)
        assert (ev.finish_reason, ev.completion_tokens) == ("length", 5)
        too_long = engine.submit(Request(list(range(3, 23)), 5))
        _, ev = collect(too_long)
        assert ev.finish_reason == "error" and "prompt" in ev.error


def test_stop_string_cuts_text():
    model, _ = build_tiny("llama")
    tok = FakeTokenizer()
    full, _ = single(model, tok, "hello", max_tokens=24)
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    with running(BatchEngine(lambda: (model, tok), context_length=256).start()) as engine:
        text, ev = collect(engine.submit(Request(tok.encode("hello"), 24, stop=["zzz", stop])))
    assert (text, ev.finish_reason) == (full[:5], "stop")
    assert single(model, tok, "hello", max_tokens=24, stop=[stop]) == (full[:5], "stop")


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch():
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    with running(tiny_engine(max_batch=8)) as engine:
        tok = engine.tokenizer
        alone, _ = collect(engine.submit(Request(tok.encode("seeded"), 16, sampling, ignore_eos=True)))
        reqs = [engine.submit(Request(tok.encode(p), 16, SamplingParams(temperature=1.0), ignore_eos=True))
                for p in PROMPTS]
        batched = engine.submit(Request(tok.encode("seeded"), 16, sampling, ignore_eos=True))
        greedy_row = engine.submit(Request(tok.encode("seeded"), 16, ignore_eos=True))
        in_batch, _ = collect(batched)
        others = [collect(r)[0] for r in reqs]
        greedy_text, _ = collect(greedy_row)
        other_seed, _ = collect(engine.submit(Request(tok.encode("seeded"), 16, SamplingParams(1.0, seed=99),
                                                      ignore_eos=True)))
    assert alone == in_batch
    assert other_seed != alone
    assert len(set(others)) > 1 and greedy_text != alone


def test_cancel_frees_the_slot_at_once():
    with running(tiny_engine()) as engine:
        tok = engine.tokenizer
        keep = engine.submit(Request(tok.encode("keep going"), 200, ignore_eos=True))
        gone = engine.submit(Request(tok.encode("cancel me"), 200, ignore_eos=True))
        while engine.active_count < 2:
            time.sleep(0.001)
        gone.cancel()
        deadline = time.monotonic() + 2
        while engine.active_count != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.active_count == 1
        assert collect(gone)[1].finish_reason == "cancelled"
        keep.cancel()
        assert collect(keep)[1].finish_reason == "cancelled"


def test_queue_full_and_not_ready():
    gated = None

    def load():
        nonlocal gated
        gated = GatedModel(build_tiny("llama")[0])
        return gated, FakeTokenizer()

    engine = BatchEngine(load, max_batch=1, max_queue=1, context_length=64)
    with pytest.raises(EngineUnavailable):
        engine.submit(Request([3, 4], 2))
    with running(engine.start()):
        busy = engine.submit(Request([3, 4], 2))
        assert gated.entered.wait(10)  # the worker is inside the first prefill
        waiting = engine.submit(Request([3, 5], 2))
        with pytest.raises(QueueFull):
            engine.submit(Request([3, 6], 2))
        gated.gate.set()
        assert collect(busy)[1].finish_reason in ("stop", "length")
        assert collect(waiting)[1].finish_reason in ("stop", "length")


def test_load_failure_is_reported():
    def fail():
        from applelm.errors import UserError
        raise UserError("model path 'nope' does not exist")

    engine = BatchEngine(fail).start()
    assert engine.loaded.wait(10)
    assert not engine.ready and engine.load_error == "model path 'nope' does not exist"
    with pytest.raises(EngineUnavailable):
        engine.submit(Request([3], 1))
