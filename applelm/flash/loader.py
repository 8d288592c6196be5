"""Load a flash layout: the core loader's fixed order, with the FFN swap as one more module swap.

build -> sanitize -> quantize swap (resident part) -> FFN swap (FlashMLP per layer, following the
memory plan) -> load_weights(strict=True) of the resident part -> eval -> one pass over the layer files
(CRC check, pinned layers, resident gates) -> neuron caches and predictors for sparse paging.
"""

from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import ModelFormatError, UnsupportedError, UserError
from ..models import get_architecture
from ..ops import GGUFEmbedding, GGUFLinear
from ..ops.layers import ACTIVATIONS
from ..quant import dequantize_model, swap_quantized
from .auto_layout import settle_pin_layout
from .blocks import PROMPT_SCRATCH_BYTES
from .budget import PIN_LAYOUTS, Geometry, parse_size, plan_dense, plan_sparse
from .io import AlignedBuffer, wait_all
from .native import bundle_ffn
from .layout import GGUF_TOKENIZER_FILE, PREDICTOR_FILE, FlashLayout, aligned, read_layout, verify_resident
from .neuron_cache import NeuronCache
from .paged_mlp import FlashMLP
from .runtime import FlashRuntime

SPARSITY_MODES = ("threshold", "predictor")


def activation_of(mlp: nn.Module) -> str:
    """The activation of a model's gated MLP module, by name (ops.layers.ACTIVATIONS): the FFN swap must
    compute the same function (the name also selects it in the native CPU kernel)."""
    if "bias" in getattr(mlp, "gate_proj", {}) or "bias" in getattr(mlp, "down_proj", {}):
        raise UnsupportedError("flash paging does not support FFN biases (mlp_bias)")
    name = getattr(mlp, "activation", None)
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"flash paging does not know the FFN module {type(mlp).__name__}")
    return name


def _dense_bytes(module: nn.Module, itemsize: int) -> Optional[int]:
    if isinstance(module, GGUFLinear):
        return module.in_features * module.out_features * itemsize
    if isinstance(module, GGUFEmbedding):
        return module.num_embeddings * module.dims * itemsize
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = module["weight"]
        return w.shape[0] * w.shape[1] * 32 // module.bits * itemsize
    return None


def resident_bytes(model: nn.Module, dequantize: bool, itemsize: int) -> int:
    """Bytes of the resident part as it will be held (known before anything is evaluated)."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if dequantize:  # quantized layers become dense ones of the compute dtype
        for _, module in model.named_modules():
            dense = _dense_bytes(module, itemsize)
            if dense is not None:
                packed = sum(v.nbytes for k, v in tree_flatten(module.parameters()) if k != "bias")
                total += dense - packed
    return total


def _thresholds(layout: FlashLayout, sparsity: float) -> np.ndarray:
    info = layout.index.get("sparsity")
    if not info:
        raise UserError(f"{layout.folder}: this flash layout has no calibrated sparsity thresholds; run prepare "
                        "with --calibration FILE (or without --no-calibrate)")
    levels = np.asarray(info["levels"], np.float64)
    table = np.asarray(info["thresholds"], np.float64)  # (layers, levels)
    if not levels[0] <= sparsity <= levels[-1]:
        raise UserError(f"sparsity {sparsity} is outside the calibrated range {levels[0]:.2f}..{levels[-1]:.2f}")
    return np.array([np.interp(sparsity, levels, row) for row in table], np.float32)


def _predictor_taus(layout: FlashLayout, info: dict, sparsity: float) -> list[float]:
    """Per layer, the logit threshold for `sparsity`: interpolated between the calibrated levels. Layouts
    prepared before levels existed hold one threshold for the training target; other sparsities then read
    that target's neurons (only the masks change), which the warning says."""
    by_level = info.get("level_logit_thresholds")
    if by_level and all(len(row) == len(layout.index["sparsity"]["levels"]) for row in by_level):
        levels = np.asarray(layout.index["sparsity"]["levels"], np.float64)
        return [float(np.interp(sparsity, levels, row)) for row in by_level]
    if abs(sparsity - float(info.get("target_sparsity", sparsity))) > 1e-6:
        warnings.warn(f"{layout.folder}: its predictors select neurons for sparsity {info.get('target_sparsity')} "
                      f"only (prepared before per-level thresholds); prepare again for {sparsity} to read less",
                      stacklevel=3)
    return [float(t) for t in info["logit_thresholds"]]


