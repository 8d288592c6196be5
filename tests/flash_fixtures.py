"""Tiny flash layouts for the flash tests (prepared once per session: preparing runs calibration)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import build_tiny
from hf_fixtures import save_folder

CALIBRATION_IDS = [int(t) for t in np.random.default_rng(0).integers(0, 97, 384)]


def tiny_flash(root: Path, arch: str, bits: int = 32, predictors: bool = True, **overrides):
    """(source model, config, flash folder) of a tiny random model prepared from a safetensors folder."""
    from applelm.flash.prepare import prepare

    model, config = build_tiny(arch, **overrides)
    src = save_folder(model, config, root / f"{arch}_src")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tokenizer.json")
        out = prepare(src, root / f"{arch}_flash{bits}", bits=bits, calibration_ids=CALIBRATION_IDS,
                      train_predictors=predictors, show_progress=False)
    return model, config, out


def greedy(model, prompt, n: int = 8) -> list[int]:
    from applelm.generation import generate_step

    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def streaming_budget(out, *, ring: int = 4, **load_options) -> int:
    """A budget under which the plan pins about half the FFN layers and streams the rest through a ring of
    `ring` units (computed from the loader's own geometry for these options, so it holds with or without the
    native kernel)."""
    from applelm.loader import load_model

    probe, _, _ = load_model(out, memory_budget=10**12, **load_options)
    rt = probe.flash
    g = rt.geometry
    budget = rt.plan.resident_bytes + ring * g.unit_raw + g.decode_bytes + (g.n_layers // 2) * g.pin_bytes
    # Never enough to hold every layer, as floats or as stored bundles.
    every_stored = rt.plan.resident_bytes + g.n_layers * g.pin_bytes + g.decode_bytes
    return min(budget, rt.plan.total_bytes - 1, every_stored - 1)
