"""The one decode core: every generation in kvtool runs through :func:`generate_step` (docs/architecture.md §4).

Three layers, as in mlx-lm: :func:`generate_step` (token ids: prefix reuse, prefill, sampling, beacons and their
evictions, stop/closed/superseded checks, counters) -> :func:`stream_generate` (UTF-8 safe text pieces, stop strings,
``GenStats`` timings) -> :func:`generate` (the joined text). ``Model.generate``/``chat`` (so ``kvtool chat``,
``generate`` and ``serve``), the beacon loop (``BeaconGenerator``) and eval's greedy runs (:func:`greedy`,
:func:`greedy_beacons`) only call these, and perplexity runs on :func:`eval_tokens`. :func:`decode_batch` is the one
place kvtool calls ``llama_decode`` itself (``kvtool bench`` times llama-cpp-python's ``Llama.eval`` on purpose: it
measures the runtime, not this loop).

Why a loop of our own instead of ``Llama.generate``: beacons need positions with holes and evictions, which its
position-indexed ``input_ids`` cannot hold, and one loop is one set of rules for every front end. It keeps the
``Llama``'s own bookkeeping (``input_ids``, ``n_tokens``) on the plain path, so prefix reuse and the high-level
``Llama`` API stay correct. Prefix reuse is guarded: a mixed cache can refuse a tail cut (a ring already dropped
cells a token at the cut needs); then the cache is cleared and the whole prompt evaluated (``cache_fallback``).
Sampling is llama.cpp's chain in llama-cpp-python's order and seed rule (``runtime/sampling.py``), so greedy
output is the argmax, token for token, and a seeded run gives what ``Llama.generate`` gave.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import KvtoolError
from .library import kv_used_cells
from .sampling import GREEDY, SamplerSettings, make_sampler, with_next_seed
from .stats import BeaconStats, GenStats
from .text import stop_filter, utf8_pieces


class Control:
    """What may end a generation from outside its loop: ``stop()`` (any thread: it only sets a flag), the model
    being closed, and a newer generation on the same context (a stream resumed after one is stale: the cache is no
    longer its own). One per context, shared by every caller of the core on it. ``owner`` (a ``Model``) is held
    weakly, so the control never keeps a model, and its context, alive."""

    def __init__(self, owner=None):
        self.stop_requested = False
        self.generation = 0
        self._owner = weakref.ref(owner) if owner is not None else None

    @property
    def closed(self) -> bool:
        if self._owner is None:
            return False
        owner = self._owner()
        return owner is None or bool(owner.closed)

    def begin(self) -> int:
        """A new generation: earlier streams become stale, a pending ``stop()`` is forgotten."""
        self.generation += 1
        self.stop_requested = False
        return self.generation

    def check(self, generation: int) -> None:
        """Raise unless generation ``generation`` may take another step."""
        if self.closed:
            raise KvtoolError("model is closed")
        if generation != self.generation:
            raise KvtoolError("this stream was superseded by a newer generate/chat call on the same Model")


@dataclass(frozen=True)
class BeaconSchedule:
    """A beacon (``token_id``) after every ``interval`` visible tokens; the chunk behind it leaves the cache.
    With ``budget_cells`` the interval is adaptive over ``intervals`` (``runtime/beacon_interval.py``): it starts at
    ``interval`` and moves up at chunk boundaries so that the live cells stay within the budget."""

    token_id: int
    interval: int
    intervals: tuple = ()
    budget_cells: Optional[int] = None

    @property
    def adaptive(self) -> bool:
        return self.budget_cells is not None


def peak_bound(n_prompt: int, n_gen: int, interval: int) -> int:
    """Most live cells the beacon loop holds for ``n_gen`` generated tokens: prompt + beacons + a full chunk + the
    beacon decoded just before its chunk is evicted (that beacon is already counted in ``n_gen // c``)."""
    return n_prompt + n_gen // interval + interval


# ---------------------------------------------------------------------------------------------- decoding
def decode_batch(llm, items: Sequence[tuple[int, int]], logits_all: bool = False, seq: int = 0,
                 where: str = "") -> None:
    """Decode ``[(token, pos)]`` of sequence ``seq`` in one batch (at most ``llm.n_batch`` items); logits for the
    last item, or every item with ``logits_all``. The only ``llama_decode`` call in kvtool's own code."""
    import llama_cpp as lc

    b = llm._batch.batch
    n = len(items)
    for i, (tok, pos) in enumerate(items):
        b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), int(pos), 1
        b.seq_id[i][0] = seq
        b.logits[i] = bool(logits_all or i == n - 1)
    b.n_tokens = n
    rc = lc.llama_decode(llm._ctx.ctx, b)
    if rc != 0:
        raise KvtoolError(f"llama_decode failed ({rc}) at position {items[0][1]}{where}")


