"""``GenStats`` and ``BeaconStats``: what one generation did and how long it took (the numbers every front end reports).

Why its own module: the decode core (``runtime.decode``) fills both, and ``Model``, the beacon loop and eval read
them; none of those should import another just for a record type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class GenStats:
    """Timing of the latest generation. Rates are None when there is nothing to divide by."""

    prompt_tokens: int = 0
    cached_tokens: int = 0         # prompt prefix reused from the previous call's KV cache
    prompt_eval_tokens: int = 0    # prompt tokens actually evaluated
    generated_tokens: int = 0      # tokens sampled, the end-of-generation token excluded
    prefill_s: float = 0.0         # start of the call to the first sampled token
    decode_s: float = 0.0          # first to last sampled token
    total_s: float = 0.0
    finish_reason: str = ""        # "stop" (end token or stop string), "length", "cancelled"
    cache_fallback: bool = False   # the mixed cache refused the prefix cut; the prompt was re-evaluated
    _sampled: int = field(default=0, repr=False)   # tokens sampled, the end-of-generation token included
    _decodes: int = field(default=0, repr=False)   # llama_decode calls after the prompt (eval's n_decodes)

    @property
    def prefill_tok_s(self) -> Optional[float]:
        return self.prompt_eval_tokens / self.prefill_s if self.prompt_eval_tokens and self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> Optional[float]:
        # n sampled tokens are separated by n-1 single-token decodes
        return (self._sampled - 1) / self.decode_s if self._sampled > 1 and self.decode_s > 0 else None

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prompt_eval_tokens": self.prompt_eval_tokens, "generated_tokens": self.generated_tokens,
                "prefill_s": round(self.prefill_s, 6), "decode_s": round(self.decode_s, 6),
                "total_s": round(self.total_s, 6), "prefill_tok_s": _r(self.prefill_tok_s),
                "decode_tok_s": _r(self.decode_tok_s), "finish_reason": self.finish_reason,
                "cache_fallback": self.cache_fallback}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 2)


@dataclass
class BeaconStats:
    """What one beacon generation did to the cache (docs/architecture.md §5). ``live_cells``/``peak_live_cells`` count
    this sequence's cells (prompt + beacons + current chunk) as the loop keeps them; ``peak_full_cells`` is the
    measured used-cell count of the full-head cache (``kvtool_kv_used_cells``; None on a stock runtime)."""

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
    budget_cells: Optional[int] = None  # adaptive interval: the live-cell budget
    switches: list = field(default_factory=list)  # adaptive interval: [visible tokens so far, new c] per switch

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