def _predictors(layout: FlashLayout, dtype, sparsity: float) -> tuple[list, dict]:
    info = layout.index.get("predictors")
    path = layout.folder / PREDICTOR_FILE
    if not info or not path.is_file():
        raise UserError(f"{layout.folder}: this flash layout has no trained predictors; run prepare with "
                        "--train-predictors")
    if zlib.crc32(path.read_bytes()) != info.get("crc32"):
        raise ModelFormatError(f"{path}: CRC32 mismatch; the predictor weights are corrupt")
    arrays = mx.load(str(path))
    taus = _predictor_taus(layout, info, sparsity)
    out = []
    for i in range(layout.n_layers):
        try:
            a, b, bias = (arrays[f"layers.{i}.{k}"].astype(dtype) for k in ("a", "b", "bias"))
        except KeyError:
            raise ModelFormatError(f"{path}: predictor of layer {i} is missing") from None
        out.append((a, b, bias, taus[i]))
    return out, info


def _pinned_chunks(codec, layer: int, chunks: np.ndarray) -> list:
    """A pinned GGUF-blocks layer as MLX (up, down, gate) matrices per chunk, split once here so that a
    token's FFN does no slicing (the same bytes as read: nothing is decoded)."""
    return [tuple(mx.array(p) for p in codec.split(layer, c)) for c in chunks]


def _read_layers(rt: FlashRuntime, layout: FlashLayout, want: dict[int, tuple], verify: bool,
                 stored: frozenset = frozenset(), stored_gates: frozenset = frozenset(),
                 layers: Optional[list[int]] = None) -> tuple[dict, dict, dict]:
    """One pass over the layer files (or over `layers` of them) with direct I/O: check CRCs and keep what
    layers hold. want[i] lists part indices to decode for layer i; layers in `stored` keep their bundles as
    read, layers in `stored_gates` their gate parts as read. Returns ({i: [array per wanted part]}, {i:
    (intermediate, bundle_bytes) uint8 numpy array}, {i: (intermediate, part_bytes) uint8 numpy array of gates})."""
    buf = AlignedBuffer(max(u.read_bytes for us in rt.units.values() for u in us))
    out, raw, gates = {}, {}, {}
    try:
        for i in range(layout.n_layers) if layers is None else layers:
            parts = want.get(i, ())
            if not verify and not parts and i not in stored and i not in stored_gates:
                continue
            crc, pieces = 0, [[] for _ in parts]
            if i in stored:
                raw[i] = np.empty((layout.n_bundles, layout.bundle_bytes(i)), np.uint8)
            if i in stored_gates:
                gates[i] = np.empty((layout.intermediate, rt.codec.part_bytes), np.uint8)
            for u in rt.units[i]:
                wait_all(rt.reader.read(u.path, u.file_offset, u.read_bytes, buf))
                bundles = u.bundles(buf.array)
                crc = zlib.crc32(bundles, crc)
                if i in stored:
                    raw[i][u.start: u.stop] = bundles
                if i in stored_gates:
                    gates[i][u.start: u.stop] = bundles[:, 2 * rt.codec.part_bytes:]
                if parts:
                    decoded = rt.codec.decode_mx(mx.array(bundles), 3, rt.dtype)
                    for slot, p in zip(pieces, parts):
                        slot.append(decoded[p])
                    mx.eval([s[-1] for s in pieces])
            entry = layout.layers[i]
            if verify and crc != entry.crc32:
                raise ModelFormatError(f"{entry.path}: CRC32 mismatch ({crc:08x}, index says {entry.crc32:08x}); "
                                       "the layer data is corrupt, run prepare again")
            if parts:
                out[i] = [s[0] if len(s) == 1 else mx.concatenate(s) for s in pieces]
                mx.eval(out[i])
    finally:
        buf.close()
    return out, raw, gates


