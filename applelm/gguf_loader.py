"""GGUF checkpoints: hyper-parameters from metadata as a Hugging Face style config, tensors renamed to our
(Hugging Face) parameter names, and quantized tensors kept quantized.

Quantized tensors stay exactly as the file stores them (resident weight bytes = file bytes): the ops
package's GGUFLinear / GGUFEmbedding multiply with the packed blocks directly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import ModelFormatError, UnsupportedError
from .gguf_file import GGUFFile

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
FLOAT_TYPES = ("F32", "F16", "BF16")

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 normalizes around both sub-blocks, so its norms have other names.
_GEMMA3_BLOCK = {**_BLOCK, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _meta(md: dict, key: str, default: Any = ...) -> Any:
    if key in md:
        value = md[key]
        return value.tolist() if isinstance(value, np.ndarray) else value
    if default is ...:
        raise ModelFormatError(f"GGUF metadata lacks required key '{key}'")
    return default


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """Translate GGUF metadata into the config.json fields our ModelArgs read."""
    md = gguf.metadata
    arch = _meta(md, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(
            f"GGUF architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    n_heads = _meta(md, f"{arch}.attention.head_count")
    hidden = _meta(md, f"{arch}.embedding_length")
    n_layers = _meta(md, f"{arch}.block_count")
    n_vocab = len(_meta(md, "tokenizer.ggml.tokens")) if "tokenizer.ggml.tokens" in md else None
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": _meta(md, f"{arch}.feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _meta(md, f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": _meta(md, f"{arch}.attention.key_length", hidden // n_heads),
        "rms_norm_eps": _meta(md, f"{arch}.attention.layer_norm_rms_epsilon"),
        "vocab_size": _meta(md, f"{arch}.vocab_size", n_vocab),
        # llama.cpp's own default when a file omits it (the format's semantics, not a guess of ours).
        "rope_theta": _meta(md, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _meta(md, f"{arch}.context_length", None),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    if config["vocab_size"] is None:
        config["vocab_size"] = gguf.tensors["token_embd.weight"].shape[0]
    scaling = _meta(md, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _meta(md, f"{arch}.rope.scaling.factor")}
    elif scaling not in ("none", None):
        raise UnsupportedError(f"GGUF RoPE scaling type '{scaling}' is not supported (none, linear are)")
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+ stores its scaled frequencies as a tensor
        config["rope_scaling"] = {"rope_type": "gguf_freq_factors",
                                  "factors": gguf.array("rope_freqs.weight").astype(np.float32).tolist()}
    if arch == "qwen2":
        config["attention_bias"] = True  # Qwen2's q/k/v biases; the loader checks the tensors exist
    if arch == "gemma3":
        window = _meta(md, "gemma3.attention.sliding_window")
        # llama.cpp's Gemma 3 constants: every 6th layer global, local RoPE base 10000, and the 27B
        # model's query scale from hidden/heads instead of head_dim.
        config.update(
            rope_local_base_freq=10000.0,
            sliding_window=window,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
            query_pre_attn_scalar=hidden // n_heads if n_layers == 62 else config["head_dim"],
        )
    return config


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved RoPE pairs back to halves)."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def _hf_name(name: str, arch: str) -> str:
    m = _BLOCK_RE.match(name)
    table = _GEMMA3_BLOCK if arch == "gemma3" else _BLOCK
    if m:
        layer, part, kind = m.groups()
        if part in table:
            return f"model.layers.{layer}.{table[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _TOP_LEVEL:
            return f"{_TOP_LEVEL[base]}.{kind}"
    raise UnsupportedError(f"GGUF tensor '{name}' has no counterpart in the {arch} model")


def load_gguf(gguf: GGUFFile, config: dict[str, Any], include: Optional[Callable[[str], bool]] = None
              ) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """Weights under our parameter names and the quantize-swap specs for the quantized ones; `include`
    (a predicate on our names) restricts which tensors are read."""
    arch = config["model_type"]
    weights: dict[str, mx.array] = {}
    specs: dict[str, dict] = {}
    for name, info in gguf.tensors.items():
        if name == "rope_freqs.weight":
            continue  # folded into the config's rope_scaling
        hf = _hf_name(name, arch)
        if include is not None and not include(hf):
            continue
        path = hf.rsplit(".", 1)[0]
        type_name = info.ggml_type.name
        rows = None
        if arch == "llama" and (name.endswith("attn_q.weight") or name.endswith("attn_q.bias")):
            rows = _unpermute_rows(info.shape[0], config["num_attention_heads"])
        elif arch == "llama" and (name.endswith("attn_k.weight") or name.endswith("attn_k.bias")):
            rows = _unpermute_rows(info.shape[0], config["num_key_value_heads"])

        if type_name in FLOAT_TYPES:
            arr = gguf.array(name)
            if rows is not None:
                arr = arr[rows]
            if arch == "gemma3" and hf.endswith("norm.weight"):
                arr = arr.astype(np.float32) - 1.0  # llama.cpp stores Gemma's (1 + w); our norm adds the 1
            a = mx.array(arr)
            weights[hf] = a.view(mx.bfloat16) if type_name == "BF16" else a
            continue
        raw = gguf.raw(name)
        if rows is not None:
            raw = raw[rows]
        weights[hf] = mx.array(np.ascontiguousarray(raw))
        specs[path] = {"mode": "gguf", "ggml_type": type_name, "name": name}
    return weights, specs
