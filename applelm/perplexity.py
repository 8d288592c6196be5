"""`python -m applelm.perplexity --model M --text FILE`: perplexity on real text with a sliding window.

Windows of at most `context` tokens advance by `stride` tokens; each window scores only the tokens no earlier
window scored, so every token after the first is scored exactly once, predicted from at least
`context - stride` and at most `context - 1` tokens before it (all of them near the start of the text).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cli_common import ArgumentParser, positive_int, run_main
from .errors import UserError
from .loader import DTYPES, load
from .progress import Progress

PROG = "applelm.perplexity"


@dataclass
class PerplexityResult:
    """tokens: how many tokens were scored; nll: their mean negative log-likelihood (nats per token);
    perplexity: exp(nll); seconds: wall time of the forward passes; context/stride: the window used."""

    tokens: int
    nll: float
    perplexity: float
    seconds: float
    context: int
    stride: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def check_window(context: int, stride: Optional[int]) -> int:
    """Validate the window; returns the stride to use (default: half the context)."""
    if context < 2:
        raise UserError(f"context must be at least 2 tokens, got {context}")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride < context:
        raise UserError(f"stride must be between 1 and context - 1 ({context - 1}), got {stride}")
    return stride


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first): feed tokens[begin:end], score the targets tokens[first:end]."""
    end = min(context, n_tokens)
    first = 1  # the first token has no history to be predicted from
    while True:
        yield max(0, end - context), end, first
        if end == n_tokens:
            return
        first, end = end, min(end + stride, n_tokens)


def perplexity(model: nn.Module, tokens: Sequence[int], context: int = 512, stride: Optional[int] = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of `model` on token ids `tokens` (at least 2), with a sliding window (see module doc)."""
    stride = check_window(context, stride)
    ids = mx.array(list(tokens), dtype=mx.int32)
    if ids.size < 2:
        raise UserError(f"need at least 2 tokens to score, got {ids.size}")
    spans = list(windows(ids.size, context, stride))
    total, count = 0.0, 0
    start = time.perf_counter()
    with Progress("perplexity", len(spans), enabled=progress) as bar:
        for begin, end, first in spans:
            logits = model(ids[None, begin:end])[0, first - 1 - begin: end - 1 - begin].astype(mx.float32)
            targets = ids[first:end]
            picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
            nll = mx.sum(mx.logsumexp(logits, axis=-1) - picked)
            total += float(nll.item())  # float64 accumulation across windows
            count += end - first
            bar.update()
    seconds = time.perf_counter() - start
    mean = total / count
    return PerplexityResult(count, mean, math.exp(mean), seconds, context, stride)


def text_tokens(tokenizer, text: str, max_tokens: Optional[int] = None) -> list[int]:
    """The text's token ids as the model would see them (BOS if the model adds one), cut to `max_tokens`."""
    if not text.strip():
        raise UserError("the text is empty")
    ids = list(tokenizer.encode(text))
    return ids[:max_tokens] if max_tokens else ids


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Perplexity of a model on a text file (sliding window).")
    p.add_argument("--model", default=None, help="GGUF file, model folder or HF repo id (default: embedded SmolLM2)")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512, at least 2)")
    p.add_argument("--stride", type=positive_int, default=None, help="tokens a window advances (default context/2)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: float32 on CPU)")
    p.add_argument("--dequantize", action="store_true",
                   help="hold quantized layers as dense weights (same values; faster on CPU)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _read_text(path: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise UserError(f"text file '{path}' does not exist" if not f.exists() else f"'{path}' is not a file")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file '{path}' is not UTF-8 ({e.reason} at byte {e.start})") from None


def _main(argv: Optional[list[str]]) -> int:
    a = build_parser().parse_args(argv)
    check_window(a.context, a.stride)  # before the model loads: bad flags fail fast
    text = _read_text(a.text)
    if not text.strip():
        raise UserError(f"text file '{a.text}' is empty")
    model, tokenizer = load(a.model, dtype=a.dtype, dequantize=a.dequantize)
    r = perplexity(model, text_tokens(tokenizer, text, a.max_tokens), a.context, a.stride, progress=not a.quiet)
    if a.json:
        print(json.dumps({**asdict(r), "tokens_per_second": r.tokens_per_second}))
    else:
        print(f"tokens scored: {r.tokens} (context {r.context}, stride {r.stride})\n"
              f"mean NLL: {r.nll:.4f} nats/token\nperplexity: {r.perplexity:.3f}\n"
              f"time: {r.seconds:.2f} s ({r.tokens_per_second:.1f} tokens/s)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