def _pin(model: nn.Module, rt: FlashRuntime, layout: FlashLayout, layers: list[int], verify: bool,
         data: Optional[dict] = None, raw: Optional[dict] = None) -> None:
    """Hold `layers` as pinned: as stored bundles (rt.plan.pinned_stored) or as floats, taken out of `data` /
    `raw` (_read_layers' output; the layers then hold the only references, so that moving them later frees
    memory) or, when not given, read now."""
    if data is None or raw is None:
        stored = frozenset(layers) if rt.plan.pinned_stored else frozenset()
        want = {i: (0, 1, 2) for i in layers if i not in stored}
        data, raw, _ = _read_layers(rt, layout, want, verify, stored, layers=layers)
    for i in layers:
        mlp = model.layers[i].mlp
        if i in raw:  # GGUF blocks are held in MLX: the GGUF matmuls read them there, with no copy per token
            mlp._stored = _pinned_chunks(rt.blocks, i, raw.pop(i)) if layout.blocks else raw.pop(i)
        else:
            mlp._pinned = tuple(data.pop(i))
        mlp.mode = "pinned"


def _repin(model: nn.Module, rt: FlashRuntime, layout: FlashLayout, verify: bool, pinned: list[int],
           name: str) -> None:
    """Move a dense plan's pinned layers to `pinned` (as many; the layout `name` places them so): one layer
    at a time, the old one released before the new one is read, so memory stays within the plan; the ring
    is rebuilt for the new order. A read that fails leaves its layer streamed (the plan then pins fewer)
    and raises."""
    plan, new = rt.plan, set(pinned)
    per_layer = plan.pinned_bytes // max(1, len(plan.pinned))
    rt.set_plan(replace(plan, streamed=[]))  # no ring while layers move: its staging is freed first
    try:
        for old, layer in zip(sorted(set(plan.pinned) - new), sorted(new - set(plan.pinned))):
            mlp = model.layers[old].mlp
            mlp._pinned = mlp._stored = None
            mlp.mode = "stream"
            _pin(model, rt, layout, [layer], verify)
    finally:
        modes = [block.mlp.mode for block in model.layers]
        held = [i for i, mode in enumerate(modes) if mode == "pinned"]
        rt.set_plan(replace(plan, pinned=held, streamed=[i for i, mode in enumerate(modes) if mode != "pinned"],
                            pinned_bytes=len(held) * per_layer, pin_layout=name))
        for block in model.layers:
            block.mlp.bind_units()


