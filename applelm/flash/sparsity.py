"""Activation sparsity for gated FFNs (SwiGLU, GeGLU, gated ReLU): calibrated thresholds and low-rank predictors.

(a) Thresholds (TEAL / CATS style, training-free): a neuron is active for a token when
    |act(gate . x)| exceeds its layer's threshold; thresholds are quantiles of |act| measured on
    calibration text, stored for target sparsities 5%..95% (the runtime interpolates). A ReLU FFN's
    exact zeros make the threshold 0 up to its natural sparsity (each layer's share of zeros, recorded):
    up to there, skipping neurons changes nothing.
(b) Predictors (the "LLM in a flash" method): per layer a low-rank map x -> (x A) B + bias, trained on
    the calibration text to predict the thresholded active set from the FFN input, so the gate rows can
    stream with the rest of the bundle. A logit threshold per layer is chosen for a target recall on the
    training split; recall and the predicted fraction are reported on a held-out split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

LEVELS = [round(0.05 * k, 2) for k in range(1, 20)]  # 0.05 .. 0.95


@dataclass
class LayerRecord:
    x: list = field(default_factory=list)  # (T_chunk, H) FFN inputs per prompt chunk
    act: list = field(default_factory=list)  # (T_chunk, I) |act(gate x)| as float16 per chunk
    filled: int = 0  # columns of the current chunk recorded so far
    zeros: int = 0  # activations exactly 0 (ReLU), counted before the float16 rounding
    count: int = 0


@dataclass
class Recorder:
    """Collects FFN inputs and gate activations of each layer over calibration forward passes (one per
    prompt chunk); `finish()` turns them into thresholds (and training data for predictors)."""

    intermediate: int
    levels: list = field(default_factory=lambda: list(LEVELS))
    keep_inputs: bool = False
    target: float = 0.5
    thresholds: dict = field(default_factory=dict)  # layer -> thresholds at `levels`
    inputs: dict = field(default_factory=dict)  # layer -> (T, H) float32
    masks: dict = field(default_factory=dict)  # layer -> (T, I) bool at the target sparsity
    acts: dict = field(default_factory=dict)  # layer -> (T, I) float16 |act|: the active sets at every level
    zero_fractions: dict = field(default_factory=dict)  # layer -> share of activations exactly 0
    layers: dict = field(default_factory=dict)

    def record(self, layer: int, start: int, x: mx.array, g: mx.array) -> None:
        """Columns [start, start + g.shape[-1]) of layer `layer`'s gate activations for inputs x."""
        rec = self.layers.setdefault(layer, LayerRecord())
        xs = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        a32 = np.array(g.astype(mx.float32)).reshape(xs.shape[0], -1)
        rec.zeros += int(np.count_nonzero(a32 == 0))
        rec.count += a32.size
        a = np.abs(a32).astype(np.float16)
        if rec.filled == 0:
            rec.act.append(np.empty((xs.shape[0], self.intermediate), np.float16))
            rec.x.append(xs if self.keep_inputs else None)
        rec.act[-1][:, start: start + a.shape[1]] = a
        rec.filled = (rec.filled + a.shape[1]) % self.intermediate

    def finish(self) -> None:
        for layer, rec in self.layers.items():
            act = np.concatenate(rec.act).astype(np.float32)
            self.thresholds[layer] = np.quantile(act, self.levels).astype(np.float64).tolist()
            self.zero_fractions[layer] = rec.zeros / max(1, rec.count)
            if self.keep_inputs:
                self.inputs[layer] = np.concatenate(rec.x)
                self.masks[layer] = act > float(np.quantile(act, self.target))
                self.acts[layer] = act.astype(np.float16)
        self.layers.clear()


@dataclass
class PredictorResult:
    a: np.ndarray
    b: np.ndarray
    bias: np.ndarray
    logit_threshold: float
    recall: float  # held-out recall of the active set
    predicted_fraction: float  # held-out share of neurons predicted active (what a token reads)
    active_fraction: float  # held-out share of neurons truly active
    # Per level of `level_thresholds` (when given): the logit threshold for the target recall of that
    # level's active set, and the held-out share of neurons it selects.
    level_logit_thresholds: list = field(default_factory=list)
    level_predicted_fractions: list = field(default_factory=list)


