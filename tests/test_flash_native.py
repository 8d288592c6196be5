"""The native CPU kernel for streamed FFN units (applelm/flash/native_ffn.c) against a float64 numpy
reference over every store format, group size, activation and thread count, and end to end: paging with
the kernel decodes the same tokens as the MLX path and as the fully resident model."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from applelm import native_build
from applelm.errors import UserError
from applelm.flash import native
from applelm.flash.codec import BundleCodec
from applelm.loader import load_model
from flash_fixtures import greedy, streaming_budget, tiny_flash

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="needs a C compiler")

STORES = [(32, "float32", None), (16, "float16", None), (16, "bfloat16", None),
          (8, "affine", 32), (8, "affine", 64), (4, "affine", 32), (4, "affine", 64)]
MLX_ACT = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "relu": nn.relu}


def codec_for(hidden, bits, dtype, group):
    return BundleCodec(hidden, bits, dtype, group)


def reference(codec, raw, x, act):
    """out = sum_i act(gate_i . x) (up_i . x) down_i in float64 from the numpy decoder, with the model's
    own MLX activation (so the kernel's activation is checked against what the resident model uses)."""
    v = codec.decode_np(raw, 3).astype(np.float64)
    up, gate = v[:, 0] @ x, v[:, 2] @ x
    a = np.array(MLX_ACT[act](mx.array(gate.astype(np.float32))), np.float64) * up
    return a @ v[:, 1]


@pytest.fixture(scope="module")
def lib():
    lib = native.load()
    if lib is None:
        pytest.fail("a C compiler is present but the native kernel did not build")
    return lib


@pytest.mark.parametrize("bits,dtype,group", STORES, ids=[f"{b}-{d}-{g}" for b, d, g in STORES])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("n,hidden", [(1, 64), (37, 192), (300, 128)])
def test_kernel_matches_reference(lib, bits, dtype, group, act, n, hidden):
    rng = np.random.default_rng(n + hidden + bits)
    codec = codec_for(hidden, bits, dtype, group)
    raw = codec.encode((rng.standard_normal((n, 3, hidden)) * 0.3).astype(np.float32))
    x = rng.standard_normal(hidden).astype(np.float32)
    want = reference(codec, raw, x, act)
    for threads in (1, 3):
        out = np.full(hidden, 0.25, np.float32)  # the kernel accumulates into out
        native.BundleFFN(lib, codec, act, threads)(x, raw, out)
        np.testing.assert_allclose(out - 0.25, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_kernel_result_does_not_depend_on_threads(lib):
    """Neurons are summed in fixed chunks, whichever thread takes them (under any OpenMP schedule): 1, 2, 3
    and 8 threads give the same bits, dense and sparse."""
    rng = np.random.default_rng(7)
    codec = codec_for(128, 8, "affine", 64)
    raw = codec.encode((rng.standard_normal((300, 3, 128)) * 0.3).astype(np.float32))
    x = rng.standard_normal(128).astype(np.float32)
    offsets = np.arange(0, 300, 3, dtype=np.int64) * raw.shape[1]

    def run(threads):
        k = native.BundleFFN(lib, codec, "silu", threads)
        dense, sparse = np.full(128, 0.25, np.float32), np.full(128, 0.25, np.float32)
        k(x, raw, dense)
        k.sparse(x, raw.reshape(-1), sparse, offsets=offsets, threshold=0.1)
        return dense, sparse

    one = run(1)
    for threads in (2, 3, 8):
        for got, want in zip(run(threads), one):
            np.testing.assert_array_equal(got, want)


def test_kernel_rejects_what_it_cannot_read(lib):
    codec = codec_for(64, 16, "bfloat16", None)
    k = native.BundleFFN(lib, codec, "silu", 1)
    raw = codec.encode(np.zeros((4, 3, 64), np.float32))
    out = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="float32"):
        k(np.zeros(64, np.float64), raw, out)
    with pytest.raises(ValueError, match="bundles"):
        k(np.zeros(64, np.float32), raw[:, :-2], out)
    with pytest.raises(ValueError, match="activation"):
        native.BundleFFN(lib, codec, "relu2", 1)
    assert native.bundle_ffn(codec, "relu2") is None  # the loader then keeps the MLX path


def sparse_reference(codec, raw, x, act, coef, threshold):
    """sum_i a_i (up_i . x) down_i in float64: a_i = coef[i], else act(gate_i . x) masked at threshold."""
    v = codec.decode_np(raw, 2 if coef is not None else 3).astype(np.float64)
    if coef is None:
        a = np.array(MLX_ACT[act](mx.array((v[:, 2] @ x).astype(np.float32))), np.float64)
        a = np.where(np.abs(a) > threshold, a, 0)
    else:
        a = coef.astype(np.float64)
    return (a * (v[:, 0] @ x)) @ v[:, 1]


@pytest.mark.parametrize("bits,dtype,group", STORES, ids=[f"{b}-{d}-{g}" for b, d, g in STORES])
@pytest.mark.parametrize("how", ["rows-gate-masked", "offsets-gate", "offsets-coef", "rows-coef"])
def test_sparse_kernel_matches_reference(lib, bits, dtype, group, how):
    """Selected bundles at byte offsets in a read buffer (as coalesced reads leave them) or in cache rows,
    weighed by given coefficients (2-part bundles, resident gate) or by their own masked gate."""
    rng = np.random.default_rng(bits + len(how))
    hidden, n = 128, 53
    codec = codec_for(hidden, bits, dtype, group)
    use_coef = how.endswith("coef")
    parts = 2 if use_coef else 3
    raw = codec.encode((rng.standard_normal((n, 3, hidden)) * 0.3).astype(np.float32))[:, : parts * codec.part_bytes]
    x = rng.standard_normal(hidden).astype(np.float32)
    coef = np.where(rng.random(n) < 0.3, 0, rng.standard_normal(n)).astype(np.float32) if use_coef else None
    threshold = 0.05 if how == "rows-gate-masked" else -1.0
    want = sparse_reference(codec, raw, x, "silu", coef, threshold)
    k = native.BundleFFN(lib, codec, "silu", 2)
    out = np.zeros(hidden, np.float32)
    if how.startswith("offsets"):  # scatter the bundles into a buffer with gaps, in another order
        order = rng.permutation(n)
        stride = raw.shape[1] + 37
        buf = np.zeros(n * stride + 11, np.uint8)
        offsets = (np.arange(n) * stride + 11).astype(np.int64)
        for slot, i in enumerate(order):
            buf[offsets[slot]: offsets[slot] + raw.shape[1]] = raw[i]
        k.sparse(x, buf, out, offsets=offsets, coef=None if coef is None else coef[order], threshold=threshold)
    else:
        k.sparse(x, np.ascontiguousarray(raw), out, coef=coef, threshold=threshold)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    if threshold > 0:  # the mask dropped something, and dropping is not the same as keeping
        unmasked = sparse_reference(codec, raw, x, "silu", None, -1.0)
        assert np.abs(unmasked - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("bits,dtype,group", STORES, ids=[f"{b}-{d}-{g}" for b, d, g in STORES])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("n", [5, 700])
def test_gate_acts_match_reference(lib, bits, dtype, group, act, n):
    """act(gate_i . x) from stored gate parts (threshold sparsity's resident gates in the store's format),
    rows wider than a part as in a cache of whole bundles, 1 and 3 threads."""
    rng = np.random.default_rng(n + bits)
    hidden = 128
    codec = codec_for(hidden, bits, dtype, group)
    raw = codec.encode((rng.standard_normal((n, 3, hidden)) * 0.3).astype(np.float32))
    gates = np.ascontiguousarray(raw[:, 2 * codec.part_bytes:])
    x = rng.standard_normal(hidden).astype(np.float32)
    g = codec.decode_np(raw, 3)[:, 2].astype(np.float64) @ x
    want = np.array(MLX_ACT[act](mx.array(g.astype(np.float32))), np.float64)
    for threads in (1, 3):
        got = native.BundleFFN(lib, codec, act, threads).gate_acts(x, gates)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    wide = np.ascontiguousarray(np.concatenate([gates, np.zeros((n, 9), np.uint8)], axis=1))
    np.testing.assert_array_equal(native.BundleFFN(lib, codec, act, 1).gate_acts(x, wide),
                                  native.BundleFFN(lib, codec, act, 1).gate_acts(x, gates))
    with pytest.raises(ValueError, match="gate rows"):
        native.BundleFFN(lib, codec, act, 1).gate_acts(x, gates[:, :-1].copy())
    with pytest.raises(ValueError, match="values"):
        native.BundleFFN(lib, codec, act, 1).gate_acts(x[:-1].copy(), gates)


def test_sparse_kernel_rejects_what_it_cannot_read(lib):
    codec = codec_for(64, 16, "bfloat16", None)
    k = native.BundleFFN(lib, codec, "silu", 1)
    raw = codec.encode(np.zeros((4, 3, 64), np.float32))
    x, out = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="every part"):
        k.sparse(x, raw[:, : 2 * codec.part_bytes].copy(), out)  # no gate part and no coefficients
    with pytest.raises(ValueError, match="inside the buffer"):
        k.sparse(x, raw.reshape(-1), out, offsets=np.array([raw.size - 10], np.int64))
    with pytest.raises(ValueError, match="one per bundle"):
        k.sparse(x, raw, out, coef=np.ones(3, np.float32))


@pytest.mark.parametrize("mode", ["threshold", "predictor"])
@pytest.mark.parametrize("bits", [16, 8])
def test_native_sparse_paging_matches_mlx_path(tmp_path, lib, mode, bits):
    """Sparse decoding with the kernel (cache of stored bundles) gives the MLX path's logits, under a
    budget small enough that the window's cache evicts and overflows."""
    from applelm.cache import make_prompt_cache

    _, _, out = tiny_flash(tmp_path, "llama", bits=bits, num_hidden_layers=3, intermediate_size=256)
    budgets = {}
    for flag in (True, False):  # each path's own minimum plus an eighth of its full cache
        plan = load_model(out, sparsity=0.5, sparsity_mode=mode, native=flag)[0].flash.plan
        budgets[flag] = plan.total_bytes - plan.cache_bytes + plan.cache_bytes // 8
    runs = {}
    for flag in (True, False):
        m, _, _ = load_model(out, sparsity=0.5, sparsity_mode=mode, window=2, memory_budget=budgets[flag],
                             native=flag)
        assert (m.flash.native is not None) == flag
        assert m.flash.plan.cache_capacity < 256
        cache = make_prompt_cache(m)
        m(mx.array([[1, 5, 9, 33]]), cache=cache)
        logits = [np.array(m(mx.array([[t]]), cache=cache))[0, 0] for t in (7, 3, 25, 12, 19, 41)]
        runs[flag] = (np.stack(logits), m)
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-3, atol=1e-3)
    # Without host views of the cache (CUDA arrays), slots are written through MLX and read back as copies.
    m, _, _ = load_model(out, sparsity=0.5, sparsity_mode=mode, window=2, memory_budget=budgets[True], native=True)
    for block in m.layers:
        block.mlp._cache.rows = None
    cache = make_prompt_cache(m)
    m(mx.array([[1, 5, 9, 33]]), cache=cache)
    no_view = [np.array(m(mx.array([[t]]), cache=cache))[0, 0] for t in (7, 3, 25, 12, 19, 41)]
    np.testing.assert_allclose(np.stack(no_view), runs[True][0], rtol=1e-5, atol=1e-5)
    fast, slow = runs[True][1], runs[False][1]
    row = fast.layers[0].mlp._cache.parts[0]
    assert row.dtype == mx.uint8 and row.shape[1] == fast.layers[0].mlp._n_parts * fast.flash.codec.part_bytes
    # Bundles as stored are smaller than float32 rows: a byte of cache holds more neurons; resident gates
    # (threshold mode) stay as stored too.
    assert fast.flash.plan.cache_bytes / fast.flash.plan.cache_capacity < \
        slow.flash.plan.cache_bytes / slow.flash.plan.cache_capacity
    if mode == "threshold":
        assert fast.layers[0].mlp._gate is None and fast.layers[0].mlp._gate_stored.dtype == np.uint8
        assert fast.flash.plan.fixed_bytes * (2 if bits == 16 else 3) <= slow.flash.plan.fixed_bytes
    assert fast.flash.report()["neurons_read_per_token"] > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("bits", [32, 16, 4])
