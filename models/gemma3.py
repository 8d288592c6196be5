"""Gemma 3 (text): interleaved sliding-window and global attention layers, (1 + w) RMSNorms around both
sub-blocks, per-head q/k norms, GeGLU feed-forward and an embedding scaled by sqrt(hidden_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, RotatingKVCache
from ..ops import gated_ffn, shared_input
from .base import (BaseModelArgs, attention_mask, check_config_value, make_rope,
                   scaled_dot_product_attention)
from ..errors import ModelFormatError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float
    rope_local_base_freq: float
    sliding_window: int
    query_pre_attn_scalar: float
    layer_types: Optional[list[str]] = None
    sliding_window_pattern: Optional[int] = None
    rope_scaling: Optional[dict[str, Any]] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: Optional[int] = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        config = dict(config.get("text_config") or config, model_type=config.get("model_type", "gemma3"))
        rope = config.get("rope_parameters")
        # transformers 5 writes one RoPE block per layer type.
        if isinstance(rope, dict) and FULL in rope:
            config.setdefault("rope_theta", rope[FULL]["rope_theta"])
            config.setdefault("rope_local_base_freq", rope[SLIDING]["rope_theta"])
            if rope[FULL].get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", rope[FULL])
            config.pop("rope_parameters")
        return super().from_dict(config)

    def __post_init__(self):
        if self.layer_types is None:
            if self.sliding_window_pattern is None:
                raise ModelFormatError("gemma3 config needs layer_types or sliding_window_pattern")
            p = self.sliding_window_pattern
            self.layer_types = [FULL if (i + 1) % p == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelFormatError("gemma3 config: layer_types does not have one entry per layer")
        check_config_value("hidden_activation", self.hidden_activation, ("gelu_pytorch_tanh",))
        check_config_value("attn_logit_softcapping", self.attn_logit_softcapping, (None,))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm scales by (1 + weight), so a zero weight is the identity."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        if layer_type == SLIDING:
            self.rope = make_rope(self.head_dim, args.rope_local_base_freq)
        else:
            self.rope = make_rope(self.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = shared_input(x, self.q_proj, self.k_proj, self.v_proj)
        q = self.q_norm(q.reshape(B, L, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    activation = "gelu_tanh"  # by name (ops.layers.ACTIVATIONS): the fused CPU kernel and flash paging use it

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return gated_ffn(x, self.gate_proj, self.up_proj, self.down_proj, self.activation)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.is_sliding = layer_type == SLIDING
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, t) for t in args.layer_types]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        # The scale is rounded to the activation dtype, as the reference implementation does.
        h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        cache = cache if cache is not None else [None] * len(self.layers)
        first = {layer.is_sliding: i for i, layer in reversed(list(enumerate(self.layers)))}
        masks = {
            sliding: attention_mask(cache[i], h.shape[1], self.args.sliding_window if sliding else None)
            for sliding, i in first.items()
        }
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, masks[layer.is_sliding], layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """Causal LM: `model(token_ids (B, L), cache) -> logits (B, L, vocab)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        logits = self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)
        if self.args.final_logit_softcapping:
            cap = self.args.final_logit_softcapping
            logits = mx.tanh(logits / cap) * cap
        return logits

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, max_kv_size: Optional[int] = None, left_padding: Optional[list[int]] = None):
        """Sliding layers keep only their window; a left-padded batch uses growing caches throughout."""
        if left_padding is not None:
            if max_kv_size is not None:
                raise ValueError("a bounded (rotating) cache cannot hold a left-padded batch")
            return [KVCache(left_padding) for _ in self.layers]
        caches = []
        for layer in self.layers:
            if layer.is_sliding:
                size = self.args.sliding_window if max_kv_size is None else min(max_kv_size, self.args.sliding_window)
                caches.append(RotatingKVCache(size))
            else:
                caches.append(KVCache() if max_kv_size is None else RotatingKVCache(max_kv_size))
        return caches

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Take the text model out of multimodal Gemma 3 checkpoints (both transformers 4 and 5 names)."""
        out = {}
        for k, v in weights.items():
            if k.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                             "model.multi_modal_projector.")):
                continue
            k = k.replace("language_model.model.", "model.").replace("model.language_model.", "model.")
            k = k.replace("language_model.lm_head.", "lm_head.")
            out[k] = v
        if self.args.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
        return out
