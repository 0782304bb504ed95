"""The run-time beacon loop (docs/architecture.md §5) on llama.cpp's low-level API.

Every ``c`` generated tokens the loop decodes the beacon token at the next position, **then** removes the ``c`` chunk
tokens before it with ``llama_memory_seq_rm(mem, seq, chunk_start, chunk_end)``. Positions stay as holes, so RoPE
distances are the ones training used (``toolchain.train.attention.beacon_layout``): a token of chunk i sees the prompt, the
beacons b_1..b_{i-1} and the earlier tokens of chunk i. The beacon is decoded *before* the eviction because llama.cpp
requires a batch to continue at ``seq_pos_max + 1``. The prompt is never evicted; beacon tokens are never yielded
(nor sampled: the sampler gives the beacon id a -inf bias). Live KV cells then peak at
``prompt + n_gen // c + c`` (+1 for the beacon decoded just before its chunk goes), not ``prompt + n_gen``.

Why not ``llama_cpp.Llama.generate``: it caps the sequence at ``n_ctx`` tokens and keeps ``input_ids``/``scores``
arrays indexed by position, which positions with holes break. Here positions may run past ``n_ctx``: the loop only
needs the *live* cells to fit in the cache; it stops with ``finish_reason == "length"`` when the next decode would not.

It works on a stock cache and on kvtool's mixed per-head cache alike: ``seq_rm`` of a middle range goes to every head
group, and visibility is the AND of the head's window rule and the beacon rule, as in training.

Entry points:

* :class:`BeaconGenerator` -- ``generate(prompt_tokens, max_tokens, ...)`` yields visible token ids; ``forced=`` feeds
  a fixed continuation (teacher forcing, for parity tests) and ``record=True`` keeps the logits of every decoded
  position in beacon-sequence order (:attr:`BeaconGenerator.recorded`);
* :func:`generate_with_beacons` -- the text-level counterpart of ``Model.generate`` (UTF-8 safe streaming, stop strings,
  ``Model.last_stats``/``Model.stop()``), for ``Model`` to route through when the GGUF carries beacon keys.

After a run the cache holds the live cells of the last generation (``kv_stats()`` shows them) and the wrapped
``Llama`` is told it holds no tokens (``n_tokens = 0``), so a later high-level ``Llama`` call starts with
``seq_rm(-1, 0, -1)`` and never reuses cells with holes.
"""
from __future__ import annotations

import codecs
import ctypes
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import KvtoolError
from .library import kv_used_cells
from .stats import GenStats

__all__ = ["BeaconGenerator", "BeaconStats", "beacon_config", "generate_with_beacons", "peak_bound"]


def peak_bound(n_prompt: int, n_gen: int, interval: int) -> int:
    """Most live cells the loop can hold for ``n_gen`` generated tokens: prompt + beacons + a full chunk + the beacon
    decoded just before its chunk is evicted (that beacon is already counted in ``n_gen // c``)."""
    return n_prompt + n_gen // interval + interval


@dataclass
class BeaconStats:
    """What one beacon generation did to the cache. ``live_cells``/``peak_live_cells`` count this sequence's cells
    (prompt + beacons + current chunk) as the loop keeps them; ``peak_full_cells`` is the measured used-cell count of
    the full-head cache (``kvtool_kv_used_cells``; None on a stock runtime)."""

    token_id: int
    interval: int
    prompt_tokens: int = 0
    generated_tokens: int = 0     # visible tokens yielded (the end-of-generation token excluded)
    beacons: int = 0              # beacons decoded
    evicted: int = 0              # chunk cells removed
    next_pos: int = 0             # position the next token would take (may exceed n_ctx)
    live_cells: int = 0
    peak_live_cells: int = 0
    peak_full_cells: Optional[int] = None
    finish_reason: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _unwrap(model):
    """(llama_cpp.Llama, kvtool Model or None) from a ``Model`` or a ``Llama``."""
    llm = getattr(model, "llama", None)
    if llm is not None and hasattr(llm, "_ctx"):
        return llm, model
    if hasattr(model, "_ctx") and hasattr(model, "_model"):
        return model, None
    raise KvtoolError(f"expected a kvtool Model or a llama_cpp.Llama, got {type(model).__name__}")