def test_native_paging_decodes_like_mlx_and_resident(tmp_path, lib, arch, bits):
    _, _, out = tiny_flash(tmp_path, arch, bits=bits, predictors=False, num_hidden_layers=4, intermediate_size=512)
    resident, _, _ = load_model(out)
    budget = streaming_budget(out, max_unit_bytes=8192, native=True)
    fast, _, _ = load_model(out, memory_budget=budget, max_unit_bytes=8192, native=True)
    slow, _, _ = load_model(out, memory_budget=budget, max_unit_bytes=8192, native=False)
    naive, _, _ = load_model(out, memory_budget=10**9, naive=True, max_unit_bytes=8192, native=True)
    assert fast.flash.native is not None and slow.flash.native is None
    # Streamed layers in several units each, and pinned ones held as stored bundles.
    assert fast.flash.plan.streamed and len(fast.flash.units[0]) > 1
    assert fast.flash.plan.pinned_stored and all(fast.layers[i].mlp._stored is not None for i in fast.flash.plan.pinned)
    assert slow.flash.plan.streamed and not slow.flash.plan.pinned_stored
    want = greedy(resident, [1, 5, 9, 33], 10)
    for m in (fast, slow, naive):
        assert greedy(m, [1, 5, 9, 33], 10) == want
    assert fast.flash.report()["bytes_read"] > 0
    # Stored bundles are smaller than float copies (or equal, for a float32 store): at least as many pins.
    assert len(fast.flash.plan.pinned) >= len(slow.flash.plan.pinned)


