"""Activation sparsity: calibrated thresholds hit their target, predictors beat chance."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_predictor_thresholds_per_level_select_fewer_neurons_at_higher_sparsity():
    """One trained predictor serves every sparsity level: each level's logit threshold keeps the target
    recall of that level's own active set on held-out tokens, and selects fewer neurons as sparsity rises."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 32)).astype(np.float32)
    act = np.maximum(x @ (rng.normal(size=(32, 4)) @ rng.normal(size=(4, 64))), 0).astype(np.float32)  # ReLU-like
    levels = [0.3, 0.5, 0.7, 0.9]
    thresholds = np.quantile(act, levels)
    r = train_predictor(x, act > thresholds[1], rank=8, steps=300, act=act, level_thresholds=thresholds)
    assert len(r.level_logit_thresholds) == len(levels) == len(r.level_predicted_fractions)
    assert np.all(np.diff(r.level_logit_thresholds) >= 0)
    assert r.level_logit_thresholds[1] == r.logit_threshold  # the training target's own threshold
    assert r.level_predicted_fractions[-1] < 0.5 * r.level_predicted_fractions[0]
    logits = (x @ r.a) @ r.b + r.bias
    for t, tau, frac in zip(thresholds, r.level_logit_thresholds, r.level_predicted_fractions):
        truth = act > t
        recall = ((logits > tau) & truth).sum() / truth.sum()
        assert recall > 0.85, (t, recall)
        assert frac < 1.0


def test_predictor_mode_reads_follow_the_sparsity_asked_for(tmp_path):
    """The sparsity given at load time moves the predictors' cut: 0.9 selects far fewer neurons than 0.3
    (before per-level thresholds, every sparsity read the training target's neurons)."""
    _, _, out = tiny_flash(tmp_path, "llama", bits=32, predictors=True)
    info = read_layout(out).index["predictors"]
    assert len(info["level_logit_thresholds"]) == len(info["recall"])
    used = {}
    for s in (0.3, 0.9):
        model, _, _ = load_model(out, sparsity=s, sparsity_mode="predictor", window=1)
        model.flash.reset_stats()
        for _ in range(6):
            model(mx.array(CALIBRATION_IDS[:1])[None])
        used[s] = model.flash.stats.neurons_used
        model.flash.close()
    assert used[0.9] < 0.85 * used[0.3], used  # tiny random model: 0.71 measured


def test_layout_without_level_thresholds_warns_off_target(tmp_path):
    """An older layout (one predictor threshold) still loads; a sparsity other than its training target
    warns that reads stay the target's."""
    import warnings

    from applelm.flash.layout import write_index

    _, _, out = tiny_flash(tmp_path, "llama", bits=32, predictors=True)
    index = dict(read_layout(out).index)
    index["predictors"] = {k: v for k, v in index["predictors"].items() if k != "level_logit_thresholds"}
    write_index(out, {k: v for k, v in index.items() if k != "index_sha256"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(out, sparsity=0.5, sparsity_mode="predictor")[0].flash.close()
    with pytest.warns(UserWarning, match="prepare again"):
        load_model(out, sparsity=0.8, sparsity_mode="predictor")[0].flash.close()
