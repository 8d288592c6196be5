"""`prepare`: write a flash layout (see layout.py) from a GGUF file or a safetensors folder.

FFN weights become row-column bundles (neuron i's up row, down column and gate row side by side), one
aligned file per layer. A GGUF down projection is quantized along rows, so one of its columns cannot be
taken out without dequantizing: every FFN is dequantized and re-stored, as float16 (--bits 16, default:
exact for GGUF blocks up to float16 rounding of d*q+m), float32 (--bits 32), or with a per-part affine
quantization (--bits 8/4, groups of 64: 1/2 to 1/4 of the bytes, at a re-quantization error on top of
the checkpoint's own). Safetensors checkpoints stored in bfloat16 keep bfloat16 at --bits 16 (exact).
--gguf-blocks instead keeps a GGUF file's own blocks, bundled by chunks of neurons (blocks.py): exact and
as small as the file, for whole-layer paging (no sparsity, so no calibration).

Calibration (on by default) runs text through the prepared model and stores per-layer activation
thresholds for target sparsities 5%..95%; --train-predictors also fits the low-rank predictors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import ModelFormatError, UserError
from ..progress import Progress
from .blocks import BlockCodec
from .codec import BundleCodec
from .layout import (ALIGN, FORMAT, INDEX_FILE, PREDICTOR_FILE, RESIDENT_FILE, VERSION, aligned, crc32_file,
                     is_flash_layout, layer_file, read_layout, write_index)
from .source import open_source

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
CALIBRATION_CHUNK = 256


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not is_flash_layout(out):
            raise UserError(f"{out}: exists and is not empty (and not a flash layout to replace)")
        if is_flash_layout(out):
            (out / INDEX_FILE).unlink()  # an interrupted rewrite must not look like a valid layout
            shutil.rmtree(out / "ffn", ignore_errors=True)
            (out / PREDICTOR_FILE).unlink(missing_ok=True)
    (out / "ffn").mkdir(parents=True, exist_ok=True)


def _write_layer(path: Path, data: np.ndarray) -> tuple[int, int]:
    """Write bundles, zero-padded to ALIGN; returns (data bytes, crc32 of the data)."""
    raw = memoryview(np.ascontiguousarray(data)).cast("B")
    with open(path, "wb") as fh:
        fh.write(raw)
        pad = aligned(len(raw)) - len(raw)
        if pad:
            fh.write(b"\0" * pad)
    return len(raw), zlib.crc32(raw)


def _bundle_layer(src, codec: BundleCodec, i: int, hidden: int, inter: int) -> np.ndarray:
    gate, up, down = src.ffn(i)
    if gate.shape != (inter, hidden) or up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise ModelFormatError(f"{src.path}: layer {i} FFN shapes {gate.shape}, {up.shape}, {down.shape} do "
                               f"not match hidden {hidden} / intermediate {inter}")
    return codec.encode(np.stack([up, down.T, gate], axis=1))  # (I, 3, H): PARTS order


def _blocks_layer(src, codec: BlockCodec, i: int) -> np.ndarray:
    from ..ops.ggml_types import GGML_TYPES_BY_NAME

    types, up, down, gate = src.ffn_blocks(i)
    want = [(codec.intermediate, codec.hidden), (codec.hidden, codec.intermediate),
            (codec.intermediate, codec.hidden)]
    for name, t, raw, (rows, cols) in zip(("up", "down", "gate"), types, (up, down, gate), want):
        if raw.shape != (rows, GGML_TYPES_BY_NAME[t].row_bytes(cols)):
            raise ModelFormatError(f"{src.path}: layer {i} ffn_{name} is not a ({rows}, {cols}) {t} matrix")
    return codec.encode(i, up, down, gate)


def prepare(model, out, *, bits: int = 16, dtype: Optional[str] = None, calibration: Optional[str] = None, calibrate: bool = True,
            train_predictors: bool = False, target_sparsity: float = 0.5, predictor_rank: Optional[int] = None,
            calibration_tokens: int = 1024, calibration_ids: Optional[Sequence[int]] = None,
            show_progress: bool = True, gguf_blocks: bool = False) -> Path:
    """Write the flash layout of `model` (GGUF file or safetensors folder) to folder `out`; returns it.

    bits: FFN storage (32, 16, 8, 4); dtype: for 16 bits, "float16" or "bfloat16" (default: bfloat16
    for bfloat16 checkpoints, else float16). bfloat16 converts to float32 about 5x faster on MLX's CPU
    backend, float16 keeps 3 more mantissa bits (see docs/flash.md). gguf_blocks: keep a GGUF file's
    own FFN blocks instead (bits and dtype do not apply; no calibration: the store has no sparse paging)."""
    src = open_source(model)
    out = Path(out)
    cfg = src.config
    n_layers, hidden, inter = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    if dtype not in (None, "float16", "bfloat16"):
        raise UserError(f"16-bit storage dtype must be float16 or bfloat16, got {dtype!r}")
    if gguf_blocks:
        if train_predictors or calibration is not None:
            raise UserError("--gguf-blocks stores chunks of neurons for whole-layer paging: it has no sparsity "
                            "to calibrate or predict (drop --calibration / --train-predictors)")
        calibrate = False
        codec = BlockCodec.for_types(hidden, inter, [src.ffn_blocks(i)[0] for i in range(n_layers)])
    else:
        codec = BundleCodec.for_bits(hidden, bits, dtype or src.float_dtype)
    if train_predictors and not calibrate:
        raise UserError("--train-predictors needs calibration (drop --no-calibrate)")
    _prepare_out(out)

    layers = []
    what = "GGUF blocks" if gguf_blocks else f"{bits}-bit"
    bar = Progress(f"bundling FFN ({what})", n_layers, show_progress)
    for i in range(n_layers):
        data = _blocks_layer(src, codec, i) if gguf_blocks else _bundle_layer(src, codec, i, hidden, inter)
        n_bytes, crc = _write_layer(out / layer_file(i), data)
        layers.append({"file": layer_file(i), "n_bytes": n_bytes, "file_bytes": aligned(n_bytes), "crc32": crc})
        bar.update()
    bar.close()

    weights, specs = src.resident()
    resident_path = out / RESIDENT_FILE
    mx.save_safetensors(str(resident_path), weights)
    del weights
    src.write_tokenizer(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    index = {
        "format": FORMAT, "version": VERSION, "config": cfg, "model_type": cfg["model_type"],
        "hidden_size": hidden, "intermediate_size": inter, "align": ALIGN,
        "store": codec.to_json(),
        "layers": layers,
        "resident": {"file": RESIDENT_FILE, "n_bytes": resident_path.stat().st_size,
                     "crc32": crc32_file(resident_path), "quantized": specs},
        "source": {"kind": src.kind, "name": Path(src.path).name},
    }
    write_index(out, index)
    if calibrate:
        run_calibration(out, calibration, calibration_tokens, calibration_ids, train_predictors, target_sparsity,
                        predictor_rank, show_progress)
    return out


def gguf_blocks_hint(model, out) -> Optional[str]:
    """For a layout of per-neuron bundles prepared from a quantized GGUF whose FFN blocks the GGUF-blocks
    store could keep: how much bigger the bundles are than the file's blocks, and the option; else None."""
    from ..gguf_file import gguf_or_folder
    from .blocks import block_types
    from .budget import format_size
    from .layout import read_layout

    layout = read_layout(out)
    if layout.blocks or not gguf_or_folder(Path(model)).is_file():  # a folder's weights are not opened again
        return None
    src = open_source(model)
    file_bytes = 0
    for i in range(layout.n_layers):
        types, *parts = src.ffn_blocks(i)
        if not set(types) <= block_types():
            return None
        file_bytes += sum(np.asarray(p).nbytes for p in parts)
    ratio = layout.ffn_bytes / file_bytes
    if ratio < 1.2:
        return None
    return (f"note: these FFN bundles take {format_size(layout.ffn_bytes)}, {ratio:.1f}x the file's "
            f"{format_size(file_bytes)} of quantized blocks, and paging reads {ratio:.1f}x the bytes; "
            "prepare with --gguf-blocks to page the file's own blocks (whole-layer paging, no sparsity)")