def test_native_logits_match_mlx_path(tmp_path, lib):
    from applelm.cache import make_prompt_cache

    _, _, out = tiny_flash(tmp_path, "llama", bits=16, predictors=False)
    budget = streaming_budget(out, max_unit_bytes=8192, native=True)
    logits = []
    for flag in (True, False):
        m, _, _ = load_model(out, memory_budget=budget, max_unit_bytes=8192, native=flag)
        cache = make_prompt_cache(m)
        m(mx.array([[1, 5, 9, 33]]), cache=cache)
        logits.append(np.array(m(mx.array([[7]]), cache=cache)))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_stored_pins_plan():
    """With the kernel, a pinned layer costs its stored bytes: more layers fit, and a budget that holds
    every layer as stored bundles streams nothing."""
    from applelm.flash.budget import Geometry, plan_dense

    floats = Geometry(8, 64, 256, 3 * 128, 128, 4, 256)  # bfloat16 store, float32 compute
    stored = Geometry(8, 64, 256, 3 * 128, 128, 4, 256, stored_layer=3 * 128 * 256, decode_neurons=32)
    budget = 1000 + 4 * floats.unit_raw + floats.decode_bytes + 3 * floats.layer_mem
    a, b = plan_dense(floats, 1000, budget, inflight=1), plan_dense(stored, 1000, budget, inflight=1)
    assert len(a.pinned) == 3 and not a.pinned_stored
    assert len(b.pinned) > len(a.pinned) and b.pinned_stored and b.total_bytes <= budget
    assert "as stored bundles" in b.describe()
    every = plan_dense(stored, 1000, 1000 + 8 * stored.pin_bytes + stored.decode_bytes)
    assert every.mode == "dense" and len(every.pinned) == 8 and not every.streamed and every.ring_depth == 0
    # No budget: float pins without the kernel, stored ones with it (native=True asked for it)
    assert plan_dense(floats, 1000, None).mode == "resident"
    unbounded = plan_dense(stored, 1000, None)
    assert unbounded.pinned_stored and len(unbounded.pinned) == 8 and not unbounded.streamed
    assert unbounded.total_bytes == every.total_bytes


