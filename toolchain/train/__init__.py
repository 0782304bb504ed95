"""Training for kvtool (needs the ``train`` extras: torch, transformers, reasoning-gym, matplotlib).

* :mod:`toolchain.train.rlkv`: RLKV gate training (GRPO without KL + adaptive L1) and the DuoAttention-style baseline,
  behind ``kvtool train heads``.
"""
