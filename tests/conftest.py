"""Shared runner pieces: tiny random models of every architecture, built the way the loader builds them."""

from __future__ import annotations

import sys
from pathlib import Path

import applelm  # noqa: F401  (first: it preloads a fast BLAS, which only works before mlx is imported)
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from applelm.models import get_architecture

# Test helpers (fixtures, block makers) import as plain modules from this folder.
sys.path.insert(0, str(Path(__file__).parent))

VOCAB = 97

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                  rope_theta=10000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=VOCAB,
                    rope_theta=1e6, tie_word_embeddings=True, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  vocab_size=VOCAB, rope_theta=1e6, tie_word_embeddings=False, attention_bias=False),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                   vocab_size=VOCAB, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=5,
                   query_pre_attn_scalar=32, sliding_window_pattern=2,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
ARCHS = list(TINY_CONFIGS)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Give every parameter random values: matrices N(0, scale^2), vectors (norms, biases) U(0.5, 1)."""
    mx.random.seed(seed)
    params = [(k, mx.random.normal(v.shape) * scale if v.ndim > 1 else mx.random.uniform(0.5, 1.0, v.shape))
              for k, v in tree_flatten(model.parameters())]
    model.load_weights(params, strict=True)
    mx.eval(model.parameters())
    return model


def build_tiny(arch: str, seed: int = 0, **overrides):
    module = get_architecture(TINY_CONFIGS[arch]["model_type"])
    config = {**TINY_CONFIGS[arch], **overrides}
    return randomize(module.Model(module.ModelArgs.from_dict(config)), seed), config


@pytest.fixture(params=ARCHS)
def tiny(request):
    """(arch name, model, config) for each architecture."""
    model, config = build_tiny(request.param)
    return request.param, model, config
