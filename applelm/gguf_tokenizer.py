"""Build a `Tokenizer` from a GGUF file's `tokenizer.*` metadata, matching llama.cpp's tokenization.

Two vocabulary kinds are supported:
- "gpt2": byte-level BPE from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the split rule
  that `tokenizer.ggml.pre` names (see pretokenizers.py).
- "llama": SentencePiece. llama.cpp merges adjacent pieces greedily, always taking the pair whose joined
  piece has the highest score, and falls back to <0xNN> byte tokens. A BPE model whose merges are every
  (left, right) split of each piece, ranked by that piece's score, makes the same choices.
Control, user-defined and unknown tokens become added tokens, so their text is matched whole in the
input before anything else, as llama.cpp's special-token partition does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer as BackendTokenizer, decoders, models, normalizers

from .errors import ModelFormatError, UnsupportedError
from .pretokenizers import ADDS_BOS, IGNORE_MERGES, byte_level_pre_tokenizer
from .tokenizer import Tokenizer, end_of_turn_ids

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A Tokenizer for the vocabulary described by a GGUF file's metadata (`GGUFFile(path).metadata`).

    Raises ModelFormatError when a required key is missing or inconsistent, UnsupportedError for a
    tokenizer model other than "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    """
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError("GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer")
    if model not in ("gpt2", "llama"):
        raise UnsupportedError(
            f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
            "supported are 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
        )
    tokens = _tokens(metadata)
    types = _int_array(metadata, "tokenizer.ggml.token_type", len(tokens), default=NORMAL)
    if model == "gpt2":
        backend = _byte_level_bpe(metadata, tokens)
        add_bos_default = metadata.get("tokenizer.ggml.pre") in ADDS_BOS
    else:
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_bpe(metadata, tokens, types, add_space_prefix)
        add_bos_default = True
    _add_special_tokens(backend, tokens, types)

    default_bos, default_eos = (1, 2) if model == "llama" else (None, None)
    bos_id = _token_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens), default_bos)
    eos_id = _token_id(metadata, "tokenizer.ggml.eos_token_id", len(tokens), default_eos)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    for flag, key, tid in ((add_bos, "bos", bos_id), (add_eos, "eos", eos_id)):
        if flag and tid is None:
            raise ModelFormatError(
                f"GGUF tokenizer.ggml.add_{key}_token is true but tokenizer.ggml.{key}_token_id is not set"
            )
    # Generation stops on EOS, on the file's end-of-turn / end-of-message ids, and on known end tokens.
    eos_ids = end_of_turn_ids(backend.token_to_id)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        tid = _token_id(metadata, key, len(tokens), None)
        if tid is not None:
            eos_ids.add(tid)

    # llama.cpp's convention: tokenizer.chat_template, plus named ones as tokenizer.chat_template.<name>.
    templates = {key[len("tokenizer.chat_template."):]: value for key, value in metadata.items()
                 if key.startswith("tokenizer.chat_template.")}
    template = metadata.get("tokenizer.chat_template")
    for name, value in [("", template), *templates.items()]:
        if value is not None and not isinstance(value, str):
            raise ModelFormatError(f"GGUF tokenizer.chat_template{'.' + name if name else ''} is not a string")
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        eos_token_ids=eos_ids,
        chat_template=template,
        named_chat_templates=templates,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


