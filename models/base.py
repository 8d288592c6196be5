"""Pieces every architecture shares: strict config reading, RoPE variants, masks and the attention call."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelFormatError, UnsupportedError
from ..ops import cpu_attention


@dataclass
class BaseModelArgs:
    """Hyper-parameters read from a Hugging Face style config.json (strictly: no silent defaults)."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        config = dict(config)
        rope_params = config.get("rope_parameters")
        # transformers 5 moves rope_theta/rope_type into rope_parameters; read both spellings.
        if isinstance(rope_params, dict) and "rope_theta" in rope_params:
            config.setdefault("rope_theta", rope_params["rope_theta"])
            if rope_params.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", rope_params)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [
            name for name, f in fields.items()
            if name not in config
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ModelFormatError(f"config is missing required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in config.items() if k in fields})


class RoPE(nn.Module):
    """Rotary embedding over the first `dims` features, with optional per-frequency periods."""

    def __init__(self, dims: int, base: float, scale: float = 1.0, freqs: Optional[mx.array] = None,
                 traditional: bool = False):
        super().__init__()
        self.dims, self.scale, self.traditional = dims, scale, traditional
        self.base = None if freqs is not None else base
        self._freqs = freqs

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                            offset=offset, freqs=self._freqs)


def _llama3_periods(dims: int, base: float, cfg: dict) -> mx.array:
    """Llama 3.1 scaling: long wavelengths stretched by `factor`, short ones kept, smooth in between."""
    factor = cfg["factor"]
    low, high = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    old_ctx = cfg.get("original_max_position_embeddings", 8192)
    periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    wavelens = 2 * math.pi * periods
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelens - low) / (high - low)
    mid = periods / ((1 - smooth) / factor + smooth)
    out = mx.where(wavelens > low_wavelen, periods * factor, periods)
    is_mid = (wavelens <= low_wavelen) & (wavelens >= high_wavelen)
    return mx.where(is_mid, mid, out)


def make_rope(dims: int, base: float, scaling: Optional[dict] = None, traditional: bool = False) -> RoPE:
    """Build RoPE from a config's rope_scaling / rope_parameters block (None means plain RoPE)."""
    if not scaling:
        return RoPE(dims, base, traditional=traditional)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RoPE(dims, base, traditional=traditional)
    if kind == "linear":
        return RoPE(dims, base, scale=1.0 / scaling["factor"], traditional=traditional)
    if kind == "llama3":
        return RoPE(dims, base, freqs=_llama3_periods(dims, base, scaling), traditional=traditional)
    if kind == "gguf_freq_factors":
        # llama.cpp's rope_freqs tensor divides each frequency; as periods that is a multiplication.
        factors = mx.array(scaling["factors"], dtype=mx.float32)
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims) * factors
        return RoPE(dims, base, freqs=periods, traditional=traditional)
    raise UnsupportedError(f"RoPE scaling type '{kind}' is not supported (default, linear, llama3 are)")


def attention_mask(cache, n_queries: int, window: Optional[int] = None):
    """The mask one forward pass uses for all layers sharing `cache`'s layout (None when uncached)."""
    if cache is None:
        if n_queries == 1:
            return None
        if window is None or n_queries <= window:
            return "causal"
        pos = mx.arange(n_queries)
        return ((pos[:, None] >= pos[None, :]) & (pos[:, None] < pos[None, :] + window))[None, None]
    return cache.make_mask(n_queries, window)


def grouped_decode_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask) -> mx.array:
    """Attention of one query per row, q (B, heads, 1, D) against k/v (B, kv_heads, T, D), as two batched
    products: the heads sharing a kv head are stacked as rows, so keys and values are never repeated.
    mask: None, "causal" (for one query: every key), a boolean array (True = attend) or an additive one,
    broadcastable to (B, 1, 1, T)."""
    B, heads, _, D = q.shape
    kv_heads = k.shape[1]
    scores = (q.reshape(B, kv_heads, heads // kv_heads, D) * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, mx.array):
        scores = (mx.where(mask, scores, mx.finfo(scores.dtype).min) if mask.dtype == mx.bool_
                  else scores + mask.astype(scores.dtype))
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(B, heads, 1, D)


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask) -> mx.array:
    """The one attention call every model uses; q is (B, heads, L, D), k/v are (B, kv_heads, T, D). On the CPU,
    one query per row takes the C kernel (ops/cpu_attention.py) where it runs and takes the arguments, else
    grouped_decode_attention with grouped kv heads; all else MLX's fused call."""
    if q.shape[2] == 1 and mx.default_device().type == mx.DeviceType.cpu:
        # The kernel reads each kv head once, in place: a SmolLM2 layer at 16 rows and 256 keys 0.38 ms against
        # 0.89 (grouped products) and 3.74 (fused call). Else, with GQA, the grouped products beat the fused call
        # (150 of 150 cells; without GQA both are the same products). benchmarks/results/cpu_decode_attention_*.md.
        if cpu_attention.chosen(q, k, v, mask):
            return cpu_attention.decode_attention(q, k, v, scale=scale, mask=mask)
        if k.shape[1] < q.shape[1]:
            return grouped_decode_attention(q, k, v, scale=scale, mask=mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def check_config_value(name: str, value, allowed) -> None:
    """Reject a config setting this runtime would otherwise silently ignore."""
    if value not in allowed:
        raise UnsupportedError(f"config {name}={value!r} is not supported (supported: {allowed})")