def _logits_rows(llm, n: int) -> np.ndarray:
    """The last ``n`` decode's logits as ``[n, vocab]`` (a view: copy before the next decode)."""
    import llama_cpp as lc

    n_vocab = llm.n_vocab()
    return np.ctypeslib.as_array(lc.llama_get_logits(llm._ctx.ctx), shape=(n * n_vocab,)).reshape(n, n_vocab)


def _append(llm, tokens: Sequence[int], logits_all: bool = False, record: Optional[list] = None) -> None:
    """Evaluate ``tokens`` right after the ``n_tokens`` the ``Llama`` holds, keeping its ``input_ids``/``n_tokens`` in
    step (as ``Llama.eval`` does, cells past ``n_tokens`` are dropped first)."""
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    for i in range(0, len(tokens), llm.n_batch):
        chunk = [int(t) for t in tokens[i:i + llm.n_batch]]
        n_past = llm.n_tokens
        want = logits_all or record is not None
        decode_batch(llm, [(t, n_past + j) for j, t in enumerate(chunk)], want)
        if record is not None:
            rows = _logits_rows(llm, len(chunk))
            record.extend((n_past + j, t, rows[j].copy()) for j, t in enumerate(chunk))
        llm.input_ids[n_past:n_past + len(chunk)] = chunk
        llm.n_tokens = n_past + len(chunk)
        llm._requires_eval = False


