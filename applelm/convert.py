"""`python -m applelm.convert SRC OUT`: a safetensors folder or a GGUF file -> an applelm/MLX model folder,
quantized (affine 2-8 bits, mxfp4, or a mixed-bit recipe) or dequantized to float.

The result is what mlx-lm's own converter writes (config.json with its `quantization` block, safetensors
shards, tokenizer files), so it loads with `applelm.load` and with `mlx_lm.load`. Quantization always starts
from float weights: a quantized source is dequantized first (quantizing lossy weights again adds its error
on top of theirs).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .cli_common import ArgumentParser, run_main
from .errors import UserError
from .loader import DTYPES, load_model
from .mlx_folder import (MAX_SHARD_BYTES, copy_tokenizer_files, folder_size, make_shards, save_config, save_weights,
                          write_tokenizer)
from .progress import Progress
from .quant import dequantize_model, quantizable, quantize_model
from .recipes import RECIPES, recipe_predicate

PROG = "applelm.convert"
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FITS = ("mse", "mlx")
MODES = {"affine": (4, 64), "mxfp4": (4, 32)}  # mode -> (default bits, default group size); mxfp4 allows no other


@dataclass
class ConvertResult:
    """What `convert` wrote: the folder, its quantization block (None for float), size and bits per weight."""

    out: Path
    quantization: Optional[dict]
    size_bytes: int
    bits_per_weight: float
    seconds: float
    tokenizer_files: list[str] = field(default_factory=list)


def check_options(bits: Optional[int], group_size: Optional[int], mode: str, recipe: Optional[str], dtype: str,
                  dequantize: bool, fit: str = "mse") -> tuple[Optional[int], Optional[int]]:
    """Validate the quantization options; returns the (bits, group_size) to use (None, None for float)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if mode not in MODES:
        raise UserError(f"quantization mode '{mode}' is not one of {', '.join(MODES)}")
    if bits is not None and bits not in BITS:
        raise UserError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise UserError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if fit not in FITS:
        raise UserError(f"fit '{fit}' is not one of {', '.join(FITS)}")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"recipe '{recipe}' is not one of {', '.join(RECIPES)}")
    if dequantize:
        if bits is not None or group_size is not None or recipe is not None or mode != "affine":
            raise UserError("--dequantize writes float weights; it takes no --bits, --group-size, --mode or --recipe")
        return None, None
    if recipe is not None and (bits is not None or mode != "affine"):
        raise UserError(f"recipe '{recipe}' sets the bits itself (affine mode); drop --bits/--mode")
    default_bits, default_group = MODES[mode]
    if mode == "mxfp4" and (bits or 4, group_size or 32) != (4, 32):
        raise UserError("mxfp4 is 4 bits in groups of 32; drop --bits/--group-size or use --mode affine")
    if recipe is not None:
        bits = RECIPES[recipe][0]
    return bits or default_bits, group_size or default_group


