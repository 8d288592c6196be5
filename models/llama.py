"""Llama 2/3/3.x (including llama3 RoPE scaling), Mistral and SmolLM: pre-norm decoder with GQA and SwiGLU;
with `hidden_act: relu`, the ReLU family's gated FFN (ReluLLaMA-style checkpoints).

Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints load with almost no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..ops import gated_ffn, shared_input
from .base import (BaseModelArgs, attention_mask, check_config_value, make_rope,
                   scaled_dot_product_attention)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None  # Mistral v0.1; None means full attention

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_config_value("hidden_act", self.hidden_act, ("silu", "relu"))


class Attention(nn.Module):
    """Grouped-query attention; `qkv_bias`/`o_bias` and per-head q/k norms cover the Llama family."""

    def __init__(self, args: ModelArgs, qkv_bias: bool, o_bias: bool, qk_norm: bool = False):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=o_bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = make_rope(self.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or relu."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.activation = activation  # by name (ops.layers.ACTIVATIONS): the fused CPU kernel and flash paging use it
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return gated_ffn(x, self.gate_proj, self.up_proj, self.down_proj, self.activation)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention: nn.Module):
        super().__init__()
        self.self_attn = attention
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, make_attention):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, make_attention(args)) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = attention_mask(cache[0], h.shape[1], self.args.sliding_window)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """Causal LM: `model(token_ids (B, L), cache) -> logits (B, L, vocab)`."""

    def __init__(self, args: ModelArgs, make_attention=None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        make_attention = make_attention or (lambda a: Attention(a, a.attention_bias, a.attention_bias))
        self.model = LlamaModel(args, make_attention)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors HF checkpoints carry that this model computes itself."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
