"""Quantize a model with applelm.convert and compare it with its float16 version: size, perplexity, a reply.

    python examples/convert_and_compare.py [--model PATH] [--bits 4] [--group-size 32] [--tokens 512]

Without --model it uses the embedded SmolLM2-135M-Instruct. Its packaged weights are already Q4_1, so the
float16 version is those weights dequantized; the quantized version starts from the same float16 values.
"""

import argparse
import tempfile
from pathlib import Path

from applelm import generate, load
from applelm.convert import convert
from applelm.loader import default_model_path, load_model
from applelm.perplexity import perplexity, text_tokens

TEXT = Path("/usr/share/common-licenses/GPL-3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or model folder (default: embedded SmolLM2)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--recipe", default=None, help="a mixed-bit recipe instead of --bits, e.g. mixed_4_8")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text to score")
    p.add_argument("--text", type=Path, default=TEXT)
    args = p.parse_args()

    src = Path(args.model) if args.model else default_model_path()
    _, tokenizer = load(src)
    tokens = text_tokens(tokenizer, args.text.read_text(), args.tokens)
    question = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])

    with tempfile.TemporaryDirectory() as work:
        quant = dict(recipe=args.recipe, group_size=args.group_size) if args.recipe else \
            dict(bits=args.bits, group_size=args.group_size)
        label = args.recipe or f"{args.bits}-bit g{args.group_size}"
        for name, options in (("float16", dict(dequantize=True)), (label, quant)):
            result = convert(src, Path(work) / "out", force=True, progress=False, **options)
            # Perplexity on dense float32 layers: the same values, faster on MLX's CPU backend.
            dense, _, _ = load_model(result.out, dequantize=True)
            ppl = perplexity(dense, tokens, context=min(512, len(tokens)), stride=min(256, len(tokens) - 1))
            model, tok = load(result.out)
            reply = generate(model, tok, question, max_tokens=24).strip().replace("\n", " ")
            print(f"{name:>12}: {result.size_bytes / 1e6:6.1f} MB, {result.bits_per_weight:5.2f} bits/weight, "
                  f"perplexity {ppl.perplexity:.3f} over {ppl.tokens} tokens | {reply!r}")


if __name__ == "__main__":
    main()
