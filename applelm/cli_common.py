"""What every command-line entry point shares: one-line errors with exit status 2, and no tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import UserError
from .flash.budget import PIN_LAYOUTS

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not the usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type for a float in [low, high] (ends optionally open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if value != value or value < low or value > high or (low_open and value == low) or (high_open and value == high):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low}, {high}{hi}, got {text}")
        return value

    return parse


def size_arg(text: str) -> int:
    """An argparse type for a memory size: 2GB, 512MB, 1.5GiB, or plain bytes (strict)."""
    from .flash.budget import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arguments(p: argparse.ArgumentParser, dequantize_help: str) -> None:
    """Which model and how it is held, shared by `applelm.generate` and `applelm.server`."""
    from .loader import DTYPES

    p.add_argument("--model", default=None, help="GGUF file, model folder or HF repo id (default: embedded SmolLM2)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: float32 on CPU)")
    p.add_argument("--dequantize", action="store_true", help=dequantize_help)
    p.add_argument("--prefill-step-size", type=positive_int, default=512)


def add_flash_arguments(p: argparse.ArgumentParser) -> None:
    """The flash-paging flags, shared by `applelm.generate` and `applelm.server`."""
    p.add_argument("--memory-budget", type=size_arg, default=None, metavar="SIZE",
                   help="flash layouts: memory for weights and paging buffers (e.g. 1GB, 512MiB); the rest of "
                        "the FFN streams from SSD (write a layout with python -m applelm.flash prepare)")
    p.add_argument("--sparsity", type=float_in(0, 1, low_open=True, high_open=True), default=None,
                   help="flash layouts: target fraction of FFN neurons skipped per token (e.g. 0.5)")
    p.add_argument("--sparsity-mode", choices=("threshold", "predictor"), default="threshold",
                   help="threshold: resident gates and calibrated thresholds; predictor: low-rank predictors")
    p.add_argument("--window", type=positive_int, default=4, help="flash sparsity: tokens a neuron stays cached")
    p.add_argument("--pin-layout", choices=PIN_LAYOUTS, default="auto",
                   help="flash dense paging: pin the last FFN layers (tail), or spread the pinned layers among the "
                        "streamed ones, so reads go on through their compute; auto (default): when a few decode "
                        "steps at load wait on reads, try both and keep the faster (benchmarks/pin_layout.py)")


def flash_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for `applelm.load` from the flash flags (empty when paging is not asked for)."""
    if args.memory_budget is None and args.sparsity is None:
        return {}
    return dict(memory_budget=args.memory_budget, sparsity=args.sparsity, sparsity_mode=args.sparsity_mode,
                window=args.window, pin_layout=args.pin_layout)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body: user errors -> one line and exit 2; anything unexpected -> one line and exit 1."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: still one line, the traceback only on request
        if os.environ.get("APPLELM_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (set APPLELM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
