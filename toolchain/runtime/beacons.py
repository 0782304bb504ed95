"""The run-time beacon loop (docs/architecture.md §5) on llama.cpp's low-level API.

Every ``c`` generated tokens the loop decodes the beacon token at the next position, **then** removes the ``c`` chunk
tokens before it with ``llama_memory_seq_rm(mem, seq, chunk_start, chunk_end)``. Positions stay as holes, so RoPE
distances are the ones training used (``toolchain.train.attention.beacon_layout``): a token of chunk i sees the prompt, the
beacons b_1..b_{i-1} and the earlier tokens of chunk i. The beacon is decoded *before* the eviction because llama.cpp
requires a batch to continue at ``seq_pos_max + 1``. The prompt is never evicted; beacon tokens are never yielded
(nor sampled: the sampler gives the beacon id a -inf bias). Live KV cells then peak at
``prompt + n_gen // c + c`` (+1 for the beacon decoded just before its chunk goes), not ``prompt + n_gen``.

The loop itself is the decode core's beacon path (``toolchain.runtime.decode.generate_step`` with a
``BeaconSchedule``); this module is its API. Positions may run past ``n_ctx``: the loop only needs the *live* cells
to fit in the cache and stops with ``finish_reason == "length"`` when the next decode would not.

It works on a stock cache and on kvtool's mixed per-head cache alike: ``seq_rm`` of a middle range goes to every head
group, and visibility is the AND of the head's window rule and the beacon rule, as in training.

Entry points:

* :class:`BeaconGenerator` -- ``generate(prompt_tokens, max_tokens, ...)`` yields visible token ids; ``forced=`` feeds
  a fixed continuation (teacher forcing, for parity tests) and ``record=True`` keeps the logits of every decoded
  position in beacon-sequence order (:attr:`BeaconGenerator.recorded`);
* :func:`generate_with_beacons` -- the text-level counterpart of ``Model.generate`` (the core's ``stream_generate``:
  UTF-8 safe streaming, stop strings, ``Model.last_stats``/``Model.stop()``) for a ``Llama`` or explicit settings;
  ``Model`` runs the same path itself when the GGUF carries beacon keys.

After a run the cache holds the live cells of the last generation (``kv_stats()`` shows them) and the wrapped
``Llama`` is told it holds no tokens (``n_tokens = 0``), so a later plain generation starts from an empty cache and
never reuses cells with holes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

from ..errors import KvtoolError
from .decode import BeaconSchedule, Control, generate_step, peak_bound, stream_generate
from .sampling import SamplerSettings
from .stats import BeaconStats, GenStats

__all__ = ["BeaconGenerator", "BeaconStats", "beacon_config", "generate_with_beacons", "peak_bound"]


def _unwrap(model):
    """(llama_cpp.Llama, kvtool Model or None) from a ``Model`` or a ``Llama``."""
    llm = getattr(model, "llama", None)
    if llm is not None and hasattr(llm, "_ctx"):
        return llm, model
    if hasattr(model, "_ctx") and hasattr(model, "_model"):
        return model, None
    raise KvtoolError(f"expected a kvtool Model or a llama_cpp.Llama, got {type(model).__name__}")


def beacon_config(model) -> Optional[tuple[int, int]]:
    """(token_id, interval) from a ``Model``'s budgets (``kvtool.beacon.*`` keys; the interval chosen at load
    with ``beacon_interval=``), or None."""
    b = getattr(model, "budgets", None)
    if b is None or getattr(b, "beacon_token_id", None) is None:
        return None
    sched = model.beacon_schedule() if hasattr(model, "beacon_schedule") else None
    if sched is not None:
        return sched.token_id, sched.interval
    return int(b.beacon_token_id), int(b.beacon_interval)


def _control(llm, owner) -> Control:
    """The owning ``Model``'s control (its stop(), close() and generation count), or a fresh one for a bare Llama."""
    ctl = getattr(owner, "_control", None)
    return ctl if ctl is not None else Control()