def eval_tokens(llm, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
    """Evaluate ``tokens`` after what the context holds; the last row of logits, or all rows ``[n, vocab]`` (what
    perplexity runs on)."""
    rows: list[np.ndarray] = []
    last = None
    for i in range(0, len(tokens), llm.n_batch):
        chunk = list(tokens[i:i + llm.n_batch])
        _append(llm, chunk, logits_all)
        arr = _logits_rows(llm, len(chunk) if logits_all else 1)
        if logits_all:
            rows.append(arr.copy())
        else:
            last = arr[-1].copy()
    return np.concatenate(rows, 0) if logits_all else last


def _swa_holds(llm, p0: int) -> bool:
    """False when a sliding-window model's SWA cache no longer holds the window a token at ``p0`` attends.

    Why: with ``swa_full=False`` (kvtool's default, as llama-cli) the SWA layers keep a ring of about n_swa +
    n_ubatch cells, and stock llama.cpp's ``seq_rm`` cuts it without complaint; its server makes the same check
    (the smallest position still cached against ``p0 - n_swa``). Models without sliding layers always pass.
    """
    import llama_cpp as lc

    n_swa = int(lc.llama_model_n_swa(llm._model.model))
    if n_swa <= 0:
        return True
    pos_min = int(lc.llama_memory_seq_pos_min(lc.llama_get_memory(llm._ctx.ctx), 0))
    return pos_min <= max(0, p0 - n_swa)


def _reuse_prefix(llm, tokens: list, st: GenStats) -> tuple[int, bool]:
    """(cached tokens kept, exact hit). An exact hit samples from the live logits; otherwise the cache is cut after
    the common prefix (one token is re-evaluated to refresh the logits when the prompt is all cached), or cleared
    when there is none or the cache refuses the cut."""
    if llm.n_tokens == 0:
        return 0, False
    held = llm.input_ids[:llm.n_tokens].tolist()
    longest = 0
    for a, b in zip(held, tokens):
        if a != b:
            break
        longest += 1
    consumed = longest == len(tokens)
    if consumed and llm.n_tokens == len(tokens) and not getattr(llm, "_requires_eval", True):
        return longest, True
    reuse = longest - 1 if consumed else longest
    if reuse > 0 and not _swa_holds(llm, reuse):
        reuse = 0  # the sliding-window ring lost what the token at `reuse` must see: re-evaluate
        st.cache_fallback = True
    if reuse > 0 and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
        llm.n_tokens = reuse
        llm._requires_eval = True
        return reuse, False
    if reuse > 0:
        st.cache_fallback = True
    llm._ctx.kv_cache_clear()
    llm.n_tokens = 0
    llm._requires_eval = True
    return 0, False


class _BeaconState:
    """The beacon loop's cache bookkeeping for one generation: positions, the open chunk, live cells."""

    def __init__(self, llm, schedule: BeaconSchedule, bs: BeaconStats, seq: int, horizon: int = 0):
        import llama_cpp as lc

        self.lc, self.llm, self.c, self.bs, self.seq = lc, llm, schedule.interval, bs, seq
        self.token_id = schedule.token_id
        self.mem = lc.llama_get_memory(llm._ctx.ctx)
        self.n_ctx = llm.n_ctx()
        self.schedule, self.horizon = schedule, int(horizon)
        # the live cells may not pass the context, nor an adaptive schedule's budget (a hard cap)
        self.cap = self.n_ctx if schedule.budget_cells is None else min(self.n_ctx, int(schedule.budget_cells))
        bs.budget_cells = schedule.budget_cells
        self.measure = True
        self.chunk_start = self.in_chunk = 0

    def _adapt(self) -> None:
        """Adaptive schedule, at a chunk boundary: the interval of the next chunk (never smaller than this one)."""
        if not self.schedule.adaptive:
            return
        from .beacon_interval import next_interval

        bs = self.bs
        c = next_interval(self.schedule.intervals or (self.c,), self.c, bs.live_cells,
                          self.horizon - bs.generated_tokens, int(self.schedule.budget_cells))
        if c != self.c:
            bs.switches.append([int(bs.generated_tokens), int(c)])
            self.c = bs.interval = c

    def decode(self, items: list, record: Optional[list]) -> None:
        bs = self.bs
        decode_batch(self.llm, items, record is not None, self.seq,
                     f" with {bs.live_cells} live cells of {self.n_ctx}")
        if record is not None:
            rows = _logits_rows(self.llm, len(items))
            record.extend((int(p), int(t), rows[i].copy()) for i, (t, p) in enumerate(items))
        bs.live_cells += len(items)
        bs.peak_live_cells = max(bs.peak_live_cells, bs.live_cells)
        if self.measure:
            try:
                full, _ = kv_used_cells(self.llm._ctx.ctx)
            except Exception:  # stock runtime: no kvtool C API, the logical count is all we have
                self.measure = False
                return
            bs.peak_full_cells = max(bs.peak_full_cells or 0, full)

    def prefill(self, prompt: list, record: Optional[list]) -> None:
        self.lc.llama_memory_seq_rm(self.mem, self.seq, -1, -1)
        self.llm.n_tokens = 0  # positions will have holes: never let the plain path reuse them as a prefix
        n_batch = max(2, int(self.llm.n_batch))
        for i in range(0, len(prompt), n_batch):
            self.decode([(t, i + j) for j, t in enumerate(prompt[i:i + n_batch])], record)
        self.bs.next_pos = self.chunk_start = len(prompt)
        self._adapt()

    def step(self, tok: int, record: Optional[list]) -> bool:
        """Decode ``tok`` (and the beacon when it closes a chunk, then evict the chunk); False when the live cells
        would no longer fit."""
        bs, pos = self.bs, self.bs.next_pos
        items = [(tok, pos)]
        if self.in_chunk + 1 == self.c:  # the chunk is full: its beacon goes in the same batch, right after it
            items.append((self.token_id, pos + 1))
        if bs.live_cells + len(items) > self.cap:
            return False
        self.decode(items, record)
        bs.next_pos = pos + len(items)
        if len(items) == 2:
            # the beacon is decoded before the eviction: a batch must continue at seq_pos_max + 1
            bs.beacons += 1
            p0, p1 = self.chunk_start, self.chunk_start + self.c
            if not self.lc.llama_memory_seq_rm(self.mem, self.seq, p0, p1):
                raise KvtoolError(f"the KV cache refused to evict positions [{p0}, {p1})")
            bs.evicted += p1 - p0
            bs.live_cells -= p1 - p0
            self.chunk_start, self.in_chunk = bs.next_pos, 0
            self._adapt()
        else:
            self.in_chunk += 1
        return True


# ---------------------------------------------------------------------------------------------- the core
def _prefill(llm, prompt: list, beacon: Optional[BeaconSchedule], st: GenStats, bs: Optional[BeaconStats],
             record: Optional[list], seq: int, horizon: int = 0) -> Optional[_BeaconState]:
    """Bring the prompt into the cache: the beacon path from an empty sequence, the plain path after the reusable
    prefix. Returns the beacon bookkeeping (None on the plain path)."""
    st.prompt_tokens = len(prompt)
    if beacon is None:
        cached, exact = _reuse_prefix(llm, prompt, st)
        st.cached_tokens, st.prompt_eval_tokens = cached, len(prompt) - cached
        if not exact:
            _append(llm, prompt[cached:], record=record)
        return None
    bs = bs if bs is not None else BeaconStats(beacon.token_id, beacon.interval)
    bs.prompt_tokens = len(prompt)
    st.cached_tokens, st.prompt_eval_tokens = 0, len(prompt)
    if beacon.budget_cells is not None and len(prompt) + 1 > beacon.budget_cells:
        raise KvtoolError(f"prompt is {len(prompt)} tokens but the KV budget holds {beacon.budget_cells} cells")
    bstate = _BeaconState(llm, beacon, bs, seq, horizon)
    bstate.prefill(prompt, record)
    return bstate


def generate_step(llm, prompt: Sequence[int], max_tokens: Optional[int] = None, sampler: SamplerSettings = GREEDY,
                  beacon: Optional[BeaconSchedule] = None, stats: Optional[GenStats] = None,
                  beacon_stats: Optional[BeaconStats] = None, control: Optional[Control] = None,
                  generation: Optional[int] = None, t0: Optional[float] = None,
                  forced: Optional[Sequence[int]] = None, record: Optional[list] = None,
                  stop_on_eog: bool = True, seq: int = 0) -> Iterator[int]:
    """Yield generated token ids (the end-of-generation token and beacons never).

    Plain path: reuses the cached prefix, then at most ``max_tokens`` tokens (None or <= 0: to the end of the
    context; capped there). With ``beacon``: an empty sequence first, a beacon after every ``interval`` tokens and
    its chunk evicted; ``max_tokens`` None or <= 0 runs until the live cells fill the cache (positions may pass
    ``n_ctx``). ``forced`` feeds these tokens instead of sampling (teacher forcing); ``record`` collects
    ``(pos, token, logits)`` for every decoded position. ``stats.finish_reason`` ends as "stop" (end-of-generation
    token), "length" or "cancelled" (``control.stop_requested``). Before each step after the first the loop checks
    ``control``: a closed model or a newer generation raises.
    """
    import llama_cpp as lc

    ctl = control if control is not None else Control()
    gen_id = ctl.begin() if generation is None else generation
    st = stats if stats is not None else GenStats()
    t0 = time.perf_counter() if t0 is None else t0
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise KvtoolError("empty prompt")
    ctl.check(gen_id)
    n_ctx = llm.n_ctx()
    if len(prompt) + 1 > n_ctx:
        raise KvtoolError(f"prompt is {len(prompt)} tokens but the context holds {n_ctx}")
    if beacon is not None:
        limit = int(max_tokens) if max_tokens and max_tokens > 0 else None
    else:
        room = n_ctx - len(prompt)
        limit = min(int(max_tokens), room) if max_tokens and max_tokens > 0 else room
    if forced is not None:
        forced = [int(t) for t in forced]
        limit = len(forced) if limit is None else min(limit, len(forced))
    # what is left to generate, for an adaptive beacon schedule: max_tokens, else the plain path's room
    horizon = limit if limit is not None else max(1, n_ctx - len(prompt))
    bstate = _prefill(llm, prompt, beacon, st, beacon_stats, record, seq, horizon)
    vocab = llm._model.vocab
    ctx = llm._ctx.ctx
    chain = None if forced is not None else make_sampler(llm, sampler, [beacon.token_id] if beacon else ())
    clock = time.perf_counter
    t_first = None
    n = 0
    try:
        while limit is None or n < limit:
            if chain is None:
                tok = forced[n]
            else:
                tok = int(lc.llama_sampler_sample(chain, ctx, -1))
                now = clock()
                if t_first is None:
                    t_first = now
                    st.prefill_s = now - t0
                st._sampled += 1
                st.decode_s = now - t_first
                if stop_on_eog and lc.llama_vocab_is_eog(vocab, tok):
                    st.finish_reason = "stop"
                    break
            n += 1
            st.generated_tokens = n
            if bstate is not None:
                bstate.bs.generated_tokens = n
            yield tok
            ctl.check(gen_id)
            if ctl.stop_requested:
                st.finish_reason = "cancelled"
                break
            if limit is not None and n >= limit:
                break
            if bstate is not None:
                if not bstate.step(tok, record):
                    break  # the live cells would no longer fit in the cache: "length"
            else:
                _append(llm, [tok], record=record)
            st._decodes += 1
        if not st.finish_reason:
            st.finish_reason = "length"
    finally:
        if chain is not None:
            lc.llama_sampler_free(chain)
        if bstate is not None:
            bstate.bs.finish_reason = st.finish_reason
            if not ctl.closed and ctl.generation == gen_id:
                llm.n_tokens = 0  # the cache holds positions with holes: the plain path must not reuse them


def stream_generate(llm, prompt: Sequence[int], max_tokens: Optional[int] = None, sampler: SamplerSettings = GREEDY,
                    stop: Sequence[str] = (), beacon: Optional[BeaconSchedule] = None,
                    stats: Optional[GenStats] = None, beacon_stats: Optional[BeaconStats] = None,
                    control: Optional[Control] = None) -> Iterator[str]:
    """Text pieces of :func:`generate_step` (UTF-8 safe, cut before the earliest stop string). The generation begins
    now (a newer one supersedes it, the seed is drawn); ``stats`` is filled as it runs and closed at its end, with
    finish_reason "stop" for a stop string and "cancelled" when the caller drops the stream early."""
    ctl = control if control is not None else Control()
    st = stats if stats is not None else GenStats()
    t0 = time.perf_counter()
    gen_id = ctl.begin()
    settings = with_next_seed(llm, sampler)
    toks = generate_step(llm, prompt, max_tokens, settings, beacon, st, beacon_stats, ctl, gen_id, t0)
    vocab = llm._model.vocab

    def run() -> Iterator[str]:
        stopped = []
        try:
            for piece in stop_filter(utf8_pieces(vocab, toks), stop, lambda: stopped.append(True)):
                ctl.check(gen_id)
                yield piece
        except GeneratorExit:
            st.finish_reason = "cancelled"
            raise
        finally:
            toks.close()
            if stopped:
                st.finish_reason = "stop"
            st.total_s = time.perf_counter() - t0

    return run()


def generate(llm, prompt: Sequence[int], max_tokens: Optional[int] = None, sampler: SamplerSettings = GREEDY,
             stop: Sequence[str] = (), **kw) -> str:
    """The whole text of :func:`stream_generate`."""
    return "".join(stream_generate(llm, prompt, max_tokens, sampler, stop, **kw))


# ---------------------------------------------------------------------------------------------- eval's runs
def _cut_at_stop(model, ids: Sequence[int], stops: Sequence[str]) -> Optional[str]:
    """The text of ``ids`` up to the first stop string, or None while no stop string has appeared."""
    if not stops:
        return None
    t = model.detokenize(ids)
    hit = [t.index(s) for s in stops if s in t]
    return t[:min(hit)] if hit else None


def _greedy_run(model, tokens: Sequence[int], max_tokens: Optional[int], stops: Sequence[str],
                beacon: Optional[BeaconSchedule]) -> tuple[dict, GenStats, Optional[BeaconStats]]:
    model.reset()
    st = GenStats()
    bs = BeaconStats(beacon.token_id, beacon.interval) if beacon is not None else None
    t0 = time.perf_counter()
    it = generate_step(model.llama, tokens, max_tokens, GREEDY, beacon, st, bs, model._control, t0=t0)
    out: list[int] = []
    text = None
    try:
        for tok in it:
            out.append(tok)
            text = _cut_at_stop(model, out, stops)
            if text is not None:
                break
    finally:
        it.close()
    t2 = time.perf_counter()
    prefill_s = st.prefill_s if st._sampled else t2 - t0
    finish = "stop" if text is not None or st.finish_reason == "stop" else "length"
    return ({"ids": out, "text": model.detokenize(out) if text is None else text, "finish": finish,
             "prompt_tokens": len(tokens), "prefill_s": prefill_s, "decode_s": t2 - t0 - prefill_s}, st, bs)


def greedy(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """Greedy generation from an empty cache, as eval records it: ids, text (cut at the first stop string), finish
    ("stop"|"length"), prompt_tokens, prefill_s, decode_s, n_decodes."""
    room = model.llama.n_ctx() - len(tokens)
    if room < 1:
        raise KvtoolError(f"prompt is {len(tokens)} tokens but the context holds {model.llama.n_ctx()}: raise --n-ctx")
    g, st, _ = _greedy_run(model, tokens, max(1, min(int(max_tokens), room)), stops, None)
    g["n_decodes"] = st._decodes
    return g


def greedy_beacons(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """:func:`greedy` through the beacon loop: the beacon id banned, a beacon after every c visible tokens and the
    chunk behind it evicted. Adds the loop's counters (``beacon_stats``)."""
    sched = model.beacon_schedule() if hasattr(model, "beacon_schedule") else None
    if sched is None:
        b = model.budgets
        sched = BeaconSchedule(int(b.beacon_token_id), int(b.beacon_interval))
    g, _, bs = _greedy_run(model, tokens, max_tokens, stops, sched)
    g["n_decodes"] = max(0, len(g["ids"]) - 1) + bs.beacons
    g["beacon_stats"] = bs.as_dict()
    return g
