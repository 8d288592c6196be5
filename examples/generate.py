"""Load a model, generate a reply, then stream one token by token.

    python examples/generate.py [--model PATH_OR_REPO] [--prompt TEXT] [--max-tokens N]

Without --model it uses the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF shipped as a Python package).
"""

import argparse

from applelm import generate, load, stream_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file, model folder or Hugging Face repo id")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    model, tokenizer = load(args.model)
    # Chat models answer best when the prompt goes through their chat template.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)

    print("generate():", generate(model, tokenizer, prompt, max_tokens=args.max_tokens))

    print("stream_generate(): ", end="")
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens):
        print(last.text, end="", flush=True)
    print(f"\n[{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}]")


if __name__ == "__main__":
    main()
