"""Streaming detokenizers: turn generated token ids into text one token at a time.

Each one's outputs, joined, equal `Tokenizer.decode(ids)` for the same ids, and no output ever ends
inside a UTF-8 character: bytes of a partial character wait until the character is complete.

The fast ones work from a table built once per tokenizer (id -> bytes, or id -> text / byte value)
and cost O(1) per token; they mirror the `tokenizers` decoders they stand for:
- ByteLevel (GPT-2 byte-to-unicode spelling): join all bytes, decode as UTF-8 with U+FFFD for bad bytes.
- Replace(U+2581 -> " ") / ByteFallback / Fuse / Strip: <0xNN> tokens in a row are decoded together,
  all-or-nothing: a run that is not valid UTF-8 becomes one U+FFFD per byte, so a run is held until it ends.
- Metaspace: U+2581 -> " ", with every U+2581 dropped from the first token.
Any other decoder goes through the generic one, which decodes a short window of recent ids and emits the
growth of the text.
"""

from __future__ import annotations

import codecs
from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Feed generated ids with add_token(); each call returns the text now safe to show."""

    def add_token(self, token_id: int) -> str:
        """Take one more token id and return the new text that is complete (possibly "")."""
        raise NotImplementedError

    def finalize(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD)."""
        raise NotImplementedError


class ByteLevelDetokenizer(StreamingDetokenizer):
    """Byte-level BPE: each id stands for fixed bytes; an incremental UTF-8 decoder does the rest."""

    def __init__(self, table: Sequence[bytes], skip: frozenset[int] = frozenset()):
        self._table, self._skip = table, skip
        # Python's "replace" substitutes maximal invalid subsequences, as Rust's from_utf8_lossy does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add_token(self, token_id: int) -> str:
        if token_id in self._skip or not 0 <= token_id < len(self._table):
            return ""
        return self._utf8.decode(self._table[token_id])

    def finalize(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class SentencePieceDetokenizer(StreamingDetokenizer):
    """Text pieces plus <0xNN> byte tokens (table entries that are ints), with an optional leading strip."""

    def __init__(self, table: Sequence[str | int], strip_char: str = " ", strip_count: int = 0,
                 skip: frozenset[int] = frozenset()):
        self._table, self._skip = table, skip
        # Strip after Fuse: up to strip_count leading strip_char are dropped from the whole text.
        self._strip_char, self._strip = strip_char, strip_count
        self._bytes = bytearray()

    def add_token(self, token_id: int) -> str:
        if token_id in self._skip or not 0 <= token_id < len(self._table):
            return ""
        piece = self._table[token_id]
        if isinstance(piece, int):
            self._bytes.append(piece)
            return ""
        return self._emit(self._flush_bytes() + piece)

    def finalize(self) -> str:
        return self._emit(self._flush_bytes())

    def _flush_bytes(self) -> str:
        if not self._bytes:
            return ""
        raw = bytes(self._bytes)
        self._bytes.clear()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return REPLACEMENT * len(raw)  # what tokenizers' ByteFallback does with an invalid run

    def _emit(self, text: str) -> str:
        while self._strip and text:
            if text[0] != self._strip_char:
                self._strip = 0
                break
            text = text[1:]
            self._strip -= 1
        return text


class MetaspaceDetokenizer(StreamingDetokenizer):
    """Metaspace decoder: U+2581 becomes a space, except in the first token, where it is dropped."""

    def __init__(self, table: Sequence[str], replacement: str, drop_in_first: bool,
                 skip: frozenset[int] = frozenset()):
        self._table, self._skip = table, skip
        self._replacement, self._first = replacement, drop_in_first

    def add_token(self, token_id: int) -> str:
        if token_id in self._skip or not 0 <= token_id < len(self._table):
            return ""
        piece = self._table[token_id]
        if self._first:
            self._first = False
            return piece.replace(self._replacement, "")
        return piece.replace(self._replacement, " ")

    def finalize(self) -> str:
        return ""


class GenericDetokenizer(StreamingDetokenizer):
    """Any decoder: decode the ids since the last emitted point and emit how much the text grew.

    Text is held while it ends in U+FFFD (a character still incomplete). The window restarts after each
    emission, so the cost per token stays small; decoders whose output for a window differs from their
    output inside the full sequence (other than at its very start) could make the joined text differ.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []  # the window: ids from the last restart point on
        self._done = 0  # how many of the window's ids are already emitted
        self._before = ""  # decode of those

    def add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) > len(self._before) and not text.endswith(REPLACEMENT):
            out = text[len(self._before) :]
            # Keep the newly emitted ids as left context for the next window.
            self._ids = self._ids[self._done :]
            self._done = len(self._ids)
            self._before = self._decode(self._ids)
            return out
        return ""

    def finalize(self) -> str:
        out = self._decode(self._ids)[len(self._before) :]
        self._ids, self._done, self._before = [], 0, ""
        return out
