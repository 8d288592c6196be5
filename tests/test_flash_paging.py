"""Flash paging on tiny random models: paged == resident with sparsity off, budgets enforced, sparse
decoding equal to the masked dense computation it stands for."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from applelm.errors import UserError
from applelm.flash import native as native_kernel
from applelm.loader import load_model
from flash_fixtures import greedy, streaming_budget, tiny_flash

X = mx.array([[1, 5, 9, 33, 2, 70, 11, 4]])
PROMPT = [1, 5, 9, 33]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash_paging")
    return {arch: tiny_flash(root, arch) for arch in ("llama", "gemma3")}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_paged_equals_resident(layouts, arch):
    source, _, out = layouts[arch]
    resident, _, _ = load_model(out)
    assert resident.flash.plan.mode == "resident"
    # Small units force several reads per layer; the budget pins about half the layers.
    budget = streaming_budget(out, max_unit_bytes=16384)
    paged, _, _ = load_model(out, memory_budget=budget, max_unit_bytes=16384)
    naive, _, _ = load_model(out, memory_budget=10**9, naive=True, max_unit_bytes=16384)
    assert paged.flash.plan.mode == "dense" and paged.flash.plan.streamed
    ref = np.array(source(X))
    for m in (resident, paged, naive):
        np.testing.assert_allclose(np.array(m(X)), ref, rtol=1e-5, atol=1e-5)
    want = greedy(resident, PROMPT, 12)
    assert greedy(paged, PROMPT, 12) == want
    assert greedy(naive, PROMPT, 12) == want
    report = paged.flash.report()
    assert report["bytes_read"] > 0
    assert paged.flash.ring.resyncs <= 1  # the ring follows the forward order after the first call


def test_half_precision_store_matches_its_own_resident_load(tmp_path):
    _, _, out = tiny_flash(tmp_path, "llama", bits=16, predictors=False)
    resident, _, _ = load_model(out)
    paged, _, _ = load_model(out, memory_budget=streaming_budget(out, max_unit_bytes=8192), max_unit_bytes=8192)
    assert paged.flash.plan.streamed
    np.testing.assert_allclose(np.array(paged(X)), np.array(resident(X)), rtol=1e-5, atol=1e-5)
    assert greedy(paged, PROMPT, 10) == greedy(resident, PROMPT, 10)


def test_budget_below_minimum_names_it(layouts):
    _, _, out = layouts["llama"]
    with pytest.raises(UserError) as e:
        load_model(out, memory_budget="10KB")
    msg = str(e.value)
    assert "below the minimum" in msg and "bytes" in msg
    minimum = int(msg.split("minimum of ")[1].split("(")[1].split(" bytes")[0])
    load_model(out, memory_budget=minimum, max_unit_bytes=1 << 24)  # exactly the minimum is enough
    with pytest.raises(UserError, match="below the minimum"):
        load_model(out, memory_budget="10KB", sparsity=0.5)


def test_budget_needs_a_flash_layout(layouts, tmp_path):
    from conftest import build_tiny
    from hf_fixtures import save_folder

    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "plain")
    with pytest.raises(UserError, match="flash layout"):
        load_model(folder, memory_budget="1GB")


@pytest.mark.parametrize("native", [False, None, "device-writes"], ids=["mlx", "native-if-built", "device-writes"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sparse_decode_equals_masked_prompt(layouts, arch, native):
    """Token-by-token decoding (selection, windowed cache with evictions, reads of misses) gives the same
    logits as one forward pass over the sequence applying every position's threshold mask densely.
    "device-writes": the caches without host views, as under CUDA (decode and slot writes through MLX)."""
    _, _, out = layouts[arch]
    device_writes = native == "device-writes"
    native = False if device_writes else native
    full, _, _ = load_model(out, sparsity=0.5, max_unit_bytes=4096, native=False)
    # This path's plan (under a budget: without one the kernel, and so its plan, is not used by default).
    probe = load_model(out, sparsity=0.5, max_unit_bytes=4096, native=native, memory_budget=10**12)[0].flash.plan
    small, _, _ = load_model(out, sparsity=0.5, window=2, max_unit_bytes=4096,  # misses decoded in chunks
                             memory_budget=probe.total_bytes - probe.cache_bytes + probe.cache_bytes // 3,
                             native=native)
    assert small.flash.plan.cache_capacity < 96
    assert (small.flash.native is None) == (native is False or native_kernel.load() is None)
    if device_writes:
        for block in small.layers:
            block.mlp._cache.rows = None
    dense = np.array(full(X))[0]  # prompt path: whole layers, per-position masks
    from applelm.cache import make_prompt_cache

    cache = make_prompt_cache(small)
    steps = [np.array(small(X[:, i: i + 1], cache=cache))[0, 0] for i in range(X.shape[1])]
    np.testing.assert_allclose(np.stack(steps), dense, rtol=1e-4, atol=1e-4)
    r = small.flash.report()
    assert 0 < r["neurons_read_per_token"] < r["neurons_used_per_token"] * 1.01 + 1
    for mlp in (b.mlp for b in small.layers):
        assert mlp._cache.count <= mlp._cache.capacity


def test_predictor_mode_runs_and_reads_less_than_dense(layouts):
    _, _, out = layouts["llama"]
    model, _, _ = load_model(out, sparsity=0.5, sparsity_mode="predictor")
    toks = greedy(model, PROMPT, 8)
    assert len(toks) == 8
    r = model.flash.report()
    assert r["bytes_read"] > 0
    assert r["neurons_read_per_token"] < 2 * 96  # 2 layers of 96 neurons: fewer than all are read


def test_sparse_needs_calibration(tmp_path):
    _, _, out = tiny_flash(tmp_path, "llama", predictors=False)
    with pytest.raises(UserError, match="predictors"):
        load_model(out, sparsity=0.5, sparsity_mode="predictor")
    with pytest.raises(UserError, match="sparsity"):
        load_model(out, sparsity=1.5)


def test_cuda_prefetch_is_a_no_op_off_cuda(monkeypatch):
    """The bulk move to the GPU only acts under MLX's CUDA backend; elsewhere, or switched off, it does
    nothing and says why (results never depend on it)."""
    from applelm.flash.cuda_prefetch import CudaPrefetcher

    p = CudaPrefetcher()
    assert not p.available
    p.to_device(mx.zeros((4,)))
    assert p.calls == 0
    monkeypatch.setenv("APPLELM_CUDA_PREFETCH", "off")
    assert CudaPrefetcher().error == "off (APPLELM_CUDA_PREFETCH)"


def test_pin_layouts_place_pinned_layers_and_both_equal_resident(layouts):
    """"tail" (the default) pins the last layers, "spread" interleaves them with streamed ones (the last layer
    pinned); either way the ring follows the forward order and paged output equals resident."""
    from applelm.flash.budget import pinned_layers

    assert pinned_layers(24, 6, "spread") == [3, 7, 11, 15, 19, 23]
    assert pinned_layers(24, 6) == [18, 19, 20, 21, 22, 23]
    assert pinned_layers(30, 29, "spread") == [i for i in range(30) if i != 28] and pinned_layers(5, 0) == []
    with pytest.raises(ValueError, match="pin layout"):
        pinned_layers(4, 2, "middle")
    _, _, out = layouts["llama"]
    resident, _, _ = load_model(out)
    want = greedy(resident, PROMPT, 10)
    budget = streaming_budget(out, max_unit_bytes=16384)
    for layout in ("spread", "tail"):
        paged, _, _ = load_model(out, memory_budget=budget, max_unit_bytes=16384, pin_layout=layout)
        plan = paged.flash.plan
        n = len(plan.pinned) + len(plan.streamed)
        assert plan.pinned == pinned_layers(n, len(plan.pinned), layout) and plan.streamed
        assert sorted(plan.pinned + plan.streamed) == list(range(n))
        assert greedy(paged, PROMPT, 10) == want and paged.flash.ring.resyncs <= 1
    with pytest.raises(UserError, match="pin layout"):
        load_model(out, memory_budget=budget, pin_layout="middle")


@pytest.mark.parametrize("native", [False, None], ids=["mlx", "native-if-built"])
def test_relu_sparsity_up_to_its_zeros_is_lossless(tmp_path_factory, native):
    """A ReLU FFN's inactive neurons contribute exactly 0: at a sparsity below the calibrated share of zeros
    every threshold is 0, and sparse decoding (window cache with evictions, reads of misses) gives the
    resident model's logits while reading only the active neurons. Above it, thresholds cut real values."""
    from applelm.flash.__main__ import summary

    source, _, out = tiny_flash(tmp_path_factory.mktemp("relu"), "llama", hidden_act="relu")
    from applelm.flash.layout import read_layout

    zeros = read_layout(out).index["sparsity"]["zero_fraction"]
    assert all(0.35 < z < 0.65 for z in zeros)  # random gates: about half of gate . x is negative
    assert "exact zeros (natural sparsity)" in summary(out)
    probe = load_model(out, sparsity=0.3, max_unit_bytes=4096, native=native, memory_budget=10**12)[0].flash.plan
    small, _, _ = load_model(out, sparsity=0.3, window=2, max_unit_bytes=4096, native=native,
                             memory_budget=probe.total_bytes - probe.cache_bytes + probe.cache_bytes // 3)
    assert small.flash.plan.cache_capacity < 96
    assert np.all(np.asarray(small.flash.thresholds) == 0)
    from applelm.cache import make_prompt_cache

    cache = make_prompt_cache(small)
    steps = [np.array(small(X[:, i: i + 1], cache=cache))[0, 0] for i in range(X.shape[1])]
    np.testing.assert_allclose(np.stack(steps), np.array(source(X))[0], rtol=1e-4, atol=1e-4)
    r = small.flash.report()
    assert r["neurons_used_per_token"] < 0.7 * 2 * 96  # the zeros were skipped, not computed
    lossy, _, _ = load_model(out, sparsity=0.8, native=native)
    assert np.asarray(lossy.flash.thresholds).min() > 0
    assert np.abs(np.array(lossy(X)) - np.array(source(X))).max() > 1e-3