def _calibration_ids(out: Path, text_path: Optional[str], n_tokens: int, ids: Optional[Sequence[int]]):
    if ids is not None:
        return [int(t) for t in ids][:n_tokens], {"source": "token ids", "tokens": min(len(ids), n_tokens)}
    from .loader import flash_tokenizer

    path = Path(text_path) if text_path else DEFAULT_CALIBRATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"calibration text {path}: cannot be read ({e})") from None
    tokens = flash_tokenizer(out).encode(text)[:n_tokens]
    if len(tokens) < 16:
        raise UserError(f"calibration text {path} gives only {len(tokens)} tokens; at least 16 are needed")
    return tokens, {"source": path.name, "tokens": len(tokens), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _calibration_budget(layout) -> Optional[int]:
    """Fully resident when the model fits in half of physical memory, else half of it."""
    from ..loader import physical_memory

    phys = physical_memory()
    if not phys:
        return None
    need = layout.resident_path.stat().st_size * 2 + layout.n_layers * 3 * layout.intermediate * layout.hidden * 4
    return None if need < phys // 2 else phys // 2


def run_calibration(out, text_path=None, n_tokens: int = 1024, ids=None, train_predictors: bool = False,
                    target_sparsity: float = 0.5, rank: Optional[int] = None, show_progress: bool = True) -> dict:
    """Measure activation thresholds (and train predictors) on calibration text; updates the index."""
    from .loader import load_flash_model
    from .sparsity import LEVELS, Recorder, train_predictor

    out = Path(out)
    layout = read_layout(out)
    tokens, meta = _calibration_ids(out, text_path, n_tokens, ids)
    # Dense resident layers compute fastest; quantized resident layers are dequantized for this pass only.
    model, _, layout = load_flash_model(out, memory_budget=_calibration_budget(layout), verify=False,
                                        dequantize=True)
    rec = Recorder(layout.intermediate, keep_inputs=train_predictors, target=target_sparsity)
    model.flash.recorder = rec
    body = getattr(model, "model", model)  # the decoder stack without the output head: only FFN inputs matter
    from ..cache import make_prompt_cache

    cache = make_prompt_cache(model)
    bar = Progress(f"calibrating on {len(tokens)} tokens", len(tokens), show_progress)
    for s in range(0, len(tokens), CALIBRATION_CHUNK):  # chunks with a KV cache: attention stays cheap
        chunk = tokens[s: s + CALIBRATION_CHUNK]
        mx.eval(body(mx.array(chunk, dtype=mx.int32)[None], cache=cache))
        bar.update(len(chunk))
    bar.close()
    rec.finish()
    model.flash.close()
    missing = [i for i in range(layout.n_layers) if i not in rec.thresholds]
    if missing:
        raise ModelFormatError(f"calibration recorded no activations for layers {missing[:5]}")
    index = dict(layout.index)
    index["sparsity"] = {"levels": LEVELS, "thresholds": [rec.thresholds[i] for i in range(layout.n_layers)],
                         "calibration": meta, "measure": "abs(act(gate x))",
                         # ReLU FFNs: up to this sparsity a layer's threshold is 0 and paging is lossless
                         "zero_fraction": [round(rec.zero_fractions[i], 6) for i in range(layout.n_layers)]}
    if train_predictors:
        rank = rank or max(8, min(64, layout.hidden // 8))
        arrays, taus, recalls, fractions, actives, level_taus, level_fractions = {}, [], [], [], [], [], []
        bar = Progress(f"training predictors (rank {rank})", layout.n_layers, show_progress)
        for i in range(layout.n_layers):
            r = train_predictor(rec.inputs.pop(i), rec.masks.pop(i), rank, act=rec.acts.pop(i),
                                level_thresholds=rec.thresholds[i])
            arrays.update({f"layers.{i}.a": mx.array(r.a), f"layers.{i}.b": mx.array(r.b),
                           f"layers.{i}.bias": mx.array(r.bias)})
            taus.append(r.logit_threshold)
            recalls.append(r.recall)
            fractions.append(r.predicted_fraction)
            actives.append(r.active_fraction)
            level_taus.append(r.level_logit_thresholds)
            level_fractions.append(r.level_predicted_fractions)
            bar.update()
        bar.close()
        path = out / PREDICTOR_FILE
        mx.save_safetensors(str(path), arrays)
        index["predictors"] = {
            "file": PREDICTOR_FILE, "rank": rank, "target_sparsity": target_sparsity, "target_recall": 0.95,
            "logit_thresholds": taus, "recall": recalls, "predicted_fraction": fractions,
            # per layer, at the sparsity levels: the runtime interpolates at the sparsity asked for
            "level_logit_thresholds": level_taus, "level_predicted_fraction": level_fractions,
            "active_fraction": actives, "mean_recall": float(np.mean(recalls)),
            "mean_predicted_fraction": float(np.mean(fractions)), "crc32": crc32_file(path),
        }
    write_index(out, index)
    return index
