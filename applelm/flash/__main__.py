"""`python -m applelm.flash`: prepare a flash layout, show one, or verify its checksums."""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Optional

from ..cli_common import ArgumentParser, float_in, positive_int, run_main
from ..errors import UserError

PROG = "applelm.flash"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Flash paging: store a model's FFN weights for streaming from SSD.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    pp = sub.add_parser("prepare", help="write a flash layout from a GGUF file or a safetensors folder")
    pp.add_argument("model", help="GGUF file, model folder or HF repo id ('default': the embedded SmolLM2)")
    pp.add_argument("out", help="output folder (created; an existing flash layout there is replaced)")
    pp.add_argument("--bits", type=int, choices=(32, 16, 8, 4), default=None,
                    help="FFN storage: 16 = float16 (bfloat16 for bf16 checkpoints, the default), 8/4 = affine "
                         "groups of 64")
    pp.add_argument("--gguf-blocks", action="store_true",
                    help="keep a GGUF file's own quantized FFN blocks, bundled by chunks of neurons: exact and "
                         "as small as the file; whole-layer paging only (no sparsity)")
    pp.add_argument("--dtype", choices=("float16", "bfloat16"), default=None,
                    help="16-bit storage type (default: bfloat16 for bf16 checkpoints, else float16; "
                         "bfloat16 decodes ~5x faster on CPU, float16 is more precise)")
    pp.add_argument("--calibration", default=None, metavar="FILE",
                    help="text to calibrate sparsity thresholds on (default: a built-in English sample)")
    pp.add_argument("--calibration-tokens", type=positive_int, default=1024)
    pp.add_argument("--no-calibrate", action="store_true", help="skip calibration (no sparsity available)")
    pp.add_argument("--train-predictors", action="store_true", help="also train low-rank activity predictors")
    pp.add_argument("--target-sparsity", type=float_in(0.05, 0.95), default=0.5,
                    help="sparsity the predictors are trained for")
    pp.add_argument("--rank", type=positive_int, default=None, help="predictor rank (default hidden/8, 8..64)")
    pp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    for name, helptext in (("info", "print a flash layout's index summary"),
                           ("verify", "check every checksum of a flash layout (reads all of it)")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("folder")
    return p


def _prepare(args) -> int:
    from ..loader import resolve_model_path
    from .prepare import gguf_blocks_hint, prepare

    if args.gguf_blocks and (args.bits is not None or args.dtype is not None):
        raise UserError("--gguf-blocks keeps the file's own blocks: drop --bits / --dtype")
    model = resolve_model_path(None if args.model == "default" else args.model)
    out = prepare(model, args.out, bits=args.bits or 16, dtype=args.dtype, gguf_blocks=args.gguf_blocks,
                  calibration=args.calibration, calibrate=not args.no_calibrate,
                  train_predictors=args.train_predictors, target_sparsity=args.target_sparsity,
                  predictor_rank=args.rank, calibration_tokens=args.calibration_tokens,
                  show_progress=not args.quiet)
    print(summary(out))
    hint = gguf_blocks_hint(model, out)
    if hint:
        print(hint, file=sys.stderr)
    return 0


def _store_text(store: dict) -> str:
    if store.get("kind") != "gguf_blocks":
        return json.dumps(store)
    types = Counter(t for layer in store["types"] for t in layer)
    return (f"GGUF blocks in chunks of {store['chunk_neurons']} neurons, "
            + ", ".join(f"{n} x {t}" for t, n in types.most_common()))


def summary(folder) -> str:
    from .budget import format_size
    from .layout import read_layout

    layout = read_layout(folder)
    idx = layout.index
    lines = [f"{layout.folder}: {idx['model_type']}, {layout.n_layers} layers, hidden {layout.hidden}, "
             f"intermediate {layout.intermediate}",
             f"  FFN store: {_store_text(idx['store'])}, {format_size(layout.ffn_bytes)} in {layout.n_layers} files",
             f"  resident: {format_size(idx['resident']['n_bytes'])}"]
    if idx.get("sparsity"):
        lines.append(f"  sparsity thresholds calibrated on {idx['sparsity']['calibration']}")
        zeros = idx["sparsity"].get("zero_fraction") or [0.0]
        if max(zeros) > 0:  # a ReLU FFN: sparsity up to its exact zeros skips only neurons that contribute 0
            lines.append(f"  exact zeros (natural sparsity): {min(zeros):.3f}-{max(zeros):.3f} of neurons by layer, "
                         f"mean {sum(zeros) / len(zeros):.3f}")
    if idx.get("predictors"):
        pr = idx["predictors"]
        lines.append(f"  predictors: rank {pr['rank']}, target sparsity {pr['target_sparsity']}, held-out recall "
                     f"{pr['mean_recall']:.3f} reading {pr['mean_predicted_fraction']:.3f} of neurons")
    return "\n".join(lines)


def _main(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "info":
        print(summary(args.folder))
        return 0
    from .layout import read_layout, verify_resident

    layout = read_layout(args.folder)
    verify_resident(layout)
    layout.verify_data()
    print(f"{layout.folder}: index, resident weights and {layout.n_layers} layer files verified")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
