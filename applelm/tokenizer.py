"""Tokenizers for applelm: the `Tokenizer` class, and loading one from a Hugging Face / MLX model folder.

`tokenizer_from_gguf` (built in gguf_tokenizer.py) makes one from a GGUF file's metadata instead. Both
wrap a `tokenizers` (Rust) tokenizer; `transformers` is not needed at run time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenizers import Tokenizer as BackendTokenizer

from . import chat_template as _chat
from .detokenizer import (
    ByteLevelDetokenizer,
    GenericDetokenizer,
    MetaspaceDetokenizer,
    SentencePieceDetokenizer,
    StreamingDetokenizer,
)
from .errors import ModelFormatError, UnsupportedError, UserError

__all__ = ["Tokenizer", "StreamingDetokenizer", "load_tokenizer", "tokenizer_from_gguf"]

# Tokens that end generation, by name: llama.cpp's end-of-generation list (llama-vocab.cpp), including its
# fill-in-the-middle pad / repo / file-separator tokens, so GGUF models stop exactly where llama.cpp stops.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
    # FIM pad, repo and file-separator tokens
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
)


def end_of_turn_ids(lookup: Callable[[str], int | None] | dict[str, int]) -> set[int]:
    """Ids of the END_OF_TURN_TOKENS present in a vocabulary (`lookup`: token -> id or None)."""
    get = lookup.get if isinstance(lookup, dict) else lookup
    found = {name: get(name) for name in END_OF_TURN_TOKENS}
    found = {name: tid for name, tid in found.items() if tid is not None}
    # Two llama.cpp exceptions: gpt-oss / solar-open end a message, not the turn, with <|end|>; Gemma 4
    # uses </s> inside tool responses.
    if ("<|return|>" in found and "<|call|>" in found) or ("<|calls|>" in found and "<|flush|>" in found):
        found.pop("<|end|>", None)
    if "<|tool_response>" in found:
        found.pop("</s>", None)
    return set(found.values())


class Tokenizer:
    """Text <-> token ids, chat templates, and streaming detokenization for one model's vocabulary.

    Attributes: vocab_size; bos_token / bos_token_id (None when the model has none); eos_token /
    eos_token_id (the primary end token); eos_token_ids (every id that ends generation: EOS, end-of-turn
    tokens such as <|im_end|>, and generation_config.json's ids for folders); chat_template (Jinja source
    or None); add_bos_token / add_eos_token (whether encode() with add_special_tokens adds them).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        named_chat_templates: dict[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        extra_template_vars: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.bos_token: str | None = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token_id = eos_token_id
        self.eos_token: str | None = backend.id_to_token(eos_token_id) if eos_token_id is not None else None
        self.eos_token_ids: set[int] = set(eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self.chat_template = chat_template
        self._named_templates = dict(named_chat_templates or {})
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self.add_eos_token = bool(add_eos_token and eos_token_id is not None)
        self._template_vars = {k: v for k, v in (extra_template_vars or {}).items() if v is not None}
        self._detok_factory: Callable[[bool], StreamingDetokenizer] | None = None

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. "<|im_start|>") become their ids.

        With add_special_tokens, BOS is prepended when add_bos_token (and EOS appended when add_eos_token),
        even if the text already starts with BOS: pass add_special_tokens=False for a rendered chat template
        that writes BOS itself.
        """
        if not isinstance(text, str):
            raise UserError(f"encode() takes a str, not {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text for token ids (any iterable of ints, numpy or mlx arrays included)."""
        id_list = [int(i) for i in ids]
        try:
            return self.backend.decode(id_list, skip_special_tokens=skip_special_tokens)
        except OverflowError:  # tokenizers takes u32 ids; a negative or huge one cannot be converted
            bad = next((i for i in id_list if not 0 <= i < 2**32), None)
            raise UserError(f"token id {bad} is not a valid token id") from None

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary, or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of a token id, or None when out of range."""
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation with the model's chat template; returns the prompt text (not tokens).

        `messages` are {"role": ..., "content": ...} dicts. Extra keyword arguments (tools=, documents=,
        enable_thinking=, ...) reach the template as variables, as in transformers. A template error, or the
        model having no template, raises UserError.
        """
        tools = kwargs.pop("tools", None)
        source = self._template_for(tools)
        context: dict[str, Any] = dict(self._template_vars)
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(messages=messages, tools=tools, documents=kwargs.pop("documents", None),
                       add_generation_prompt=add_generation_prompt)
        context.update(kwargs)
        return _chat.render(source, context)

    def _template_for(self, tools: Any) -> str:
        if tools and "tool_use" in self._named_templates:
            return self._named_templates["tool_use"]
        if self.chat_template is None:
            raise UserError(
                "this model has no chat template (none in its tokenizer files or GGUF metadata); "
                "send a plain prompt instead of chat messages"
            )
        return self.chat_template

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh StreamingDetokenizer whose joined output equals decode(ids, skip_special_tokens)."""
        if self._detok_factory is None:
            self._detok_factory = _detokenizer_factory(self)
        return self._detok_factory(skip_special_tokens)


def _detokenizer_factory(tok: Tokenizer) -> Callable[[bool], StreamingDetokenizer]:
    """Pick the streaming detokenizer that matches the backend's decoder; build its table once."""
    backend = tok.backend
    spec = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
    special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    def skip_set(skip: bool) -> frozenset[int]:
        return special if skip else frozenset()

    kind = _decoder_kind(spec)
    if kind is None:
        return lambda skip: GenericDetokenizer(lambda ids: backend.decode(ids, skip_special_tokens=skip))
    pieces = _id_to_token_table(backend)
    if kind[0] == "byte_level":
        table = [_byte_level_bytes(p) for p in pieces]
        return lambda skip: ByteLevelDetokenizer(table, skip_set(skip))
    if kind[0] == "metaspace":
        _, replacement, drop_first = kind
        return lambda skip: MetaspaceDetokenizer(pieces, replacement, drop_first, skip_set(skip))
    _, replaces, byte_fallback, strip_char, strip_n = kind
    sp_table = _sentencepiece_table(pieces, replaces, byte_fallback)
    return lambda skip: SentencePieceDetokenizer(sp_table, strip_char, strip_n, skip_set(skip))


def _decoder_kind(spec: dict | None) -> tuple | None:
    """Recognise the decoders the table-driven detokenizers reproduce exactly; None means generic."""
    if spec is None:
        return None
    if spec.get("type") == "ByteLevel":
        return ("byte_level",)
    if spec.get("type") == "Metaspace":
        return ("metaspace", spec.get("replacement", "\u2581"), spec.get("prepend_scheme", "always") != "never")
    if spec.get("type") != "Sequence":
        return None
    steps = spec.get("decoders") or []
    if len(steps) == 1:
        return _decoder_kind(steps[0])
    replaces: list[tuple[str, str]] = []
    byte_fallback = fused = False
    strip_char, strip_n = " ", 0
    for i, step in enumerate(steps):
        kind = step.get("type")
        if kind == "Replace" and not byte_fallback and not fused and "String" in (step.get("pattern") or {}):
            replaces.append((step["pattern"]["String"], step.get("content", "")))
        elif kind == "ByteFallback" and not byte_fallback and not fused:
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and fused and i == len(steps) - 1 and step.get("stop", 0) == 0:
            strip_char, strip_n = step.get("content", " "), int(step.get("start", 0))
        else:
            return None
    return ("sentencepiece", tuple(replaces), byte_fallback, strip_char, strip_n)


def _id_to_token_table(backend: BackendTokenizer) -> list[str]:
    # Per-id lookups beat get_vocab() here: no dict of the whole vocabulary to build and invert.
    id_to_token = backend.id_to_token
    return [id_to_token(i) or "" for i in range(backend.get_vocab_size(with_added_tokens=True))]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # printable bytes map to themselves
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_bytes(piece: str) -> bytes:
    try:
        return bytes([_UNICODE_TO_BYTE[c] for c in piece])
    except KeyError:  # characters outside the byte alphabet pass through as UTF-8, as in tokenizers
        return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode("utf-8") for c in piece)