def train_predictor(x: np.ndarray, y: np.ndarray, rank: int, target_recall: float = 0.95, steps: int = 300,
                    lr: float = 3e-3, seed: int = 0, holdout: float = 0.2, batch: int = 256,
                    act: Optional[np.ndarray] = None, level_thresholds: Sequence[float] = ()) -> PredictorResult:
    """Fit logits = (x A) B + bias to the active mask y (T, I) with a recall-weighted squared hinge loss
    (Adam, minibatches, gradients written out). The hinge needs no exp/log: MLX's CPU kernels for those
    are slow enough to dominate training, while its matmuls are fast.
    With `act` (T, I) and the layer's activation thresholds per sparsity level, the trained logits also
    rank neurons for the other levels: each level gets the logit threshold that keeps `target_recall` of
    its own active set (non-decreasing with the level, so higher sparsity never reads more)."""
    t = x.shape[0]
    n_val = max(1, int(t * holdout)) if t > 4 else 0
    rng = np.random.default_rng(seed)
    order = rng.permutation(t)
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xt = mx.array(((x[train] - mean) / std).astype(np.float32))
    yt = mx.array(y[train].astype(np.float32))
    p = float(np.clip(y[train].mean(), 1e-3, 1 - 1e-3))
    pos_weight = min(10.0, (1 - p) / p) * 2.0  # missing an active neuron costs more than reading an extra one

    params = [mx.array(rng.normal(size=(x.shape[1], rank)).astype(np.float32) / math.sqrt(x.shape[1])),
              mx.array(rng.normal(size=(rank, y.shape[1])).astype(np.float32) / math.sqrt(rank)),
              mx.zeros((y.shape[1],))]
    m1 = [mx.zeros_like(q) for q in params]
    m2 = [mx.zeros_like(q) for q in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for s in range(1, steps + 1):
        idx = mx.array(rng.integers(0, xt.shape[0], min(batch, xt.shape[0])))
        xb, yb = xt[idx], yt[idx]
        h = xb @ params[0]
        logits = h @ params[1] + params[2]
        # d/dl of  w*y*max(0, 1-l)^2 + (1-y)*max(0, 1+l)^2, averaged over the batch
        g = (-2 * pos_weight * yb * mx.maximum(1 - logits, 0) + 2 * (1 - yb) * mx.maximum(1 + logits, 0)) / yb.size
        grads = [xb.T @ (g @ params[1].T), h.T @ g, g.sum(0)]
        for k in range(3):
            m1[k] = b1 * m1[k] + (1 - b1) * grads[k]
            m2[k] = b2 * m2[k] + (1 - b2) * grads[k] * grads[k]
            params[k] = params[k] - lr * (m1[k] / (1 - b1 ** s)) / (mx.sqrt(m2[k] / (1 - b2 ** s)) + eps)
        mx.eval(params, m1, m2)

    # Fold the input normalization into the first matrix: ((x - mean) / std) A = x (A / std) - (mean / std) A.
    a = params[0] / mx.array(std)[:, None]
    bias = params[2] - (mx.array(mean / std)[None] @ params[0] @ params[1])[0]
    b = params[1]
    # (matmuls in MLX: numpy's threaded BLAS stalls badly on a busy machine)
    logits_all = np.array((mx.array(x) @ a) @ b + bias)
    a, b, bias = np.array(a), np.array(b), np.array(bias)
    positives = logits_all[train][y[train]]
    tau = float(np.quantile(positives, 1 - target_recall)) if positives.size else 0.0
    ev = val if n_val else train
    pred, truth = logits_all[ev] > tau, y[ev]
    recall = float((pred & truth).sum() / max(1, truth.sum()))
    level_taus, level_fractions = [], []
    if act is not None:
        for t in level_thresholds:
            pos = logits_all[train][act[train] > t]
            level_taus.append(float(np.quantile(pos, 1 - target_recall)) if pos.size else float(logits_all.max()))
        level_taus = np.maximum.accumulate(np.asarray(level_taus, np.float64)).tolist()
        level_fractions = [float((logits_all[ev] > t).mean()) for t in level_taus]
    return PredictorResult(a.astype(np.float32), b.astype(np.float32), bias.astype(np.float32), tau, recall,
                           float(pred.mean()), float(truth.mean()), level_taus, level_fractions)
