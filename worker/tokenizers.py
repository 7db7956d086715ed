"""Tokenizers of the generative demos, behind one small interface.

A generative handler needs three things from its tokenizer: ``encode(text) -> ids``, the raw
bytes each token stands for (``token_bytes``: streamed text is decoded from them, so a UTF-8
character split over tokens is never split in a chunk) and the end-of-sequence id, if any.

* ``CharTokenizer``: one token per character of a fixed alphabet (``tinygpt``).
* ``ByteTokenizer``: one token per byte, plus an end-of-sequence token (the ``gpt2`` demo's
  default: any text in, no file needed).
* ``JsonTokenizer``: a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``), loaded with
  the ``tokenizers`` package. Byte-level vocabularies (GPT-2's) map each token back to its
  bytes exactly; others fall back to decoding the token alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

from mesh.errors import BadRequest


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class CharTokenizer:
    def __init__(self, alphabet: list[str], eos_token_id: int | None = None, *,
                 name: str = "this model's alphabet") -> None:
        self.alphabet = alphabet
        self.name = name
        self.index = {ch: i for i, ch in enumerate(alphabet)}
        self.vocab_size = len(alphabet)
        self.eos_token_id = eos_token_id
        self._bytes = [ch.encode() for ch in alphabet]

    def encode(self, text: str) -> list[int]:
        index = self.index
        bad = sorted({ch for ch in text if ch not in index})
        if bad:
            raise BadRequest(f"prompt has characters outside {self.name}: {bad[:5]!r}")
        return [index[ch] for ch in text]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


class ByteTokenizer:
    """Token i < 256 is byte i; token 256 ends the sequence."""

    vocab_size = 257
    eos_token_id: int | None = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes((token_id,)) if token_id < 256 else b""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (printable stand-ins for every byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class JsonTokenizer:
    def __init__(self, path: str, eos_token: str = "") -> None:
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as exc:  # an optional dependency
            raise RuntimeError("a tokenizer file needs the 'tokenizers' package "
                               "(pip install tokenizers)") from exc
        self._tok: Any = HfTokenizer.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        eos = eos_token or next((t for t in ("<|endoftext|>", "</s>", "<eos>")
                                 if self._tok.token_to_id(t) is not None), "")
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None
        byte_of = _unicode_to_byte()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._byte_level = all(ch in byte_of for tok in list(vocab)[:1000] for ch in tok
                               if not tok.startswith("<"))
        added: dict[Any, Any] = getattr(self._tok, "get_added_tokens_decoder", dict)()
        self._special = {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self._cache: dict[int, bytes] = {}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        out = self._cache.get(token_id)
        if out is None:
            token = self._tok.id_to_token(token_id) or ""
            byte_of = _unicode_to_byte()
            if token_id in self._special:
                out = b""
            elif self._byte_level and all(ch in byte_of for ch in token):
                out = bytes(byte_of[ch] for ch in token)
            else:
                out = self._tok.decode([token_id], skip_special_tokens=True).encode()
            self._cache[token_id] = out
        return out
