"""Write an MLX model folder the way mlx-lm lays one out: config.json, model(-0000i-of-0000n).safetensors
(+ model.safetensors.index.json when sharded), and the tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def save_config(folder: Path, config: dict) -> None:
    """config.json with sorted keys; `quantization` mirrored to `quantization_config` as mlx-lm does."""
    config = dict(config)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")


def make_shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    """Split in name order into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for name in sorted(weights):
        v = weights[name]
        if not shards or size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = v
        size += v.nbytes
    return shards


def save_weights(folder: Path, weights: dict[str, mx.array], max_shard_bytes: int = MAX_SHARD_BYTES,
                 on_shard: Optional[Callable[[], None]] = None) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index above `max_shard_bytes`."""
    shards = make_shards(weights, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        if on_shard:
            on_shard()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
    return [folder / n for n in names]


def copy_tokenizer_files(src: Path, folder: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files a source model folder has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            copied.append(name)
    return copied


def write_tokenizer(tokenizer, folder: Path, model_max_length: Optional[int] = None) -> list[str]:
    """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json (every id
    that ends generation) from an applelm Tokenizer, e.g. one built from GGUF metadata. Needs the Tokenizer to
    expose its `tokenizers.Tokenizer` as `.backend`; without it nothing is written. Returns the files written."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "save"):
        return []
    _with_special_tokens_processor(tokenizer, backend).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # what transformers (and so mlx-lm) builds from tokenizer.json
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": tokenizer.add_eos_token,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"eos_token_id": sorted(tokenizer.eos_token_ids)}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def _with_special_tokens_processor(tokenizer, backend):
    """applelm's Tokenizer adds BOS/EOS itself (from add_bos_token/add_eos_token); transformers, and so mlx-lm,
    only through tokenizer.json's post-processor. Give a copy one when the backend has none."""
    if backend.post_processor is not None or not (tokenizer.add_bos_token or tokenizer.add_eos_token):
        return backend
    from tokenizers import Tokenizer as BackendTokenizer, processors

    bos = [tokenizer.bos_token] if tokenizer.add_bos_token else []
    eos = [tokenizer.eos_token] if tokenizer.add_eos_token else []

    def sequence(name: str, type_id: int) -> str:
        return " ".join(f"{piece}:{type_id}" for piece in [*bos, f"${name}", *eos])

    copy = BackendTokenizer.from_str(backend.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(bos + eos)])
    return copy


def folder_size(folder: Path) -> int:
    """Bytes on disk of the weight files (what quantization shrinks)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
