"""`--pin-layout auto`: the load-time measure of read waits, and moving dense paging's pinned layers from the
tail to the spread layout when reads are the limit, with output unchanged and memory within the plan."""

from __future__ import annotations

import gc
import shutil
import weakref

import mlx.core as mx
import numpy as np
import pytest

import applelm.flash.auto_layout as auto_layout
from applelm.errors import ModelFormatError
from applelm.flash import loader as flash_loader
from applelm.flash.budget import pinned_layers
from applelm.flash.layout import read_layout
from applelm.loader import load_model
from flash_fixtures import greedy, streaming_budget, tiny_flash
import test_flash_blocks
from test_flash_blocks import half_pinned, logits

blocks_layout = test_flash_blocks.blocks_layout  # the module-scoped fixture, shared

PROMPT = [1, 5, 9, 33]
TAIL, SPREAD = [3, 4, 5], [1, 3, 5]  # 3 of 6 layers pinned


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    _, _, out = tiny_flash(tmp_path_factory.mktemp("auto_layout"), "llama", predictors=False, num_hidden_layers=6)
    return out


def options(out, **extra) -> dict:
    return {"memory_budget": streaming_budget(out, max_unit_bytes=16384, **extra), "max_unit_bytes": 16384, **extra}


def steps_take(monkeypatch, tail_s: float, spread_s: float) -> None:
    """The probe runs its real steps, but reports these step times for each layout and reads as the limit."""
    real = auto_layout.probe

    def scripted(model, rt, steps=auto_layout.PROBE_STEPS):
        real(model, rt, steps)
        return (spread_s if rt.plan.pin_layout == "spread" else tail_s), 0.5

    monkeypatch.setattr(auto_layout, "probe", scripted)


def modes(model) -> dict:
    return {i: block.mlp.mode for i, block in enumerate(model.layers)}


def assert_follows(model, pinned):
    """The plan, the layers' modes and the ring all say `pinned` (and nothing else) is held."""
    plan, rt = model.flash.plan, model.flash
    assert plan.pinned == pinned and plan.streamed == [i for i in range(6) if i not in pinned]
    assert {i for i, m in modes(model).items() if m == "pinned"} == set(pinned)
    assert [u.layer for u in rt.ring.units] == [i for i in plan.streamed for _ in rt.units[i]]
    for i in plan.streamed:
        assert [rt.ring.units[k].layer for k in model.layers[i].mlp._units] == [i] * len(rt.units[i])
    for i in pinned:
        mlp = model.layers[i].mlp
        assert (mlp._stored is not None) != (mlp._pinned is not None)


@pytest.mark.parametrize("native", [None, False], ids=["kernel", "mlx"])
def test_reads_the_limit_spreads_the_pinned_layers_and_output_is_unchanged(six_layers, monkeypatch, native):
    resident, _, _ = load_model(six_layers)
    want = greedy(resident, PROMPT, 10)
    tail, _, _ = load_model(six_layers, **options(six_layers, native=native), pin_layout="tail")
    n_pinned = len(tail.flash.plan.pinned)  # 3 as stored bundles (kernel), 2 as floats (MLX)
    assert tail.flash.plan.pinned == TAIL[3 - n_pinned:] and tail.flash.layout_probe is None
    steps_take(monkeypatch, tail_s=0.2, spread_s=0.1)
    auto, _, _ = load_model(six_layers, **options(six_layers, native=native))
    assert_follows(auto, SPREAD if n_pinned == 3 else [2, 5])
    plan, report = auto.flash.plan, auto.flash.report()
    assert plan.pin_layout == "spread" and "pinned" in plan.describe() and "spread," in plan.describe()
    assert plan.total_bytes == tail.flash.plan.total_bytes and plan.pinned_bytes == tail.flash.plan.pinned_bytes
    assert report["pin_layout"] == "spread"
    assert report["layout_probe"] == {"read_wait_share": 0.5, "threshold": auto_layout.READ_BOUND_SHARE,
                                      "tail_step_s": 0.2, "spread_step_s": 0.1, "chose": "spread"}
    assert report["tokens"] == 0 and report["bytes_read"] == 0  # the probe's steps are not counted
    assert greedy(auto, PROMPT, 10) == want == greedy(tail, PROMPT, 10)
    assert auto.flash.ring.resyncs <= 1
    np.testing.assert_allclose(np.array(auto(mx.array([PROMPT]))), np.array(resident(mx.array([PROMPT]))),
                               rtol=1e-5, atol=1e-5)


