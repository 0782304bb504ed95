"""Tests for the long-chain reasoner task (toolchain/tasks/cyclic_sum.py): format, arithmetic, batch = examples,
registration with kvtool's task registry and the trainer's spec, and the peak-KV ratio it was designed for."""
from __future__ import annotations

import numpy as np
import pytest

from toolchain import tasks
from toolchain.tasks import alphabet as A
from toolchain.tasks import cyclic_sum as C
from toolchain.tasks import make_dataset, score


def test_lengths_and_format():
    assert (C.PROMPT_LEN, C.COT_LEN) == (14, 513)
    e = C.make_example(np.random.default_rng(0))
    assert len(A.encode(e["question"])) + 1 == C.PROMPT_LEN
    assert len(A.encode(e["answer"])) + 1 == C.COT_LEN
    q = e["question"]
    for k in range(C.N_STEPS):
        s = e["answer"][8 * k: 8 * k + 8]
        i = k % C.N_DIGITS
        assert s[0] == "ABCDEF"[i] and s[2] == "+" and s[5] == "="
        assert s[1] == q[2 * i + 1]                           # the digit is looked up in the prompt by its label


def test_chain_is_a_running_sum_mod_100():
    rng = np.random.default_rng(3)
    for _ in range(30):
        e = C.make_example(rng)
        steps = [e["answer"][8 * k: 8 * k + 8] for k in range(C.N_STEPS)]
        total = 0
        for k, s in enumerate(steps):
            assert int(s[3:5]) == total                       # the sum so far, two digits
            total = (total + e["digits"][k % C.N_DIGITS]) % 100
            assert int(s[6:8]) == total
        d, (rounds, rest) = e["digits"], divmod(C.N_STEPS, C.N_DIGITS)
        assert total == (sum(d) * rounds + sum(d[:rest])) % 100


def test_batch_matches_examples():
    ids = C.make_batch(np.random.default_rng(1), 6)
    assert ids.shape == (6, C.PROMPT_LEN + C.COT_LEN)
    assert (ids[:, 0] == A.BOS).all() and (ids[:, -1] == A.EOS).all()
    for row in ids:
        text = A.decode(row)
        q, a = text[:C.PROMPT_LEN - 1], text[C.PROMPT_LEN - 1:]
        digits = [int(c) for c in q if c.isdigit()]
        assert (q, a) == C._texts(digits)


def test_registered_task_and_spec():
    probs = make_dataset("cyclic_sum", 4, 11)
    assert [p.question for p in probs] == [p.question for p in make_dataset("cyclic_sum", 4, 11)]
    p = probs[0]
    assert p.prompt == p.question and not p.extract
    assert score(p, p.answer) == 1.0 and score(p, p.answer + "$") == 1.0
    assert score(p, "#".join(p.answer[i:i + 16] for i in range(0, len(p.answer), 16))) == 1.0
    assert score(p, p.answer[:-1] + "x") == 0.0 and score(p, p.answer[:-8]) == 0.0
    spec = tasks.task_spec("cyclic_sum")
    assert (spec.prompt_len, spec.cot_len) == (C.PROMPT_LEN, C.COT_LEN)
    assert spec.make_batch(np.random.default_rng(0), 2).shape == (2, C.PROMPT_LEN + C.COT_LEN)
    with pytest.raises(ValueError, match="unknown reasoner task 'nope'"):
        tasks.task_spec("nope")


def test_designed_peak_kv_ratio_at_c16():
    """The reason for the task: with the prompt kept and one beacon per 16 tokens, the beacon loop's peak
    (prompt + beacons so far + one open chunk + the beacon being decoded) is over 8x below the full cache."""
    c, P, G = 16, C.PROMPT_LEN, C.COT_LEN
    # after t tokens: t // c beacons; when a chunk has just filled, its c tokens and its beacon are live at once
    peak = max(P + t // c + (c if t % c == 0 else t % c) for t in range(1, G + 1))
    assert (P + G) / peak >= 8.0


@pytest.mark.parametrize("bad", [[], list(range(27))])
def test_bad_digit_count(bad):
    with pytest.raises(ValueError, match="digits"):
        C._texts(bad)