def load_flash_model(folder, *, dtype: Optional[str] = None, memory_budget=None, sparsity: Optional[float] = None,
                     sparsity_mode: str = "threshold", window: int = 4, dequantize: bool = False,
                     naive: bool = False, verify: bool = True, io_threads: int = 4, ring_depth: Optional[int] = None,
                     max_unit_bytes: int = 16 << 20, read_split: int = 8 << 20,
                     native: Optional[bool] = None, lookahead: bool = False,
                     pin_layout: str = "auto") -> tuple[nn.Module, dict, FlashLayout]:
    """Build the model of a flash layout (see `applelm.load` for the user-facing options).
    `native`: compute paged FFN neurons of single tokens with the compiled CPU kernel (flash/native.py);
    None = under a budget on the CPU when the kernel builds (dense or sparse), False = always the MLX path,
    True = required (an error without it); without a budget it then pins every FFN layer as stored bundles
    (the smallest fully resident form) instead of as floats.
    `lookahead` (sparse paging; default off): while a layer computes, read the next layer's neurons guessed
    from this layer's input (at most as many as it missed on the last token), into two more buffers of
    1/8 of a layer each (budget.ahead_buffer).
    `pin_layout` (dense paging): "tail" pins the last FFN layers, "spread" places them evenly among the
    streamed ones (budget.pinned_layers); "auto" (default) starts from the tail and, when a few throwaway
    decode steps at load spend a fifth or more of their time waiting on reads, tries the spread layout and
    keeps the one whose steps were faster (auto_layout.py)."""
    from ..loader import _compute_dtype  # the core loader's dtype rule (float32 on CPU)

    layout = read_layout(folder)
    if verify:
        verify_resident(layout)
    config = layout.config
    budget = parse_size(memory_budget) if memory_budget is not None else None
    if sparsity is not None and not 0.0 < float(sparsity) < 1.0:
        raise UserError(f"sparsity must be in (0, 1), got {sparsity}")
    if sparsity_mode not in SPARSITY_MODES:
        raise UserError(f"sparsity mode must be one of {', '.join(SPARSITY_MODES)}, got {sparsity_mode!r}")
    if pin_layout not in PIN_LAYOUTS:
        raise UserError(f"pin layout must be one of {', '.join(PIN_LAYOUTS)}, got {pin_layout!r}")
    if window < 1:
        raise UserError(f"window must be >= 1, got {window}")

    arch = get_architecture(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    try:
        weights = mx.load(str(layout.resident_path))
    except (RuntimeError, ValueError) as e:
        raise ModelFormatError(f"{layout.resident_path}: cannot be read as safetensors ({e})") from None
    weights = model.sanitize(weights)
    specs = layout.index["resident"].get("quantized", {})
    swap_quantized(model, {p: s for p, s in specs.items() if f"{p}.weight" in weights})
    dtype_ = _compute_dtype(dtype, weights)
    weights = {k: v.astype(dtype_) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    for _, module in model.named_modules():
        if isinstance(module, GGUFEmbedding):
            module.dtype = dtype_
    acts = [activation_of(block.mlp) for block in model.layers]
    kernel = None
    if layout.blocks and sparsity is not None:
        raise UserError(f"{layout.folder}: this flash layout keeps the GGUF file's blocks (prepare --gguf-blocks), "
                        "which page whole layers; sparse paging needs a layout prepared with --bits 16, 8 or 4")
    if layout.blocks and native:
        raise UserError("native=True: the native flash kernel reads per-neuron bundles; a --gguf-blocks layout "
                        "is computed by the GGUF matmuls (on the CPU by their own C kernel)")
    # Only paging under a budget reads bundles (no budget: every layer pinned, or every neuron cached),
    # so only it builds or loads the kernel unless asked to.
    if not layout.blocks and (native or (native is None and budget is not None and mx.default_device() == mx.cpu)):
        kernel = bundle_ffn(layout.codec, acts[0]) if len(set(acts)) == 1 else None
        if native and kernel is None:
            raise UserError("native=True, but the native flash kernel is unavailable (no C compiler, "
                            "APPLELM_NATIVE=off, or an activation it does not implement)")
    for block in model.layers:  # the FFN's zero-initialized placeholders are never materialized
        block.mlp = nn.Module()
    itemsize = mx.zeros((), dtype_).itemsize
    resident = resident_bytes(model, dequantize, itemsize)

    codec = layout.codec
    # With the kernel, pinned layers stay in the store's format (no float copies) and go through it too.
    # Prompts then decode ~2 MB of floats at a time (at least 64 neurons).
    unit_neurons = max(1, min(layout.n_bundles, max_unit_bytes // codec.bundle_bytes))
    stored_layer = decode_neurons = None
    if kernel is not None:
        stored_layer = aligned(layout.intermediate * codec.bundle_bytes)
        decode_neurons = min(unit_neurons, max(64, (2 << 20) // (3 * layout.hidden * itemsize)))
    if layout.blocks:
        # Chunks stay GGUF blocks in memory too. A prompt's matmuls copy a streamed chunk into MLX and
        # dequantize its rows a bounded step at a time (blocks.PROMPT_SCRATCH_BYTES).
        geom = Geometry(layout.n_layers, layout.hidden, codec.n_bundles, codec.bundle_bytes, 0, itemsize,
                        unit_neurons, aligned(max(e.n_bytes for e in layout.layers)), 1,
                        bundle_floats=PROMPT_SCRATCH_BYTES, float_layers=False)
    else:
        geom = Geometry(layout.n_layers, layout.hidden, layout.intermediate, codec.bundle_bytes, codec.part_bytes,
                        itemsize, unit_neurons, stored_layer, decode_neurons)
    thresholds = predictors = None
    if sparsity is not None:
        thresholds = _thresholds(layout, float(sparsity))
        if sparsity_mode == "threshold":
            # Resident gates: with the kernel as stored (it computes act(gate . x) from the bytes: 2x
            # smaller than float32 for a 16-bit store, ~4x for 8-bit), else in the compute dtype.
            per_row = codec.part_bytes if kernel is not None else layout.hidden * itemsize
            selector = layout.n_layers * layout.intermediate * per_row
        else:
            predictors, _ = _predictors(layout, dtype_, float(sparsity))
            selector = sum(a.nbytes + b.nbytes + c.nbytes for a, b, c, _ in predictors)
        # Off unless asked for: bounded by the misses, it was still slower than none on the sparse ReLU model
        # and on SmolLM2 (benchmarks/lookahead_bound.py; docs/flash.md, Lookahead).
        plan = plan_sparse(geom, resident, budget, selector, 2 if sparsity_mode == "threshold" else 3,
                           lookahead=lookahead)
    else:
        # The ring's depth (unless given) trades queued reads against pinned layers (budget.plan_dense). The
        # native kernel reads units where they land: no in-flight MLX copies beyond one prompt decode step.
        # A GGUF-blocks decode step (a prompt's copy of a chunk and its dequantizing scratch): one at a time.
        inflight = 1 if kernel or layout.blocks else 2
        plan = plan_dense(geom, resident, budget, depth=ring_depth, inflight=inflight, naive=naive,
                          pin_layout=pin_layout)

    rt = FlashRuntime(layout, plan, dtype_, io_threads=io_threads, max_unit_bytes=max_unit_bytes,
                      read_split=read_split, geometry=geom)
    rt.thresholds = thresholds
    rt.native = kernel
    if plan.mode == "sparse" and lookahead:
        rt.enable_lookahead()
    pinned = set(plan.pinned)
    for i, block in enumerate(model.layers):
        mode = {"naive": "naive", "sparse": "sparse"}.get(plan.mode) or ("pinned" if i in pinned else "stream")
        block.mlp = FlashMLP(i, rt, acts[i], mode)
        if mode == "sparse":
            rt.sparse_layers[i] = block.mlp
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelFormatError(f"{layout.resident_path}: weights do not match the {config['model_type']} "
                               f"model: {e}") from None
    if dequantize:
        dequantize_model(model)
    mx.eval(model.parameters())

    stored = frozenset(pinned) if plan.pinned_stored else frozenset()
    want = {i: (0, 1, 2) for i in pinned - stored}
    stored_gates = frozenset()
    if plan.mode == "sparse" and sparsity_mode == "threshold":
        if kernel is not None:
            want, stored_gates = {}, frozenset(range(layout.n_layers))
        else:
            want = {i: (2,) for i in range(layout.n_layers)}
    data, raw, gates = _read_layers(rt, layout, want, verify, stored, stored_gates)
    _pin(model, rt, layout, sorted(pinned), verify, data, raw)
    for i, block in enumerate(model.layers):
        mlp = block.mlp
        if mlp.mode == "sparse":
            if sparsity_mode == "threshold" and kernel is not None:
                mlp._gate_stored = gates[i]
            elif sparsity_mode == "threshold":
                mlp._gate = data[i][0]
            else:
                mlp._predictor = predictors[i]
            # With the kernel: bundles as stored, one byte row per neuron; else a float row per part.
            parts, width, cache_dtype = ((1, mlp._n_parts * codec.part_bytes, mx.uint8) if kernel is not None
                                         else (mlp._n_parts, layout.hidden, dtype_))
            mlp._cache = NeuronCache(layout.intermediate, plan.cache_capacity, parts, width, cache_dtype, window)
    if budget is not None:
        # MLX keeps freed buffers for reuse; paging frees buffers of many sizes, so without a limit that
        # pool alone would grow past the budget. Keep it to the paging buffers' size (process-wide).
        # MLX buffers of paging are one decode step's copy and floats at a time (host staging is not MLX's).
        pool = max(geom.decode_bytes, 4 << 20)
        mx.set_cache_limit(min(mx.set_cache_limit(0) or pool, pool))
    rt.sparsity, rt.sparsity_mode, rt.window = sparsity, sparsity_mode if sparsity is not None else None, window
    model.flash = rt
    model.eval()
    if pin_layout == "auto":
        settle_pin_layout(model, rt, lambda layers, name: _repin(model, rt, layout, verify, layers, name))
    rt.reset_stats()
    return model, config, layout


def flash_tokenizer(layout_or_folder):
    """The tokenizer a flash layout carries (GGUF metadata as JSON, or Hugging Face tokenizer files)."""
    from ..tokenizer import load_tokenizer, tokenizer_from_gguf

    folder = Path(getattr(layout_or_folder, "folder", layout_or_folder))
    meta_path = folder / GGUF_TOKENIZER_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{meta_path}: not valid JSON ({e})") from None
        return tokenizer_from_gguf(meta)
    return load_tokenizer(folder)
