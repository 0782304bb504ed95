"""Tests for the ``passkey`` task (toolchain/tasks/passkey.py), task options in the registry, and ``kvtool eval
--task passkey:ctx=N`` through the runtime.

Problem generation and scoring run on plain tokenizers (whitespace words, characters) in milliseconds; the prompt
length is also checked on SmolLM2's real tokenizer (the model the table is measured on). The end-to-end eval runs a
tiny random llama whose SentencePiece vocabulary is trained on the task's own text, so every character encodes.
"""
from __future__ import annotations

import json

import pytest

from toolchain.errors import KvtoolError
from toolchain.tasks import make_dataset, needs_tokenizer, register_task, score
from toolchain.tasks import passkey as pk


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word, plus BOS."""
    return 1 + len(text.split())


def chars(text: str) -> int:
    return len(text)


# --- problems --------------------------------------------------------------------------------------------------
def test_deterministic_per_n_seed_ctx():
    a = make_dataset("passkey:ctx=512", 6, 3, count_tokens=words)
    b = make_dataset("passkey:ctx=512", 6, 3, count_tokens=words)
    assert [p.prompt for p in a] == [p.prompt for p in b] and [p.answer for p in a] == [p.answer for p in b]
    # problem i does not depend on n; another seed or ctx changes the prompts
    assert [p.prompt for p in make_dataset("passkey:ctx=512", 3, 3, count_tokens=words)] == [p.prompt for p in a[:3]]
    assert [p.answer for p in make_dataset("passkey:ctx=512", 6, 4, count_tokens=words)] != [p.answer for p in a]
    c = make_dataset("passkey:ctx=1024", 6, 3, count_tokens=words)
    assert [p.answer for p in c] == [p.answer for p in a]  # same keys and depths, longer filler
    assert all(len(x.prompt) > len(y.prompt) for x, y in zip(c, a))
    for p in a:
        assert len(p.answer) == 5 and p.answer.isdigit() and p.answer[0] != "0"
        assert pk.needle(p.answer) in p.prompt and p.prompt.endswith(pk.QUESTION)
        assert p.prompt.count(p.answer) == 2  # only in the needle: the filler has no digits
        assert p.task == "passkey:ctx=512" and p.info["key"] == p.answer and p.extract is False
    assert make_dataset("passkey", 2, 0, count_tokens=words)[0].entry["ctx"] == pk.DEFAULT_CTX


def test_depth_is_spread_and_where_the_needle_is():
    probs = make_dataset("passkey:ctx=2048", 200, 0, count_tokens=words)
    depths = [p.info["depth"] for p in probs]
    assert min(depths) < 0.05 and max(depths) > 0.95
    for lo in (0.0, 0.25, 0.5, 0.75):  # roughly uniform: every quarter gets 50 +- 20 of 200
        assert 30 <= sum(lo <= d < lo + 0.25 for d in depths) <= 70
    longest = max(len(x.split()) for x in pk.FILLER)
    for p in probs[:20]:
        at = p.prompt.index(pk.needle(p.answer))
        before = p.prompt[len(pk.HEADER):at]
        assert len(before.split()) == p.info["words_before"]
        assert before == "" or before.endswith(". ")  # at a sentence start
        assert abs(p.info["words_before"] - p.info["depth"] * p.info["filler_words"]) <= longest
        assert p.info["needle_token"] == words(p.prompt[:at])


def within(n: int, ctx: int) -> bool:
    return (ctx - pk.RESERVE) * (1 - pk.TOLERANCE) <= n <= ctx - pk.RESERVE


@pytest.mark.parametrize("ctx,count", [(512, words), (1000, words), (8192, words), (4096, chars), (8192, chars)])
def test_prompt_length_within_tolerance(ctx, count):
    for p in make_dataset(f"passkey:ctx={ctx}", 5, 1, count_tokens=count):
        n = count(p.prompt)
        assert n == p.info["prompt_tokens"] and within(n, ctx)
        assert n >= 0.95 * ctx


def test_prompt_length_on_smollm2_tokenizer(smollm2, patched_runtime):
    from toolchain.runtime.model import Model

    with Model.load(smollm2, n_ctx=256, n_threads=1) as m:
        def count(t):
            return len(m.tokenize(t))

        for ctx in (1024, 8192):
            for p in make_dataset(f"passkey:ctx={ctx}", 3, 0, count_tokens=count):
                n = len(m.tokenize(p.prompt))
                assert within(n, ctx) and n >= 0.95 * ctx, (ctx, n)
                # SmolLM2 splits numbers into single digits: the key is 5 tokens, so the reserve holds it
                assert len(m.tokenize(" " + p.answer, add_bos=False)) <= 6


# --- scoring ---------------------------------------------------------------------------------------------------
def test_scorer_right_and_wrong():
    [p] = make_dataset("passkey:ctx=512", 1, 0, count_tokens=words)
    k = p.answer
    for right in (f" {k}.", f"{k}", f" {k}. Remember it.", f" **{k}**", f"\n{k} is the pass key"):
        assert score(p, right) == 1.0, right
    wrong = [f" {k}0", f" {k[:4]}", f" {k[:2]} {k[2:]}", " 12345" if k != "12345" else " 54321", "", " five",
             f" the key {int(k) + 1}"]
    for w in wrong:
        assert score(p, w) == 0.0, w
    assert pk.score_completion(None, p.entry) == 0.0
    assert pk.first_digits("a 12 b 345") == "12"


# --- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,msg", [
    ("passkey:ctx=abc", "option ctx must be int, got 'abc'"),
    ("passkey:ctx=1.5", "option ctx must be int"),
    ("passkey:ctx=True", "option ctx must be int"),
    ("passkey:ctx=64", r"ctx must be in \[128, "),
    ("passkey:depth=0.5", "task 'passkey' has no option 'depth' \\(options: ctx\\)"),
    ("passkey:ctx", "is not key=value"),
    ("long_addition:n=3", "local task 'long_addition' takes no options"),
])
def test_option_errors(spec, msg):
    with pytest.raises(KvtoolError, match=msg) as e:
        make_dataset(spec, 2, 0, count_tokens=words)
    assert "\n" not in str(e.value)


def test_needs_tokenizer_and_registered_options():
    assert needs_tokenizer("passkey:ctx=2048") and not needs_tokenizer("long_addition")
    with pytest.raises(KvtoolError, match="needs the model's tokenizer"):
        make_dataset("passkey", 1, 0)
    assert make_dataset("passkey", 0, 0) == []  # nothing to size: option checks only
    with pytest.raises(KvtoolError, match="too short"):
        pk.make_problems(1, 0, ctx=128, count_tokens=lambda t: 10 * len(t))
    with pytest.raises(KvtoolError, match="outside"):  # 3000 tokens a word cannot land within tolerance
        pk.make_problems(1, 0, ctx=4096, count_tokens=lambda t: 3000 * (len(t.split()) - 39))
    calls = []
    register_task("opt_toy", lambda n, seed, k=1: calls.append(k) or [], options={"k": int})
    make_dataset("opt_toy:k=7", 3, 0)
    assert calls == [7]


# --- end to end through the runtime ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def passkey_tiny(tmp_path_factory, patched_runtime):
    """A random 2-layer llama whose tokenizer is trained on passkey text (digits, capitals, punctuation encode)."""
    pytest.importorskip("torch")
    spm = pytest.importorskip("sentencepiece")
    import io

    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("passkey-tiny")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=3)
    n_vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    lines = [pk.HEADER.strip(), pk.QUESTION.strip()] + list(pk.FILLER) + [pk.needle(f"{i:05d}") for i in range(0, 99999, 997)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3), model_writer=buf, vocab_size=n_vocab, model_type="bpe", num_threads=1,
        hard_vocab_limit=True, byte_fallback=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2, user_defined_symbols=["\n"], normalization_rule_name="identity")
    (hf / "tokenizer.model").write_bytes(buf.getvalue())
    return hf_to_gguf(hf, d / "passkey-tiny.gguf", "f32")


def test_eval_end_to_end(passkey_tiny, tmp_path):
    from click.testing import CliRunner

    from converters.gguf_budgets import apply_mask
    from toolchain.commands.eval import eval_cmd
    from toolchain.heads import random_mask

    masked = apply_mask(passkey_tiny, tmp_path / "passkey-tiny-s50.gguf", random_mask(2, 2, 0.5, seed=0, sink=4,
                                                                                      window=8))
    out = tmp_path / "pk.json"
    args = [str(masked), "--task", "passkey:ctx=512", "--n", "3", "--max-tokens", "6", "--n-ctx", "512",
            "--variants", "full,mixed", "--ubatch", "64", "--threads", "1", "--out", str(out), "-q"]
    r = CliRunner().invoke(eval_cmd, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads(out.read_text())
    recs = [json.loads(x) for x in (tmp_path / "pk.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and {x["variant"] for x in recs} == {"full", "mixed"}
    for x in recs:
        # the prompt the runtime saw is the one the task sized, within tolerance of ctx
        assert x["prompt_tokens"] == x["problem"]["prompt_tokens"]
        assert within(x["prompt_tokens"], 512)
        assert 0 <= x["problem"]["depth"] < 1 and len(x["problem"]["key"]) == 5
        assert x["reward"] == pk.score_completion(x["completion"], {"answer": x["problem"]["key"]})
    full, mixed = res["rows"]
    assert full["n"] == mixed["n"] == 3 and mixed["allocated_kv_bytes"] < full["allocated_kv_bytes"]
    # resumable: the same command does no new work
    r = CliRunner().invoke(eval_cmd, args)
    assert r.exit_code == 0 and len((tmp_path / "pk.jsonl").read_text().splitlines()) == 6
    # a bad option is one line before anything loads
    r = CliRunner().invoke(eval_cmd, [str(masked), "--task", "passkey:ctx=big", "-q"])
    assert isinstance(r.exception, KvtoolError) and "option ctx must be int" in str(r.exception)


def test_unencodable_vocabulary_is_an_error_not_an_abort(tiny_gguf, patched_runtime):
    """The session's tiny llama has no digits or capitals and no byte fallback: sizing the prompts must stop with
    kvtool's error before llama.cpp's tokenizer would abort the process."""
    from toolchain.eval import run_eval

    with pytest.raises(KvtoolError, match="cannot encode"):
        run_eval([tiny_gguf], "passkey:ctx=256", n=1, max_tokens=4, threads=1, progress=False)