def beacon_config(model) -> Optional[tuple[int, int]]:
    """(token_id, interval) from a ``Model``'s budgets (``kvtool.beacon.*`` keys), or None."""
    b = getattr(model, "budgets", None)
    if b is None or getattr(b, "beacon_token_id", None) is None:
        return None
    return int(b.beacon_token_id), int(b.beacon_interval)


class BeaconGenerator:
    """Incremental beacon generation on one sequence of a ``Llama``'s context. One thread at a time.

    >>> g = BeaconGenerator(model, token_id=99, interval=16)
    >>> for tok in g.generate(prompt_tokens, max_tokens=200): ...
    >>> g.stats.peak_live_cells
    """

    def __init__(self, model, token_id: int, interval: int, seq: int = 0):
        import llama_cpp as lc

        self.lc = lc
        self.llm, self.owner = _unwrap(model)
        self.ctx = self.llm._ctx.ctx
        self.vocab = self.llm._model.vocab
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        if interval is None or int(interval) < 1:
            raise KvtoolError(f"beacon interval must be >= 1, got {interval}")
        if token_id is None or not 0 <= int(token_id) < self.n_vocab:
            raise KvtoolError(f"beacon token id {token_id} is outside the model's vocabulary of {self.n_vocab}")
        self.token_id, self.interval, self.seq = int(token_id), int(interval), int(seq)
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self.n_batch = max(2, int(lc.llama_n_batch(self.ctx)))
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self.stats = BeaconStats(self.token_id, self.interval)
        self.recorded: list[tuple[int, int, np.ndarray]] = []  # (pos, token, logits) with record=True
        self._measure = True

    # ------------------------------------------------------------------ low level
    def close(self) -> None:
        if self._batch is not None:
            self.lc.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _decode(self, items: Sequence[tuple[int, int]], want_logits: bool) -> None:
        """Decode [(token, pos)] of this sequence; logits for the last item (every item when ``want_logits``)."""
        lc, b = self.lc, self._batch
        for i, (tok, pos) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), int(pos), 1
            b.seq_id[i][0] = self.seq
            b.logits[i] = bool(want_logits or i == len(items) - 1)
        b.n_tokens = len(items)
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise KvtoolError(f"llama_decode failed ({rc}) at position {items[0][1]} "
                              f"with {self.stats.live_cells} live cells of {self.n_ctx}")
        if want_logits:
            for i, (tok, pos) in enumerate(items):
                ptr = lc.llama_get_logits_ith(self.ctx, i)
                self.recorded.append((int(pos), int(tok), np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()))
        self.stats.live_cells += len(items)
        self._track()

    def _track(self) -> None:
        st = self.stats
        st.peak_live_cells = max(st.peak_live_cells, st.live_cells)
        if self._measure:
            try:
                full, _ = kv_used_cells(self.ctx)
            except Exception:  # stock runtime: no kvtool C API, the logical count is all we have
                self._measure = False
                return
            st.peak_full_cells = max(st.peak_full_cells or 0, full)

    def _evict(self, p0: int, p1: int) -> None:
        ok = self.lc.llama_memory_seq_rm(self.mem, self.seq, p0, p1)
        if not ok:
            raise KvtoolError(f"the KV cache refused to evict positions [{p0}, {p1})")
        self.stats.evicted += p1 - p0
        self.stats.live_cells -= p1 - p0

    def live_positions(self) -> tuple[int, int]:
        """(seq_pos_min, seq_pos_max) of the sequence in the cache (-1, -1 when empty)."""
        return (int(self.lc.llama_memory_seq_pos_min(self.mem, self.seq)),
                int(self.lc.llama_memory_seq_pos_max(self.mem, self.seq)))

    def _sampler(self, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                 seed: Optional[int]):
        """llama.cpp sampler chain in llama-cpp-python's order, with the beacon id banned."""
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        bias = (lc.llama_logit_bias * 1)()
        bias[0].token, bias[0].bias = self.token_id, float("-inf")
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, 1, bias))
        if repeat_penalty != 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(64, float(repeat_penalty), 0.0, 0.0))
        if temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(int(top_k)))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(top_p), 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(float(min_p), 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(temperature)))
            s = lc.LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(s))
        return chain

    # ------------------------------------------------------------------ the loop
    def reset(self) -> None:
        """Empty this sequence's cells (the loop does this before every generation)."""
        self.lc.llama_memory_seq_rm(self.mem, self.seq, -1, -1)
        self.llm.n_tokens = 0

    def generate(self, prompt_tokens: Sequence[int], max_tokens: Optional[int] = 256, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: Optional[int] = None, forced: Optional[Sequence[int]] = None, record: bool = False,
                 stop_on_eog: bool = True) -> Iterator[int]:
        """Yield visible token ids; beacons are decoded and chunks evicted in between.

        ``max_tokens`` None or <= 0: until the live cells fill the cache. ``forced``: feed these tokens instead of
        sampling (teacher forcing; generation stops after them). ``record``: keep the logits of every decoded position
        (prompt included) in :attr:`recorded` as ``(pos, token, logits)`` -- the layout of ``insert_beacons``.
        ``stats.finish_reason`` ends as "stop" (end-of-generation token), "length" or "cancelled" (``Model.stop()``).
        """
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise KvtoolError("empty prompt")
        c = self.interval
        if len(prompt) + 1 > self.n_ctx:
            raise KvtoolError(f"prompt is {len(prompt)} tokens but the context holds {self.n_ctx}")
        limit = int(max_tokens) if max_tokens and max_tokens > 0 else None
        if forced is not None:
            forced = [int(t) for t in forced]
            limit = len(forced) if limit is None else min(limit, len(forced))
        self.reset()
        self.recorded = []
        st = self.stats = BeaconStats(self.token_id, self.interval, prompt_tokens=len(prompt))
        llm = self.llm
        if hasattr(llm, "_kv_stop"):
            llm._kv_stop = False
        sampler = None if forced is not None else self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        lc = self.lc
        try:
            for i in range(0, len(prompt), self.n_batch):
                part = prompt[i:i + self.n_batch]
                self._decode([(t, i + j) for j, t in enumerate(part)], record)
            if sampler is not None:  # the repeat penalty sees the prompt as llama-cpp-python's does
                for t in prompt[-64:]:
                    lc.llama_sampler_accept(sampler, t)
            pos = st.next_pos = len(prompt)
            chunk_start, in_chunk = pos, 0
            n = 0
            while limit is None or n < limit:
                if forced is not None:
                    tok = forced[n]
                else:
                    tok = int(lc.llama_sampler_sample(sampler, self.ctx, -1))
                    if stop_on_eog and lc.llama_vocab_is_eog(self.vocab, tok):
                        st.finish_reason = "stop"
                        break
                n += 1
                st.generated_tokens = n
                yield tok
                if getattr(llm, "_kv_stop", False):
                    st.finish_reason = "cancelled"
                    break
                if limit is not None and n >= limit:
                    break
                items = [(tok, pos)]
                if in_chunk + 1 == c:  # the chunk is full: its beacon goes in the same batch, right after it
                    items.append((self.token_id, pos + 1))
                if st.live_cells + len(items) > self.n_ctx:
                    st.finish_reason = "length"  # the live cells would no longer fit in the cache
                    break
                self._decode(items, record)
                pos += len(items)
                if len(items) == 2:
                    st.beacons += 1
                    self._evict(chunk_start, chunk_start + c)
                    chunk_start, in_chunk = pos, 0
                else:
                    in_chunk += 1
                st.next_pos = pos
            if not st.finish_reason:
                st.finish_reason = "length"
        finally:
            if sampler is not None:
                lc.llama_sampler_free(sampler)
            llm.n_tokens = 0  # the cache holds positions with holes: never let Llama reuse them as a prefix