def _sentencepiece_table(pieces: list[str], replaces: tuple, byte_fallback: bool) -> list[str | int]:
    """Each token as the Replace steps leave it, or its byte value where ByteFallback reads "<0xNN>"."""
    table: list[str | int] = pieces
    for pattern, content in replaces:
        table = [p.replace(pattern, content) for p in table]
    if byte_fallback:
        table = list(table)
        for i, p in enumerate(table):
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                try:
                    table[i] = int(p[3:5], 16)
                except ValueError:
                    pass
    return table


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A Tokenizer from a GGUF file's metadata (see gguf_tokenizer.py)."""
    from .gguf_tokenizer import tokenizer_from_gguf as build

    return build(metadata)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """A Tokenizer from a Hugging Face / MLX model folder.

    Reads tokenizer.json (required) and, when present, tokenizer_config.json, special_tokens_map.json,
    generation_config.json, and chat_template.jinja or chat_template.json (which win over a
    chat_template inside tokenizer_config.json).
    """
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder" if not path.exists() else f"{path}: not a folder")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        if (path / "tokenizer.model").is_file():
            raise UnsupportedError(
                f"{path} has a SentencePiece tokenizer.model but no tokenizer.json; applelm reads tokenizer.json "
                "(save the tokenizer with a recent transformers to get one)"
            )
        raise ModelFormatError(f"{path}: no tokenizer.json in the model folder; cannot build its tokenizer")
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust side reports parse errors as plain Exceptions
        raise ModelFormatError(f"{tokenizer_file}: not a valid tokenizers file: {e}") from None
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    generation = _read_json(path / "generation_config.json")

    def special(name: str) -> str | None:
        value = config[name] if name in config else special_map.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    bos_id = _lookup(backend, special("bos_token"))
    eos_id = _lookup(backend, special("eos_token"))
    eos_ids = end_of_turn_ids(backend.token_to_id)
    extra = generation.get("eos_token_id")
    for tid in extra if isinstance(extra, list) else [extra]:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < backend.get_vocab_size(True):
            eos_ids.add(tid)
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if not isinstance(add_bos, bool) or not isinstance(add_eos, bool):
        # No explicit flag: follow what the tokenizer.json post-processor adds around a sample text.
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and len(full) > len(plain) and full[0] == bos_id
        if not isinstance(add_eos, bool):
            add_eos = eos_id is not None and len(full) > len(plain) and full[-1] == eos_id
    default, named = _chat_templates(path, config)
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        eos_token_ids=eos_ids,
        chat_template=default,
        named_chat_templates=named,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        extra_template_vars={name: special(name) for name in ("unk_token", "pad_token")},
    )


def _lookup(backend: BackendTokenizer, token: str | None) -> int | None:
    return backend.token_to_id(token) if token is not None else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return value


def _chat_templates(path: Path, config: dict) -> tuple[str | None, dict[str, str]]:
    """(default template, named templates) from chat_template.jinja / .json or tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), {}
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{jinja_file}: cannot be read: {e}") from None
    value = _read_json(path / "chat_template.json").get("chat_template", config.get("chat_template"))
    if value is None or isinstance(value, str):
        return value, {}
    # transformers' list form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        named = {str(t.get("name")): t["template"] for t in value}
        return named.get("default", value[0]["template"] if value else None), named
    raise ModelFormatError(f"{path}: chat_template has an unexpected form ({type(value).__name__})")
