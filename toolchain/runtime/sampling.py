"""The sampler chain every generation uses: llama.cpp's samplers in llama-cpp-python's order, and its seed rule.

Why llama-cpp-python's order and rule rather than our own: ``Model`` sampled through ``Llama.generate`` before the
decode core existed, and a seeded run must give the same tokens it gave then. The chain is
penalties -> greedy, or penalties -> top-k -> typical (1.0: off) -> top-p -> min-p -> temperature -> dist(seed);
the penalties see generated tokens only (``llama_sampler_sample`` accepts what it picks; the prompt is never fed in).
Banned ids (the beacon token) get a -inf logit bias in front, so no setting can pick them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Optional, Sequence


@dataclass(frozen=True)
class SamplerSettings:
    """``temperature`` 0 is greedy (argmax, first index on ties). ``seed`` None: see :func:`with_next_seed`."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: Optional[int] = None


GREEDY = SamplerSettings()


def with_next_seed(llm, settings: SamplerSettings) -> SamplerSettings:
    """The settings with a definite seed, by ``create_completion``'s rule: a given seed is kept; None draws the next
    seed from the model's current one (``Model.load(seed=...)``), so a sequence of unseeded calls is reproducible
    from the load seed. The model's seed becomes the one used, as llama-cpp-python leaves it."""
    seed = settings.seed if settings.seed is not None else random.Random(llm._seed).randint(0, 2**32)
    llm.set_seed(seed)
    return replace(settings, seed=seed)


def make_sampler(llm, s: SamplerSettings, banned: Sequence[int] = ()):
    """A new ``llama_sampler`` chain (the caller frees it with ``llama_sampler_free``)."""
    import llama_cpp as lc

    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    n_vocab = int(llm.n_vocab())
    if banned:
        bias = (lc.llama_logit_bias * len(banned))()
        for i, tok in enumerate(banned):
            bias[i].token, bias[i].bias = int(tok), float("-inf")
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(banned), bias))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
        n_vocab, int(llm.last_n_tokens_size), float(s.repeat_penalty), 0.0, 0.0))
    if s.temperature <= 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    seed = lc.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(int(s.top_k)))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_typical(1.0, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(s.top_p), 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(float(s.min_p), 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(s.temperature)))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain
