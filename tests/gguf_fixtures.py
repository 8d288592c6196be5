"""Write tiny GGUF files with the `gguf` package (the format's reference writer), the way llama.cpp's
converter lays out a Llama: Q/K rows permuted for interleaved RoPE, tensors under llama.cpp names."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# tensor kind -> GGML type used in the tiny file (covers every type the core loader keeps quantized)
DEFAULT_TYPES = {
    "token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
    "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.F16, "output": Q.Q8_0,
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """Byte-level BPE vocab: 3 specials, 256 bytes, a few merges. Returns tokens, merges, token types."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "Ġ t", "Ġt he", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + byte_tokens + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, merges, types


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half RoPE rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_config(vocab_size: int) -> dict:
    return dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab_size,
                rope_theta=10000.0, head_dim=16, max_position_embeddings=256)


def _layer_type(qtype, layer: int):
    return qtype[layer] if isinstance(qtype, (list, tuple)) else qtype


def write_tiny_llama_gguf(path: Path, types: dict = None, tied: bool = False, seed: int = 0,
                          chat_template: str | None = None, **config_overrides) -> dict:
    """Write a 2-layer Llama GGUF; returns {"config", "weights": HF-named float32 arrays as the file
    holds them after quantization (dequantized with gguf's numpy reference, Q/K un-permuted)}.
    A layer tensor's type may be a list: one type per layer (as K-quant mixes write them)."""
    types = {**DEFAULT_TYPES, **(types or {})}
    tokens, merges, token_types = tiny_vocab()
    config = tiny_llama_config(len(tokens))
    config["tie_word_embeddings"] = tied
    config.update(config_overrides)
    rng = np.random.default_rng(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, arr: np.ndarray, qtype, permute_heads: int = 0):
        arr = arr.astype(np.float32)
        stored = permute_for_gguf(arr, permute_heads) if permute_heads else arr
        if qtype in (Q.F32, Q.F16):
            data = stored.astype(np.float16 if qtype == Q.F16 else np.float32)
            w.add_tensor(gguf_name, data)
            back = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(stored.shape)
        if permute_heads:  # the reference sees what the file means in HF layout
            back = back.reshape(permute_heads, back.shape[0] // permute_heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        hf[hf_name] = back

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(0, 0.5, (v, h)), types["token_embd"])
    shapes = {"attn_q": (nh * hd, h), "attn_k": (nkv * hd, h), "attn_v": (nkv * hd, h),
              "attn_output": (h, nh * hd), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    for layer in range(config["num_hidden_layers"]):
        for kind, shape in shapes.items():
            heads = nh if kind == "attn_q" else nkv if kind == "attn_k" else 0
            put(f"blk.{layer}.{kind}.weight", f"model.layers.{layer}.{HF_NAMES[kind]}.weight",
                rng.normal(0, 0.15, shape), _layer_type(types[kind], layer), heads)
        for kind in ("attn_norm", "ffn_norm"):
            put(f"blk.{layer}.{kind}.weight", f"model.layers.{layer}.{HF_NAMES[kind]}.weight",
                rng.uniform(0.5, 1.5, (h,)), Q.F32)
    put("output_norm.weight", "model.norm.weight", rng.uniform(0.5, 1.5, (h,)), Q.F32)
    if not tied:
        put("output.weight", "lm_head.weight", rng.normal(0, 0.15, (v, h)), types["output"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"config": config, "weights": hf}
