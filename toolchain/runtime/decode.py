"""Greedy decoding on llama.cpp's low-level API: exact token ids from an empty cache, with or without beacons.

Why a loop of our own next to ``Llama.generate``: evaluation needs the token ids themselves (the repetition
detector), an argmax that no sampler setting can change, per-problem timings and, for beacon files, the same rule
through :class:`~toolchain.runtime.beacons.BeaconGenerator` (the beacon id never chosen). ``eval_tokens`` is also
what perplexity runs on (logits for every position).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from ..errors import KvtoolError


def eval_tokens(llm, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
    """Evaluate ``tokens`` after what the context holds; returns the last row of logits, or all rows ``[n, vocab]``.
    Keeps ``llm.n_tokens``/``input_ids`` in step so ``Model.generate`` stays correct afterwards."""
    n_vocab = llm.n_vocab()
    rows = []
    last = None
    for i in range(0, len(tokens), llm.n_batch):
        chunk = list(tokens[i:i + llm.n_batch])
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=logits_all)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(chunk)] = chunk
        llm.n_tokens = n_past + len(chunk)
        n_out = len(chunk) if logits_all else 1
        arr = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)
        if logits_all:
            rows.append(arr.copy())
        else:
            last = arr[-1].copy()
    if logits_all:
        return np.concatenate(rows, 0)
    return last


def _cut_at_stop(model, ids: Sequence[int], stops: Sequence[str]) -> Optional[str]:
    """The text of ``ids`` up to the first stop string, or None while no stop string has appeared."""
    if not stops:
        return None
    t = model.detokenize(ids)
    hit = [t.index(s) for s in stops if s in t]
    return t[:min(hit)] if hit else None


def greedy_beacons(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """:func:`greedy` through the beacon loop: the same argmax rule with the beacon id banned, a beacon after every
    c visible tokens and the chunk behind it evicted. Adds the loop's counters (``beacon_stats``)."""
    from .beacons import BeaconGenerator

    b = model.budgets
    gen = BeaconGenerator(model, int(b.beacon_token_id), int(b.beacon_interval))
    model.reset()
    out: list[int] = []
    text = None
    finish = None
    t0 = time.perf_counter()
    t1 = None
    try:
        for tok in gen.generate(tokens, max_tokens=max_tokens, temperature=0.0):
            if t1 is None:
                t1 = time.perf_counter()  # the first token comes right after the prompt's decode
            out.append(tok)
            text = _cut_at_stop(model, out, stops)
            if text is not None:
                finish = "stop"
                break
    finally:
        gen.close()
    t2 = time.perf_counter()
    st = gen.stats
    return {"ids": out, "text": model.detokenize(out) if text is None else text,
            "finish": finish or ("stop" if st.finish_reason == "stop" else "length"),
            "prompt_tokens": len(tokens), "prefill_s": (t1 or t2) - t0, "decode_s": t2 - (t1 or t2),
            "n_decodes": max(0, len(out) - 1) + st.beacons, "beacon_stats": st.as_dict()}


def greedy(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """Greedy generation from an empty cache. Returns ids, text, finish ("stop"|"length"), timings."""
    import llama_cpp

    llm = model.llama
    model.reset()
    room = llm.n_ctx() - len(tokens)
    if room < 1:
        raise KvtoolError(f"prompt is {len(tokens)} tokens but the context holds {llm.n_ctx()}: raise --n-ctx")
    limit = min(int(max_tokens), room)
    vocab = llm._model.vocab
    t0 = time.perf_counter()
    logits = eval_tokens(llm, tokens)
    t1 = time.perf_counter()
    out: list[int] = []
    finish = "length"
    n_decodes = 0
    text = None
    while True:
        tok = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            finish = "stop"
            break
        out.append(tok)
        text = _cut_at_stop(model, out, stops)
        if text is not None:
            finish = "stop"
            break
        if len(out) >= limit:
            break
        logits = eval_tokens(llm, [tok])
        n_decodes += 1
    t2 = time.perf_counter()
    return {"ids": out, "text": model.detokenize(out) if text is None else text, "finish": finish,
            "prompt_tokens": len(tokens), "prefill_s": t1 - t0, "decode_s": t2 - t1, "n_decodes": n_decodes}