def test_ring_depth_trades_queued_reads_for_pinned_layers():
    """Without a given depth, the plan takes the ring depth that pins the most layers, keeping at least
    MIN_READ_AHEAD bytes queued ahead and the deeper ring on a tie; a given depth is kept."""
    from applelm.flash.budget import MIN_READ_AHEAD, Geometry, plan_dense

    def layer_units(part_bytes):  # a bfloat16-like store whose units are whole layers of 3 * part_bytes * 1024
        n = 1024
        return Geometry(30, part_bytes // 2, n, 3 * part_bytes, part_bytes, 4, n, stored_layer=3 * part_bytes * n,
                        decode_neurons=64)

    big = layer_units(1728)  # 5.3 MB units: one ahead is MIN_READ_AHEAD already
    assert big.unit_raw >= MIN_READ_AHEAD
    budget = 10**6 + 4 * big.unit_raw + big.decode_bytes + 6 * big.pin_bytes + big.pin_bytes // 2
    auto, deep = plan_dense(big, 10**6, budget, inflight=1), plan_dense(big, 10**6, budget, depth=4, inflight=1)
    assert (deep.ring_depth, len(deep.pinned)) == (4, 6)
    assert (auto.ring_depth, len(auto.pinned)) == (2, 8) and auto.total_bytes <= budget
    small = layer_units(922)  # 2.8 MB units: two must be queued ahead, so 3 is the shallowest ring
    assert 2 * small.unit_raw >= MIN_READ_AHEAD > small.unit_raw
    budget = 10**6 + 4 * small.unit_raw + small.decode_bytes + 6 * small.pin_bytes + small.pin_bytes // 2
    assert plan_dense(small, 10**6, budget, inflight=1).ring_depth == 3
    # Layers of four units: the two units a shallower ring frees pin nothing more, so the deeper ring stays.
    quarters = Geometry(30, 1728 * 2, 4096, 3 * 1728 * 4, 1728 * 4, 4, 1024, stored_layer=3 * 1728 * 4 * 4096,
                        decode_neurons=64)
    budget = 10**6 + 4 * quarters.unit_raw + quarters.decode_bytes + 6 * quarters.pin_bytes
    tie = plan_dense(quarters, 10**6, budget, inflight=1)
    assert (tie.ring_depth, len(tie.pinned)) == (4, 6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_every_layer_stored_decodes_like_resident(tmp_path, lib, arch):
    """A budget that holds all layers as stored bundles: no reads after loading, tokens as resident; a
    prompt decoded a few neurons at a time gives the resident logits."""
    _, _, out = tiny_flash(tmp_path, arch, bits=4, predictors=False)
    resident, _, _ = load_model(out)
    m, _, _ = load_model(out, memory_budget=resident.flash.plan.total_bytes - 1)
    assert m.flash.plan.pinned_stored and not m.flash.plan.streamed
    m.flash.decode_neurons = 5  # several decode steps per unit (the real size is ~2 MB of floats)
    x = mx.array([[1, 5, 9, 33, 2, 70]])
    np.testing.assert_allclose(np.array(m(x)), np.array(resident(x)), rtol=1e-4, atol=1e-4)
    m.flash.reset_stats()
    assert greedy(m, [1, 5, 9, 33], 10) == greedy(resident, [1, 5, 9, 33], 10)
    assert m.flash.report()["bytes_read"] == 0
    # native=True without a budget gives the same stored plan (the smallest fully resident form)
    unbounded, _, _ = load_model(out, native=True)
    assert unbounded.flash.plan.pinned_stored and unbounded.flash.plan.total_bytes == m.flash.plan.total_bytes
    assert greedy(unbounded, [1, 5, 9, 33], 10) == greedy(resident, [1, 5, 9, 33], 10)


def test_native_required_but_disabled_is_a_clear_error(tmp_path, monkeypatch):
    _, _, out = tiny_flash(tmp_path, "llama", bits=16, predictors=False)
    monkeypatch.setitem(native_build._built, native.SOURCE, None)  # as after APPLELM_NATIVE=off or a failed build
    with pytest.raises(UserError, match="native flash kernel is unavailable"):
        load_model(out, memory_budget=10**9, native=True)
    m, _, _ = load_model(out, memory_budget=10**9)  # auto: quietly the MLX path
    assert m.flash.native is None


def test_build_failure_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "_built", {})
    monkeypatch.setenv("APPLELM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    (tmp_path / "no-such-compiler").write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 1\n")
    (tmp_path / "no-such-compiler").chmod(0o755)
    with pytest.warns(UserWarning, match="could not build native_ffn.c"):
        assert native.load() is None
    assert not list((tmp_path / "native").glob("*.so"))  # no half-written library left behind


