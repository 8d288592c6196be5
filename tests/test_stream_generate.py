"""stream_generate on a tiny GGUF model with a real byte-level BPE tokenizer: text, stops, EOS, stats."""

from __future__ import annotations

import mlx.core as mx
import pytest

from applelm import generate, generate_step, load, stream_generate
from gguf_fixtures import write_tiny_llama_gguf

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama_gguf(path, seed=11, chat_template=CHATML)
    return load(path)


def never_eos(eos_ids):
    def process(tokens, logits):
        logits[:, list(eos_ids)] = -1e9
        return logits
    return process


def test_text_equals_decode_of_generated_tokens(tiny):
    model, tok = tiny
    procs = [never_eos(tok.eos_token_ids)]
    ids = tok.encode("hello world", add_special_tokens=False)
    tokens = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=20, logits_processors=procs)]
    pieces = list(stream_generate(model, tok, ids, max_tokens=20, logits_processors=procs))
    assert "".join(p.text for p in pieces) == tok.decode(tokens)
    last = pieces[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 20
    assert last.prompt_tokens == len(ids) and last.generation_tps > 0 and last.peak_memory_gb >= 0
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_stop_string_cuts_text_before_it(tiny):
    model, tok = tiny
    procs = [never_eos(tok.eos_token_ids)]
    full = generate(model, tok, "the world", max_tokens=24, logits_processors=procs)
    assert len(full) > 8
    stop = full[5:8]
    expected = full[: full.index(stop)]
    pieces = list(stream_generate(model, tok, "the world", max_tokens=24, stop=[stop], logits_processors=procs))
    assert "".join(p.text for p in pieces) == expected
    assert pieces[-1].finish_reason == "stop"
    # nothing past the stop was ever shown, even in intermediate pieces
    shown = ""
    for p in pieces:
        shown += p.text
        assert stop not in shown


def test_eos_token_ends_generation(tiny):
    model, tok = tiny
    eos = min(tok.eos_token_ids)
    step = {"n": 0}

    def force_eos_at_third(tokens, logits):
        step["n"] += 1
        if step["n"] == 3:
            logits[:, eos] = 1e9
        else:
            logits[:, list(tok.eos_token_ids)] = -1e9
        return logits

    pieces = list(stream_generate(model, tok, "hello", max_tokens=50, logits_processors=[force_eos_at_third]))
    assert pieces[-1].finish_reason == "stop"
    assert pieces[-1].generation_tokens == 2


def test_chat_template_prompt_has_no_double_bos(tiny):
    _, tok = tiny
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text.startswith("<|im_start|>user\nhello<|im_end|>")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.encode("<|im_start|>", add_special_tokens=False)[0]


def test_generate_function_survives_importing_the_cli_module(tiny):
    import applelm
    import applelm.generate  # noqa: F401  (rebinds the package attribute to the CLI module)

    model, tok = tiny
    assert isinstance(applelm.generate(model, tok, "hello", max_tokens=3), str)
