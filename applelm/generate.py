"""`python -m applelm.generate`: generate text from a prompt, streaming it as it is produced."""

from __future__ import annotations

import sys
import time
import types
from typing import Optional

import mlx.core as mx

from .cli_common import (ArgumentParser, add_flash_arguments, add_model_arguments, flash_options, float_in,
                         non_negative_int, positive_int, run_main)
from .errors import UserError
from .generation import generate, stream_generate
from .loader import load
from .sample import make_logits_processors, make_sampler

PROG = "applelm.generate"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Generate text with a local model (GGUF file, model folder or "
                                              "Hugging Face repo id). Default model: SmolLM2-135M-Instruct.")
    add_model_arguments(p, "hold quantized layers as dense weights: more memory, faster on CPU")
    p.add_argument("--prompt", "-p", default="Hello", help="the prompt; '-' reads it from stdin")
    p.add_argument("--system-prompt", default=None, help="system message for chat models")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=256)
    p.add_argument("--temp", type=float_in(0, 100), default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 disables")
    p.add_argument("--min-p", type=float_in(0, 1, high_open=True), default=0.0)
    p.add_argument("--repetition-penalty", type=float_in(0, 100, low_open=True), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kv-size", type=positive_int, default=None, help="keep only the last N positions")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as raw text")
    add_flash_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true", help="print the formatted prompt and more detail")
    return p


def format_prompt(tokenizer, prompt: str, system_prompt: Optional[str], ignore_chat_template: bool) -> str:
    """The text the model sees: the chat template applied to [system, user] unless disabled or absent."""
    if ignore_chat_template or tokenizer.chat_template is None:
        return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def stats_line(load_s: float, r) -> str:
    return (f"[load {load_s:.2f} s | prompt {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"peak memory {r.peak_memory_gb:.3f} GB]")


def _main(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty")
    if args.seed is not None:
        mx.random.seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, dequantize=args.dequantize, **flash_options(args))
    load_s = time.perf_counter() - start
    text = format_prompt(tokenizer, prompt, args.system_prompt, args.ignore_chat_template)
    if args.verbose:
        print(f"[device {mx.default_device()} | prompt as the model sees it:]\n{text}\n[response:]", file=sys.stderr)
    last = None
    for last in stream_generate(
        model, tokenizer, text, max_tokens=args.max_tokens, stop=args.stop,
        sampler=make_sampler(args.temp, args.top_p, args.top_k, args.min_p),
        logits_processors=make_logits_processors(args.repetition_penalty),
        max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
    ):
        print(last.text, end="", flush=True)
    print(flush=True)
    print(stats_line(load_s, last) + (f" finish={last.finish_reason}" if args.verbose else ""), file=sys.stderr)
    runtime = getattr(model, "flash", None)
    if runtime is not None and args.verbose:
        r = runtime.report()
        print(f"[flash: {runtime.plan.describe()} | read {r['bytes_per_token'] / 1e6:.2f} MB/token at "
              f"{r['read_GBps']:.2f} GB/s, I/O hidden behind compute {100 * r['io_overlap']:.0f}%]", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_main(PROG, lambda: _main(argv))


class _CallableModule(types.ModuleType):
    """Importing this CLI module rebinds `applelm.generate` to it; calling it still means the API's
    `generate(model, tokenizer, prompt, ...)`, so both spellings keep working."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
