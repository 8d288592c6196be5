"""Activation sparsity: calibrated thresholds hit their target, predictors beat chance."""

from __future__ import annotations

import numpy as np

import mlx.core as mx
from applelm.flash.layout import read_layout
from applelm.flash.sparsity import train_predictor
from applelm.loader import load_model
from flash_fixtures import CALIBRATION_IDS, tiny_flash


def test_predictor_on_tiny_model_beats_chance(tmp_path):
    _, _, out = tiny_flash(tmp_path, "llama", bits=32, predictors=True)
    info = read_layout(out).index["predictors"]
    for recall, fraction in zip(info["recall"], info["predicted_fraction"]):
        # A random choice of the same share of neurons would recall that share of the active ones.
        assert recall > fraction + 0.05, info
    assert info["mean_recall"] > 0.8


def test_predictor_learns_a_low_rank_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    w = rng.normal(size=(32, 4)) @ rng.normal(size=(4, 64))
    y = (x @ w) > 0.5
    r = train_predictor(x, y, rank=8, steps=300)
    assert r.recall > 0.9 and r.predicted_fraction < 0.8
    assert r.a.shape == (32, 8) and r.b.shape == (8, 64) and r.bias.shape == (64,)


def test_thresholds_reach_their_target_sparsity(tmp_path):
    """At target s, the share of |act| at or below the threshold on the calibration tokens is about s."""
    _, _, out = tiny_flash(tmp_path, "llama", bits=32, predictors=False)
    model, _, _ = load_model(out, sparsity=0.7)
    layer = model.layers[1].mlp
    thr = model.flash.thresholds[1]
    seen = []

    def spy(x):  # the FFN inputs of layer 1 over the calibration tokens
        seen.append(np.array(x).reshape(-1, x.shape[-1]))
        return mx.zeros_like(x)

    layer.__class__ = type("Spy", (layer.__class__,), {"__call__": lambda self, x: spy(x)})
    model(mx.array(CALIBRATION_IDS[:128])[None])
    g = np.array(mx.abs(layer._act(mx.array(seen[0]) @ layer._gate.T)))
    assert abs((g <= thr).mean() - 0.7) < 0.1