@pytest.mark.parametrize("native", [True, False], ids=["kernel", "mlx"])
@pytest.mark.parametrize("mode", ["threshold", "predictor"])
def test_lookahead_reads_change_nothing_but_where_bytes_come_from(tmp_path, request, mode, native):
    """Reading the next layer's guessed neurons ahead gives the same logits as not doing it; some of the
    next layers' misses come from the lookahead buffers; the plan counts those two buffers. Both runs get
    the same cache capacity: in predictor mode cached neurons the predictor missed still count (the
    window recovers them), so results depend on what the cache holds. Both the kernel's path and the MLX
    path (the one a GPU takes) read ahead."""
    if native:
        request.getfixturevalue("lib")  # fails if a C compiler is present but the kernel did not build
    from applelm.cache import make_prompt_cache

    _, _, out = tiny_flash(tmp_path, "llama", bits=16, num_hidden_layers=3, intermediate_size=256)
    plans = {flag: load_model(out, sparsity=0.5, sparsity_mode=mode, native=native, lookahead=flag)[0].flash.plan
             for flag in (True, False)}
    extra = plans[True].buffer_bytes - plans[False].buffer_bytes  # two lookahead buffers
    layer_file = (256 * BundleCodec(64, 16, "bfloat16").bundle_bytes + 4095) // 4096 * 4096
    assert extra == 2 * plans[True].ahead_buffer_bytes and 0 < plans[True].ahead_buffer_bytes <= layer_file
    assert plans[True].ahead_neurons == 256 // 8 and plans[False].ahead_neurons == 0
    budget = plans[True].total_bytes - plans[True].cache_bytes + plans[True].cache_bytes // 6
    runs = {}
    for flag in (True, False):
        m, _, _ = load_model(out, sparsity=0.5, sparsity_mode=mode, window=2, native=native, lookahead=flag,
                             memory_budget=budget - (0 if flag else extra))
        assert m.flash.plan.cache_capacity < 256
        cache = make_prompt_cache(m)
        m(mx.array([[1, 5, 9, 33]]), cache=cache)
        m.flash.reset_stats()
        runs[flag] = (np.stack([np.array(m(mx.array([[t]]), cache=cache))[0, 0] for t in (7, 3, 25, 12, 19, 41)]),
                      m.flash.report(), m.flash.plan.cache_capacity)
        m.flash.close()
    assert runs[True][2] == runs[False][2]
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-6)
    report = runs[True][1]
    assert report["ahead_read_per_token"] > 0 and 0 < report["ahead_used_share"] <= 1
    assert "ahead_read_per_token" not in runs[False][1]