def _tokens(metadata: dict[str, Any]) -> list[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFormatError("GGUF metadata has no tokenizer.ggml.tokens: the vocabulary is missing")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError("GGUF tokenizer.ggml.tokens must be a non-empty array of strings")
    # llama.cpp renames empty tokens the same way, so ids stay aligned with the model's embeddings.
    return [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]


def _int_array(metadata: dict[str, Any], key: str, n: int, default: int) -> np.ndarray:
    value = metadata.get(key)
    if value is None:
        return np.full(n, default, dtype=np.int64)
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.shape[0] < n or not np.issubdtype(arr.dtype, np.integer):
        raise ModelFormatError(f"GGUF {key} must be an integer array with one entry per token ({n})")
    return arr[:n].astype(np.int64)


def _token_id(metadata: dict[str, Any], key: str, n: int, default: int | None) -> int | None:
    value = metadata.get(key)
    if value is None:
        return default if default is not None and default < n else None
    if isinstance(value, (bool, float, str)) or not isinstance(value, (int, np.integer)):
        raise ModelFormatError(f"GGUF {key} must be an integer token id, got {value!r}")
    if not 0 <= int(value) < n:
        raise ModelFormatError(f"GGUF {key} = {value} is outside the vocabulary of {n} tokens")
    return int(value)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise ModelFormatError(
                    f"GGUF tokenizer.ggml.tokens has duplicate token {t!r} at ids {seen[t]} and {i}"
                )
            seen[t] = i
    return vocab


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str]) -> BackendTokenizer:
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ModelFormatError("GGUF tokenizer.ggml.merges is missing; a 'gpt2' (byte-level BPE) vocab needs it")
    if not isinstance(merges_raw, list) or not all(isinstance(m, str) for m in merges_raw):
        raise ModelFormatError("GGUF tokenizer.ggml.merges must be an array of strings")
    vocab = _vocab(tokens)
    merges = []
    for m in merges_raw:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise ModelFormatError(f"GGUF tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        a, b = m[:cut], m[cut + 1 :]
        # A merge whose parts or result are not tokens can never fire in llama.cpp either.
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    pre = metadata.get("tokenizer.ggml.pre")
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES))
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], types: np.ndarray, add_space_prefix: bool
) -> BackendTokenizer:
    if metadata.get("tokenizer.ggml.scores") is None:
        raise ModelFormatError("GGUF tokenizer.ggml.scores is missing; a 'llama' (SentencePiece) vocab needs it")
    scores = np.asarray(metadata["tokenizer.ggml.scores"])
    if scores.ndim != 1 or scores.shape[0] < len(tokens) or not np.issubdtype(scores.dtype, np.number):
        raise ModelFormatError(
            f"GGUF tokenizer.ggml.scores must be a numeric array with one score per token ({len(tokens)})"
        )
    vocab = _vocab(tokens)
    merges = _spm_merges(tokens, scores[: len(tokens)], types)
    unk = tokens[int(metadata["tokenizer.ggml.unknown_token_id"])] if _has_unk(metadata, len(tokens)) else None
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk))
    escape = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), escape]) if add_space_prefix else escape
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # llama.cpp drops the dummy-prefix space of the first piece when detokenizing
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _has_unk(metadata: dict[str, Any], n: int) -> bool:
    value = metadata.get("tokenizer.ggml.unknown_token_id")
    return isinstance(value, (int, np.integer)) and 0 <= int(value) < n


def _spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Every (left, right) split of each mergeable piece into two mergeable pieces, best score first.

    Control, user-defined, unknown and byte tokens are never merge results or parts: their text is
    either matched whole before merging (added tokens) or stands for a raw byte.
    """
    mergeable_mask = (types == NORMAL) | (types == UNUSED)
    mergeable = {tokens[i] for i in np.flatnonzero(mergeable_mask).tolist()}
    # Best score first, ties by id. llama.cpp breaks score ties by position instead, which only differs for
    # two different pieces of equal score competing for one character; BPE-trained vocabs have unique scores.
    order = np.lexsort((np.arange(len(tokens)), -scores.astype(np.float64)))
    merges: list[tuple[str, str]] = []
    append = merges.append
    for i in order[mergeable_mask[order]].tolist():
        t = tokens[i]
        for k in range(1, len(t)):
            left = t[:k]
            if left in mergeable:
                right = t[k:]
                if right in mergeable:
                    append((left, right))
    return merges


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], types: np.ndarray) -> None:
    """Control and unknown tokens as special added tokens, user-defined ones as plain added tokens.

    normalized=False: llama.cpp looks for them in the raw text, before spaces become U+2581.
    """
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN)).tolist()]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == USER_DEFINED).tolist()]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
