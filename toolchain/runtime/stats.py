"""``GenStats``: what one generation did and how long it took (the numbers every front end reports).

Why its own module: the llama-cpp-python path (``runtime.model``) and the beacon loop (``runtime.beacons``) both fill
it, and neither should import the other for it.
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
    _sampled: int = field(default=0, repr=False)

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
