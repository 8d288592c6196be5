"""The embedded SmolLM2 GGUF through applelm.convert: the folder loads in applelm and mlx-lm (tokenizer
included) and still answers; perplexity on real text is sane."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from applelm.convert import convert
from applelm.loader import default_model_path
from applelm.perplexity import main as perplexity_main

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def q8_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "q8"
    convert(default_model_path(), out, bits=8, group_size=64, fit="mlx", progress=False)  # mlx fit: seconds
    return out


def test_converted_gguf_loads_in_applelm_and_mlx_lm(q8_folder):
    import mlx_lm

    from applelm import generate, load

    cfg = json.loads((q8_folder / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    model, tokenizer = load(q8_folder)
    _, gguf_tokenizer = load(default_model_path())
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == gguf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=12)

    from mlx_lm.utils import dequantize_model

    theirs, their_tokenizer = mlx_lm.load(str(q8_folder))
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert their_tokenizer.encode(prompt, add_special_tokens=False) == ids
    # MLX's CPU quantized matmul takes minutes for a prompt; mlx-lm's own dequantize keeps the same values.
    theirs = dequantize_model(theirs)
    ours_logits, their_logits = model(mx.array([ids]))[0, -1], theirs(mx.array([ids]))[0, -1]
    assert int(mx.argmax(ours_logits)) == int(mx.argmax(their_logits))
    assert set(tokenizer.eos_token_ids) <= set(their_tokenizer.eos_token_ids)


def test_perplexity_cli_on_real_text(capsys):
    code = perplexity_main(["--text", "/usr/share/common-licenses/GPL-3", "--max-tokens", "257", "--context",
                            "256", "--dequantize", "--json", "-q"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["tokens"] == 256
    assert 5 < out["perplexity"] < 60  # measured ~20 on the first 4096 tokens (benchmarks/results)