def _check_out(src: Path, out: Path, force: bool) -> None:
    """Refuse an output that is a file, the source itself, or non-empty without `force` (nothing is touched)."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output '{out}' exists and is not a folder")
        if src.resolve() == out.resolve():
            raise UserError(f"output '{out}' is the source folder; choose another")
        if any(out.iterdir()) and not force:
            raise UserError(f"output folder '{out}' exists and is not empty (--force to overwrite)")


def _prepare_out(out: Path) -> None:
    # Stale shards from an earlier conversion would be loaded alongside the new ones.
    for f in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _output_config(config: dict, from_gguf: bool, dtype: str) -> dict:
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if from_gguf and config["model_type"] == "gemma3":
        config["model_type"] = "gemma3_text"  # Hugging Face's (and mlx-lm's) name for the text-only model
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "gguf_freq_factors":
        print(f"{PROG}: warning: RoPE frequency factors from the GGUF are kept in applelm's own form; "
              "mlx-lm cannot read them", file=sys.stderr)
    config["torch_dtype"] = dtype
    return config


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per model parameter (quantized weights counted at their unpacked size), as mlx-lm reports."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n += m.weight.size * 32 // m.bits - m.weight.size - m.scales.size - (m.biases.size if "biases" in m else 0)
    return nbytes * 8 / n


def convert(src: Union[str, os.PathLike], out: Union[str, os.PathLike], *, bits: Optional[int] = None,
            group_size: Optional[int] = None, mode: str = "affine", recipe: Optional[str] = None,
            dtype: str = "float16", dequantize: bool = False, fit: str = "mse", force: bool = False,
            max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> ConvertResult:
    """Convert `src` (safetensors folder or GGUF file) into an MLX folder `out`.

    bits/group_size/mode: the quantization (default affine 4-bit, groups of 64; mxfp4 is 4-bit groups of 32).
    recipe: a mixed-bit recipe from applelm.recipes.RECIPES instead of one width for all layers.
    dtype: the float parts (norms, unquantized layers, scales). dequantize: write float weights only.
    fit: "mse" (default) chooses each affine group's scale/bias for the least squared error; "mlx" rounds as
    mx.quantize does, giving byte-identical files to mlx-lm's converter.
    force: write into a non-empty `out`. Raises UserError for bad options or sources.
    """
    start = time.perf_counter()
    bits, group_size = check_options(bits, group_size, mode, recipe, dtype, dequantize, fit)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise UserError(f"source '{src}' does not exist")
    _check_out(src, out, force)
    say = (lambda msg: print(f"{PROG}: {msg}", file=sys.stderr)) if progress else (lambda msg: None)

    say(f"loading {src}")
    model, config, gguf = load_model(src, dtype="float32", lazy=True)
    dequantize_model(model)  # float32 dense weights: quantization below always starts from floats
    target = DTYPES[dtype]
    model.update(tree_map(lambda v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    mx.eval(model.parameters())
    config = _output_config(config, gguf is not None, dtype)
    _prepare_out(out)  # only now: a source that fails to load leaves no output folder behind

    if bits is not None:
        predicate = recipe_predicate(recipe, len(model.layers), group_size) if recipe else None
        n_layers = sum(1 for _, m in model.named_modules() if quantizable(m))
        label = recipe or f"{mode} {bits}-bit g{group_size}"
        with Progress(f"quantize {label}", n_layers, enabled=progress) as bar:
            config["quantization"] = quantize_model(model, bits, group_size, mode, predicate,
                                                    on_layer=lambda _: bar.update(), fit=fit)
            bar.finish()  # layers the group size does not divide stay dense: the bar may not be full yet

    weights = dict(tree_flatten(model.parameters()))
    with Progress("write", len(make_shards(weights, max_shard_bytes)), enabled=progress) as bar:
        save_weights(out, weights, max_shard_bytes, on_shard=bar.update)
    save_config(out, config)
    tokenizer_files = _write_tokenizer(src, out, gguf, config)
    result = ConvertResult(out, config.get("quantization"), folder_size(out), bits_per_weight(model),
                           time.perf_counter() - start, tokenizer_files)
    say(f"wrote {out} ({result.size_bytes / 1e6:.1f} MB, {result.bits_per_weight:.2f} bits per weight, "
        f"{result.seconds:.1f} s)")
    return result


def _write_tokenizer(src: Path, out: Path, gguf, config: dict) -> list[str]:
    """Copy a folder's tokenizer files, or write the GGUF's tokenizer; a missing tokenizer is only a warning
    (the weights are still useful), but applelm.load and mlx_lm.load need one."""
    if gguf is None:
        written = copy_tokenizer_files(src if src.is_dir() else src.parent, out)
        reason = "the source folder has no tokenizer files"
    else:
        from .tokenizer import tokenizer_from_gguf

        try:
            written = write_tokenizer(tokenizer_from_gguf(gguf.metadata), out, config.get("max_position_embeddings"))
            reason = "the tokenizer does not expose its tokenizers backend"
        except UserError as e:
            written, reason = [], str(e)
    if "tokenizer.json" not in written:
        print(f"{PROG}: warning: no tokenizer.json written ({reason}); add one before loading the folder",
              file=sys.stderr)
    return written


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KB' or a plain byte count -> bytes."""
    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            value = int(float(t[: -len(unit)]) * scale)
            break
    else:
        if not t.isdigit():
            raise ValueError(text)
        value = int(t)
    if value < 1:
        raise ValueError(text)
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Convert a safetensors folder or GGUF file into an applelm/MLX "
                                              "model folder (quantized, or float with --dequantize).")
    p.add_argument("src", help="source: a model folder (config.json + safetensors) or a .gguf file")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--bits", "-b", type=int, choices=BITS, default=None, help="bits per weight (default 4)")
    p.add_argument("--group-size", "-g", type=int, choices=GROUP_SIZES, default=None,
                   help="weights sharing one scale/bias (default 64; mxfp4: 32)")
    p.add_argument("--mode", choices=list(MODES), default="affine", help="quantization format (default affine)")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="mixed bits: sensitive layers (embeddings, head, first/last block, some v/down_proj) "
                        "at the high width")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="dtype of the float parts")
    p.add_argument("--fit", choices=FITS, default="mse",
                   help="affine scales: mse = least squared error per group (default); mlx = as mx.quantize "
                        "rounds (byte-identical to mlx-lm's converter, faster)")
    p.add_argument("--dequantize", "-d", action="store_true", help="write float weights, no quantization")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--max-shard-size", type=_size_arg, default=MAX_SHARD_BYTES,
                   help="split weights into shards of at most this size (default 5GB)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return p


def _size_arg(text: str) -> int:
    import argparse

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size (e.g. 5GB, 500MB): {text}") from None


def _main(argv: Optional[list[str]]) -> int:
    a = build_parser().parse_args(argv)
    convert(a.src, a.out, bits=a.bits, group_size=a.group_size, mode=a.mode, recipe=a.recipe, dtype=a.dtype,
            dequantize=a.dequantize, fit=a.fit, force=a.force, max_shard_bytes=a.max_shard_size,
            progress=not a.quiet)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