def test_compute_the_limit_keeps_the_tail_without_trying_the_spread(six_layers, monkeypatch):
    monkeypatch.setattr(auto_layout, "READ_BOUND_SHARE", 1.5)  # no step waits longer than it lasts
    moves = []
    monkeypatch.setattr(flash_loader, "_repin", lambda *a: moves.append(a))
    auto, _, _ = load_model(six_layers, **options(six_layers))
    assert_follows(auto, TAIL)
    probe = auto.flash.layout_probe
    assert probe["chose"] == "tail" and "spread_step_s" not in probe and 0.0 <= probe["read_wait_share"] <= 1.0
    assert auto.flash.plan.pin_layout == "tail" and moves == []


def test_spread_not_faster_moves_the_layers_back(six_layers, monkeypatch):
    resident, _, _ = load_model(six_layers)
    steps_take(monkeypatch, tail_s=0.1, spread_s=0.1)  # a tie keeps the tail
    auto, _, _ = load_model(six_layers, **options(six_layers))
    assert_follows(auto, TAIL)
    assert auto.flash.layout_probe["chose"] == "tail" and auto.flash.layout_probe["spread_step_s"] == 0.1
    assert auto.flash.plan.pin_layout == "tail" and auto.flash.report()["pin_layout"] == "tail"
    assert greedy(auto, PROMPT, 10) == greedy(resident, PROMPT, 10)


def test_nothing_to_choose_measures_nothing(six_layers, monkeypatch):
    """Fully resident, naive, or a layout the spread would not change: no probe steps at all."""
    calls = []
    monkeypatch.setattr(auto_layout, "probe", lambda *a, **k: calls.append(1) or (0.1, 0.0))
    for opts in ({}, {"memory_budget": 10**9, "naive": True}):
        model, _, _ = load_model(six_layers, **opts)
        assert model.flash.layout_probe is None
    assert calls == [] and pinned_layers(2, 1, "spread") == pinned_layers(2, 1, "tail")


def test_the_probe_leaves_no_trace(six_layers):
    model, _, _ = load_model(six_layers, **options(six_layers), pin_layout="tail")
    seconds, share = auto_layout.probe(model, model.flash)
    assert seconds > 0 and 0.0 <= share <= 1.0
    assert model.flash.report()["tokens"] == 0 and model.flash.report()["bytes_read"] == 0


def test_the_gguf_blocks_store_spreads_bit_for_bit(blocks_layout, monkeypatch):
    path, out = blocks_layout
    plain, _, _ = load_model(path)
    steps_take(monkeypatch, tail_s=0.2, spread_s=0.1)
    paged, _, _ = load_model(out, **half_pinned(out))
    assert_follows(paged, SPREAD)
    np.testing.assert_array_equal(logits(paged), logits(plain))
    assert greedy(paged, [5, 9, 200], 6) == greedy(plain, [5, 9, 200], 6)


def test_a_bad_layer_while_moving_is_a_clear_error_and_leaves_a_consistent_model(six_layers, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(six_layers, out)
    model, _, _ = load_model(out, **options(out), pin_layout="tail")
    layout = read_layout(out)
    entry = layout.layers[1]  # the layer the spread layout pins instead of layer 4
    data = bytearray(entry.path.read_bytes())
    data[7] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    per_layer = model.flash.plan.pinned_bytes // 3
    with pytest.raises(ModelFormatError, match="CRC32 mismatch"):
        flash_loader._repin(model, model.flash, layout, True, SPREAD, "spread")
    assert_follows(model, [3, 5])  # layer 4 released, layer 1 not taken: both stream
    assert model.flash.plan.pinned_bytes == 2 * per_layer
    assert len(greedy(model, PROMPT, 3)) == 3  # still decodes (layer 1's corrupt bytes stream, unchecked)


def test_moving_frees_each_layer_it_unpins_before_load_returns(six_layers, monkeypatch):
    """The layers the spread layout gives up are released while the loader still runs (the loader keeps no
    reference to what it read), so memory stays within the plan during the move."""
    steps_take(monkeypatch, tail_s=0.2, spread_s=0.1)
    opts, real, seen = options(six_layers), flash_loader.settle_pin_layout, {}

    def watching(model, rt, repin, threshold=None):
        old = {i: weakref.ref(model.layers[i].mlp._stored) for i in rt.plan.pinned}

        def repin_and_check(layers, name):
            repin(layers, name)
            gc.collect()
            seen.update({i: ref() is None for i, ref in old.items()})

        real(model, rt, repin_and_check, threshold)

    monkeypatch.setattr(flash_loader, "settle_pin_layout", watching)
    model, _, _ = load_model(six_layers, **opts)
    assert model.flash.plan.pinned == SPREAD
    assert seen == {3: False, 4: True, 5: False}  # only layer 4 left; 3 and 5 stay pinned