@pytest.mark.parametrize("recent,want", [(5, 16), (20, 20), (1000, 32)])
def test_lookahead_reads_the_surest_uncached_guesses_up_to_its_bound(tmp_path, monkeypatch, recent, want):
    """Of the next layer's guesses, lookahead reads the uncached ones with the highest scores: as many as
    that layer missed on the last token (AHEAD_MISS_FACTOR 1), at least AHEAD_MIN_NEURONS, at most what
    its buffer holds (1/8 of 256 neurons)."""
    from applelm.flash import paged_mlp

    monkeypatch.setattr(paged_mlp, "AHEAD_MISS_FACTOR", 1.0)
    monkeypatch.setattr(paged_mlp, "AHEAD_MIN_NEURONS", 16)
    _, _, out = tiny_flash(tmp_path, "llama", bits=16, num_hidden_layers=3, intermediate_size=256)
    m, _, _ = load_model(out, sparsity=0.5, sparsity_mode="predictor", native=False, lookahead=True)
    try:
        first, nxt = m.layers[0].mlp, m.layers[1].mlp
        assert m.flash.plan.ahead_neurons == 32
        held = np.arange(0, 256, 3)  # pretend these are cached: they must not be read again
        nxt._cache.slot_of[held] = np.arange(len(held))
        score = np.random.default_rng(1).permutation(256).astype(np.float32)
        monkeypatch.setattr(nxt, "_guess", lambda xn, xf: (np.arange(256), score))
        nxt._recent_misses = recent
        first._read_next_ahead(np.zeros(64, np.float32), mx.zeros((1, 64)))
        layer, ids, _, _ = m.flash.ahead[1]
        free = np.setdiff1d(np.arange(256), held)
        expect = np.sort(free[np.argsort(-score[free])[:want]])
        assert layer == 1 and ids.tolist() == expect.tolist()
    finally:
        m.flash.close()