class BeaconGenerator:
    """Incremental beacon generation on one sequence of a ``Llama``'s context. One thread at a time.

    >>> g = BeaconGenerator(model, token_id=99, interval=16)
    >>> for tok in g.generate(prompt_tokens, max_tokens=200): ...
    >>> g.stats.peak_live_cells
    """

    def __init__(self, model, token_id: int, interval: int, seq: int = 0, intervals: Sequence[int] = (),
                 budget_cells: Optional[int] = None):
        """``intervals`` + ``budget_cells``: the adaptive schedule (``runtime/beacon_interval.py``), starting at
        ``interval``; without them every chunk has ``interval`` tokens."""
        import llama_cpp as lc

        self.lc = lc
        self.llm, self.owner = _unwrap(model)
        self.n_vocab = int(self.llm.n_vocab())
        if interval is None or int(interval) < 1:
            raise KvtoolError(f"beacon interval must be >= 1, got {interval}")
        if token_id is None or not 0 <= int(token_id) < self.n_vocab:
            raise KvtoolError(f"beacon token id {token_id} is outside the model's vocabulary of {self.n_vocab}")
        self.token_id, self.interval, self.seq = int(token_id), int(interval), int(seq)
        if budget_cells is not None and int(budget_cells) < 2:
            raise KvtoolError(f"beacon budget must be >= 2 cells, got {budget_cells}")
        self.schedule = BeaconSchedule(self.token_id, self.interval, tuple(int(c) for c in intervals),
                                       None if budget_cells is None else int(budget_cells))
        self.n_ctx = int(self.llm.n_ctx())
        self.stats = BeaconStats(self.token_id, self.interval)
        self.recorded: list = []  # (pos, token, logits) with record=True
        self._control = _control(self.llm, self.owner)

    def close(self) -> None:
        """Nothing to free: the core decodes through the ``Llama``'s own batch (kept for callers that close)."""

    def live_positions(self) -> tuple[int, int]:
        """(seq_pos_min, seq_pos_max) of the sequence in the cache (-1, -1 when empty)."""
        mem = self.lc.llama_get_memory(self.llm._ctx.ctx)
        return (int(self.lc.llama_memory_seq_pos_min(mem, self.seq)),
                int(self.lc.llama_memory_seq_pos_max(mem, self.seq)))

    def reset(self) -> None:
        """Empty this sequence's cells (the loop does this before every generation)."""
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.llm._ctx.ctx), self.seq, -1, -1)
        self.llm.n_tokens = 0

    def generate(self, prompt_tokens: Sequence[int], max_tokens: Optional[int] = 256, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: Optional[int] = None, forced: Optional[Sequence[int]] = None, record: bool = False,
                 stop_on_eog: bool = True) -> Iterator[int]:
        """Yield visible token ids; beacons are decoded and chunks evicted in between (``decode.generate_step``).

        ``max_tokens`` None or <= 0: until the live cells fill the cache. ``forced``: feed these tokens instead of
        sampling (teacher forcing; generation stops after them). ``record``: keep the logits of every decoded position
        (prompt included) in :attr:`recorded` as ``(pos, token, logits)`` -- the layout of ``insert_beacons``.
        ``stats.finish_reason`` ends as "stop" (end-of-generation token), "length" or "cancelled" (``Model.stop()``).
        ``seed`` None: llama.cpp's random seed.
        """
        self.recorded = []
        self.stats = BeaconStats(self.token_id, self.interval)
        settings = SamplerSettings(float(temperature), int(top_k), float(top_p), float(min_p), float(repeat_penalty),
                                   seed)
        return generate_step(self.llm, prompt_tokens, max_tokens, settings, self.schedule, beacon_stats=self.stats,
                             control=self._control, forced=forced, record=self.recorded if record else None,
                             stop_on_eog=stop_on_eog, seq=self.seq)


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
    sched = None
    if token_id is None or interval is None:
        cfg = beacon_config(owner) if owner is not None else None
        if cfg is None:
            raise KvtoolError("the model has no kvtool.beacon keys: give token_id= and interval=")
        if token_id is None and interval is None:
            sched = owner.beacon_schedule()  # the load's choice, adaptive included
        token_id = cfg[0] if token_id is None else token_id
        interval = cfg[1] if interval is None else interval
    gen = BeaconGenerator(llm, token_id, interval, intervals=sched.intervals if sched else (),
                          budget_cells=sched.budget_cells if sched else None)  # validates the id and the interval
    if isinstance(prompt, str):
        tokens = owner.tokenize(prompt) if owner is not None else llm.tokenize(prompt.encode("utf-8"), special=True)
    else:
        tokens = [int(t) for t in prompt]
    if not tokens:
        raise KvtoolError("empty prompt (and the model adds no BOS token)")
    if temperature < 0:
        raise KvtoolError(f"temperature must be >= 0, got {temperature}")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    rec, bs = GenStats(), BeaconStats(gen.token_id, gen.interval)
    if owner is not None:
        owner.last_stats, owner.beacon_stats = rec, bs
    settings = SamplerSettings(float(temperature), int(top_k), float(top_p), float(min_p), float(repeat_penalty), seed)
    it = stream_generate(llm, tokens, max_tokens, settings, stops, gen.schedule, rec, bs, _control(llm, owner))
    return it if stream else "".join(it)
