"""Token ids to streamed text: never a split UTF-8 character, and stop strings cut with what follows them.

Why held back and per token: a stream must equal the whole reply, so text that could be the start of a stop string
waits until it is decided; what is released goes out in the pieces the tokens made (as llama-cpp-python's stream
did), so a front end sees one chunk per token where it can.
"""
from __future__ import annotations

import codecs
import ctypes
from typing import Callable, Iterator, Sequence


def token_piece(vocab, tok: int) -> bytes:
    """The bytes of one token (special tokens render as nothing, as in a completion's text)."""
    import llama_cpp as lc

    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, int(tok), buf, len(buf), 0, False)
    if n < 0:  # buffer too small: -n is the size needed
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, int(tok), buf, len(buf), 0, False)
    return buf.raw[:max(n, 0)]


def utf8_pieces(vocab, tokens: Iterator[int]) -> Iterator[str]:
    """Text of a token stream, one piece per token that completes characters. Invalid bytes are dropped (as
    llama-cpp-python's completion text drops them)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    for tok in tokens:
        piece = dec.decode(token_piece(vocab, tok))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


def stop_filter(pieces: Iterator[str], stops: Sequence[str], on_stop: Callable[[], None]) -> Iterator[str]:
    """Pass pieces through until a stop string appears (the earliest one; it and what follows are dropped, and
    ``on_stop`` is called). A piece that could be part of a stop string is held until that is decided."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    held: list[str] = []
    for piece in pieces:
        held.append(piece)
        text = "".join(held)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            yield from _take(held, min(hits))
            on_stop()
            return
        keep = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        free = len(text) - keep
        while held and len(held[0]) <= free:  # whole pieces only: one partly held stays held
            free -= len(held[0])
            yield held.pop(0)
    yield from (p for p in held if p)


def _take(held: list[str], n: int) -> Iterator[str]:
    """The first ``n`` characters of ``held``, in its pieces (the last one cut)."""
    for p in held:
        if n <= 0:
            return
        if p[:n]:
            yield p[:n]
        n -= len(p)
