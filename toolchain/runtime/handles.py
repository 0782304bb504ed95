"""The few operations on a llama-cpp-python ``Llama`` that its public API lacks, in one place.

Why: callers outside the runtime (the bench, eval) need the raw context pointer for the kvtool C API, a cache clear
and a tail cut; these reach into llama-cpp-python's private ``_ctx``/``_model``, which may change between releases,
so only this module does.
"""
from __future__ import annotations

from typing import Optional


def ctx_ptr(llm):
    """The ``llama_context *`` of a loaded ``Llama`` (for :mod:`toolchain.runtime.library`)."""
    return llm._ctx.ctx


def synchronize(llm) -> None:
    """Wait until the device has finished every submitted graph. On a GPU backend ``llama_decode`` returns once the
    work is queued, and ``Llama.eval`` reads no logits (so never waits): a timing without this measures submission."""
    import llama_cpp

    llama_cpp.llama_synchronize(llm._ctx.ctx)


def clear_kv(llm) -> None:
    """An empty cache and no tokens: the next evaluation starts at position 0."""
    llm.reset()
    llm._ctx.kv_cache_clear()


def cut_kv(llm, p0: int) -> bool:
    """Drop cache positions ``p0..`` of sequence 0; False when the cache cannot (a ring no longer holds them)."""
    return bool(llm._ctx.kv_cache_seq_rm(0, p0, -1))


def window_bos(llm) -> Optional[int]:
    """The BOS id when the model adds one to a text, else None (perplexity windows start with it)."""
    return llm.token_bos() if llm._model.add_bos_token() and llm.token_bos() >= 0 else None