def _piece(lc, vocab, tok: int) -> bytes:
    """The bytes of one token (special tokens render as nothing, as in llama-cpp-python's completion text)."""
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, int(tok), buf, len(buf), 0, False)
    if n < 0:  # buffer too small: -n is the size needed
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, int(tok), buf, len(buf), 0, False)
    return buf.raw[:max(n, 0)]


def _utf8_pieces(llm, tokens: Iterator[int]) -> Iterator[str]:
    """Text of a token stream, never splitting a UTF-8 character."""
    import llama_cpp as lc

    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab = llm._model.vocab
    for tok in tokens:
        piece = dec.decode(_piece(lc, vocab, tok))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


def _stop_filter(pieces: Iterator[str], stops: Sequence[str], on_stop) -> Iterator[str]:
    """Pass text through until a stop string appears (the stop string and what follows are dropped). Text that could
    be the start of a stop string is held back until it is decided."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        hits = [(held.find(s), s) for s in stops if s in held]
        if hits:
            at = min(h for h, _ in hits)
            if held[:at]:
                yield held[:at]
            on_stop()
            return
        keep = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(held)), 0, -1):
                if held.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held


def generate_with_beacons(model, prompt: Union[str, Sequence[int]], max_tokens: Optional[int] = 256,
                          temperature: float = 0.0, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          repeat_penalty: float = 1.0, seed: Optional[int] = None,
                          stop: Union[str, Sequence[str], None] = None, stream: bool = False,
                          token_id: Optional[int] = None, interval: Optional[int] = None
                          ) -> Union[str, Iterator[str]]:
    """``Model.generate`` with the beacon loop: same arguments, same return (text, or an iterator with ``stream``).

    ``prompt`` is text (tokenized as ``Model.tokenize`` does: BOS as the model says, special tokens parsed) or token
    ids (``Model.render_chat`` output for chat). ``token_id``/``interval`` default to the GGUF's ``kvtool.beacon.*``.
    ``model.last_stats`` (a ``GenStats``) and ``model.beacon_stats`` (a :class:`BeaconStats`) describe the run.
    """
    llm, owner = _unwrap(model)
    if token_id is None or interval is None:
        cfg = beacon_config(owner) if owner is not None else None
        if cfg is None:
            raise KvtoolError("the model has no kvtool.beacon keys: give token_id= and interval=")
        token_id = cfg[0] if token_id is None else token_id
        interval = cfg[1] if interval is None else interval
    if isinstance(prompt, str):
        tokens = owner.tokenize(prompt) if owner is not None else llm.tokenize(prompt.encode("utf-8"), special=True)
    else:
        tokens = [int(t) for t in prompt]
    if not tokens:
        raise KvtoolError("empty prompt (and the model adds no BOS token)")
    if temperature < 0:
        raise KvtoolError(f"temperature must be >= 0, got {temperature}")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    gen = getattr(owner, "_beacon_gen", None) if owner is not None else None
    if gen is None or gen.token_id != int(token_id) or gen.interval != int(interval) or gen.llm is not llm:
        gen = BeaconGenerator(llm, token_id, interval)
        if owner is not None:
            owner._beacon_gen = gen
    gen.owner = owner

    rec = GenStats(prompt_tokens=len(tokens), prompt_eval_tokens=len(tokens))
    t0 = time.perf_counter()
    if owner is not None:
        owner._gen_id = getattr(owner, "_gen_id", 0) + 1
        owner.last_stats = rec
    my_id = getattr(owner, "_gen_id", 0)
    stopped = {"text": False}

    def timed(toks: Iterator[int]) -> Iterator[int]:
        t_first = None
        for tok in toks:
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                rec.prefill_s = now - t0
            rec._sampled += 1
            rec.generated_tokens += 1
            rec.decode_s = now - t_first
            yield tok

    def guarded(toks: Iterator[int]) -> Iterator[int]:
        """Checks before each step that the owning Model is open: the step would decode on a freed context."""
        while True:
            if owner is not None and getattr(owner, "closed", False):
                raise KvtoolError("model is closed")
            try:
                tok = next(toks)
            except StopIteration:
                return
            yield tok

    def run() -> Iterator[str]:
        toks = gen.generate(tokens, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
        try:
            for piece in _stop_filter(_utf8_pieces(llm, timed(guarded(toks))), stops,
                                      lambda: stopped.__setitem__("text", True)):
                if owner is not None and owner._gen_id != my_id:
                    raise KvtoolError("this stream was superseded by a newer generate/chat call on the same Model")
                yield piece
        except GeneratorExit:
            rec.finish_reason = "cancelled"
            raise
        finally:
            toks.close()
            rec.total_s = time.perf_counter() - t0
            if not rec.finish_reason:
                rec.finish_reason = "stop" if stopped["text"] else (gen.stats.finish_reason or "stop")
            gen.stats.finish_reason = rec.finish_reason
            if owner is not None:
                owner.beacon_stats = gen.stats
            if hasattr(llm, "_kv_stop"):
                llm._kv_stop = False

    if stream:
        return run()
    return "".join(run())
