"""Write tiny Hugging Face / MLX style model folders (config.json + safetensors) from a model in memory."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def save_folder(model: nn.Module, config: dict, folder: Path, shards: int = 1, quantization: dict | None = None,
                dtype=None) -> Path:
    """Save `model` as config.json + model(-0000i-of-n).safetensors (+ index when sharded)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    config = dict(config)
    if quantization:
        config["quantization"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
        return folder
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[i::shards]}
        mx.save_safetensors(str(folder / fname), part)
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 32) -> dict:
    """Quantize in place the way MLX checkpoints are made; returns the config's quantization block."""
    divisible = lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=divisible)
    return {"group_size": group_size, "bits": bits}


WORDS = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}


def write_word_tokenizer(folder: Path) -> None:
    """A 97-word tokenizer.json ("w3".."w96", specials <unk> <s> </s>) + tokenizer_config.json with a chat
    template, readable by `tokenizers`, applelm and transformers (so mlx-lm) alike; matches the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(WORDS, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}))
