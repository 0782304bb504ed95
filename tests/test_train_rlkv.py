"""Tests for RLKV gate training (toolchain/train/rlkv.py), the task layer (toolchain/tasks/) and `kvtool train`.

CPU only, tiny random llama (2 layers, 2 KV heads), a few steps each. A random model earns no task reward, so the
RL pieces are driven by fake reward functions and a local toy task; the formulas are checked against independent
re-computations (numpy, hand-derived numbers) rather than against the code under test.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.heads import HeadsMask  # noqa: E402
from toolchain.tasks import Problem, build_prompt, extract_answer, make_problems, register_task, score  # noqa: E402
from toolchain.train import common, rlkv  # noqa: E402
from toolchain.train.attention import freeze_all_but_gates, get_kvtool, load_with_kvtool, set_gates  # noqa: E402
from toolchain.train.rlkv import TrainConfig  # noqa: E402

torch.set_num_threads(1)


# --- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers_models import make_tiny_char_llama

    return make_tiny_char_llama(tmp_path_factory.mktemp("rlkv") / "tiny")


@pytest.fixture()
def gated(tiny_dir):
    """A fresh tiny model with trainable gates (all 1), everything else frozen."""
    model, tok = rlkv.load_model(str(tiny_dir))
    load_with_kvtool(model, 4, 2, gates=True)
    [gates] = freeze_all_but_gates(model)
    return model, tok, gates


def _toy(n: int, seed: int) -> list[Problem]:
    return [Problem("toy", i, f"{i}+1=?", str(i + 1), {"i": i}, lambda a, e: float(a == str(e["i"] + 1)))
            for i in range(n)]


register_task("toy", _toy)


def hash_reward(problem: Problem, completion: str) -> float:
    """A fake verifier that varies across samples (random text -> random 0/1) but is a pure function of the text."""
    return float(hashlib.md5(completion.encode()).digest()[0] % 2)


def _cfg(tiny_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_dir), tasks=("toy",), steps=3, batch=2, group=4, sink=2, window=4, max_new_tokens=8,
                pool=8, filter=False, out_dir=str(tmp_path / "run"), save_every=1)
    base.update(kw)
    return TrainConfig(**base)


# --- objective pieces -----------------------------------------------------------------------------------------------
def test_adaptive_beta_formula():
    beta, tau = 1e-3, 0.5
    assert rlkv.adaptive_beta(0.0, beta, tau) == 0.0
    assert rlkv.adaptive_beta(0.5, beta, tau) == 0.0  # strictly above tau
    assert rlkv.adaptive_beta(0.75, beta, tau) == pytest.approx(1e-3 * (math.e ** 0.75 - 1))
    assert rlkv.adaptive_beta(1.0, beta, tau) == pytest.approx(1e-3 * 1.718281828)
    assert rlkv.adaptive_beta(0.6, beta, 0.7) == 0.0
    assert rlkv.adaptive_beta(0.6, 2.0, 0.0) == pytest.approx(2.0 * (math.exp(0.6) - 1))


def test_group_advantages_match_numpy():
    r = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1], dtype=float)
    got = rlkv.group_advantages(torch.tensor(r), 4).numpy()
    g = r.reshape(3, 4)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == pytest.approx(0.75 / (0.5 + 1e-4))  # mean .25, sample std .5
    assert (got[4:8] == 0).all()  # an all-solved group carries no signal


def test_clipped_objective_ratio_and_clip():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    lp = torch.zeros(1, 3, requires_grad=True)
    # ratio 1: the loss is -A per unmasked token
    assert rlkv.clipped_objective(lp, lp.detach(), torch.tensor([2.0]), mask).item() == pytest.approx(-4.0)
    old = torch.full((1, 3), -math.log(1.5))  # ratio 1.5
    loss = rlkv.clipped_objective(lp, old, torch.tensor([1.0]), mask, eps=0.2)
    assert loss.item() == pytest.approx(-2 * 1.2)  # positive advantage: clipped at 1 + eps
    loss.backward()
    assert torch.count_nonzero(lp.grad) == 0  # clipped -> no gradient
    loss_neg = rlkv.clipped_objective(lp, old, torch.tensor([-1.0]), mask, eps=0.2)
    assert loss_neg.item() == pytest.approx(2 * 1.5)  # negative advantage: the unclipped (worse) term wins


def test_batch_indices_cover_epochs_and_are_stateless():
    n, b = 5, 2
    seq = [i for s in range(1, 6) for i in rlkv.batch_indices(s, b, n, seed=3)]
    assert sorted(seq[:5]) == list(range(5)) and sorted(seq[5:10]) == list(range(5))
    assert rlkv.batch_indices(4, b, n, 3) == rlkv.batch_indices(4, b, n, 3)


# --- tasks ------------------------------------------------------------------------------------------------------------
def test_extract_answer():
    assert extract_answer("think <answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>\n-7\n</answer>") == "-7"
    assert extract_answer("<answer>12") is None
    assert extract_answer("") is None


def test_reasoning_gym_problems_and_scores():
    pytest.importorskip("reasoning_gym")
    a = make_problems(["chain_sum", "simple_equations"], 4, seed=7)
    b = make_problems(["chain_sum", "simple_equations"], 4, seed=7)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.task for p in a] == ["chain_sum", "simple_equations"] * 2
    for p in a:
        assert score(p, f"so <answer>{p.answer}</answer>") == 1.0
        assert score(p, f"{p.answer}") == 0.0  # no tag, no reward
        assert score(p, "<answer>not a number</answer>") == 0.0
    few = make_problems(["chain_sum:min_terms=2,max_terms=2"], 3, seed=0)
    assert all(p.entry["metadata"]["num_terms"] == 2 for p in few)
    with pytest.raises(KvtoolError):
        make_problems(["no_such_task_xyz"], 2, 0)


def test_prompt_uses_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    p = _toy(1, 0)[0]
    text, chat = build_prompt(p, tok)
    assert not chat and text.endswith("Solution:") and "<answer>" in text and p.question in text
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    text, chat = build_prompt(p, tok)
    assert chat and text.startswith("[system]") and text.endswith("[assistant]") and p.question in text


def test_local_task_with_verbatim_prompt_and_whole_completion_scoring(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    p = Problem("add", 0, "^A12=", "A1+2=03$", {}, lambda a, e: float(a.startswith("A1+2=03$")), prompt="^A12=",
                extract=False)
    assert build_prompt(p, tok) == ("^A12=", False)  # no instruction, no template
    assert score(p, "A1+2=03$ junk") == 1.0 and score(p, "<answer>A1+2=03$</answer>") == 0.0


# --- self-distillation ------------------------------------------------------------------------------------------
def test_self_distillation_filter_and_cache(gated, tmp_path):
    model, tok, gates = gated
    with torch.no_grad():
        gates.fill_(0.3)
    pool = _toy(6, 0)
    seen_gates = []

    def fake(problem, completion):  # index 0, 2, 4 solved by exactly the first of its samples
        seen_gates.append(get_kvtool(model).gates.detach().clone())
        fake.calls[problem.index] = fake.calls.get(problem.index, 0) + 1
        return float(problem.index % 2 == 0 and fake.calls[problem.index] == 1)

    fake.calls = {}
    cfg = TrainConfig(model="x", tasks=("toy",), batch=4, group=3, max_new_tokens=4, pool=6)
    cache = tmp_path / "sd.jsonl"
    kept = rlkv.self_distill(model, tok, pool, cfg, fake, cache)
    assert [p.index for p in kept] == [0, 2, 4]
    assert all(torch.equal(g, torch.ones_like(g)) for g in seen_gates)  # sampled ungated (full attention)
    assert torch.allclose(gates, torch.full_like(gates, 0.3))  # trained values restored
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert lines[0]["kind"] == "kvtool.selfdistill/1" and [r["index"] for r in lines[1:]] == [0, 2, 4]
    assert all(r["n_correct"] == 1 for r in lines[1:])

    def boom(problem, completion):
        raise AssertionError("the cache should have been used")

    assert [p.index for p in rlkv.self_distill(model, tok, pool, cfg, boom, cache)] == [0, 2, 4]
    assert rlkv.self_distill_filter(pool, [0, 2, 0, 1, 0, 0]) == [pool[1], pool[3]]


# --- one GRPO step ----------------------------------------------------------------------------------------------
def test_grpo_step_moves_gates_and_only_gates_get_grads(gated, tmp_path):
    model, tok, gates = gated
    cfg = _cfg("x", tmp_path, group=4, max_new_tokens=8)
    torch.manual_seed(0)
    probs = _toy(2, 0)
    before = gates.detach().clone()
    stats = rlkv.rlkv_step(model, tok, torch.optim.Adam([gates], lr=cfg.lr), probs, cfg, hash_reward)
    assert 0.0 < stats["reward"] < 1.0  # the fake verifier did vary, so advantages are non-zero
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert not torch.equal(gates.detach(), before)
    assert bool(((gates >= 0) & (gates <= 1)).all())
    assert gates.grad is not None and torch.count_nonzero(gates.grad) > 0
    for name, p in model.named_parameters():
        if p is not gates:
            assert not p.requires_grad and p.grad is None, name


def test_l1_pushes_gates_down_when_rewards_are_high(gated, tmp_path):
    model, tok, gates = gated
    cfg = _cfg("x", tmp_path, group=2, max_new_tokens=4)
    stats = rlkv.rlkv_step(model, tok, torch.optim.Adam([gates], lr=cfg.lr), _toy(2, 0), cfg, lambda p, c: 1.0)
    assert stats["reward"] == 1.0 and stats["pg_loss"] == 0.0  # equal rewards: no policy signal
    assert stats["beta_prime"] == pytest.approx(1e-3 * (math.e - 1))
    # Adam's first step moves every gate by lr against the sign of its (L1) gradient
    torch.testing.assert_close(gates.detach(), torch.full_like(gates, 1 - cfg.lr), rtol=0, atol=1e-6)


def test_ratio_is_one_with_a_single_update_and_logprobs_match_generate(gated):
    model, tok, gates = gated
    with torch.no_grad():
        gates.copy_(torch.tensor([[0.2, 0.9], [0.5, 0.0]]))
    torch.manual_seed(1)
    ro = rlkv.rollout(model, tok, _toy(2, 0), 2, 6, 0.7, hash_reward)
    from transformers import GenerationConfig

    torch.manual_seed(1)
    P = ro.n_prompt
    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
                          pad_token_id=tok.pad_token_id, eos_token_id=common.eos_ids(model, tok), output_logits=True,
                          return_dict_in_generate=True)
    out = model.generate(input_ids=ro.ids[:, :P], attention_mask=ro.attn[:, :P], generation_config=gc)
    assert torch.equal(out.sequences, ro.ids)  # same RNG, same samples
    gen_lp = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1)
    gen_lp = gen_lp.gather(-1, ro.ids[:, P:, None]).squeeze(-1)
    lp = rlkv.completion_logprobs(model, ro.ids, ro.attn, P, 0.7)
    assert ((gen_lp - lp).abs() * ro.comp_mask).max().item() < 1e-4  # the loss scores the sampling policy


# --- export ------------------------------------------------------------------------------------------------------
def test_mask_export_follows_the_rule(tmp_path):
    g = torch.tensor([[0.9, 0.1, 0.5], [0.3, 1.0, 0.2]])
    cfg = TrainConfig(model="x", sink=8, window=32, sparsity=0.5)
    m = rlkv.export_heads(g, cfg, {"arch": "llama", "name": "tiny"})
    # independent rule: compress the floor(0.5*6 + 0.5) = 3 lowest scores -> 0.1, 0.2, 0.3
    assert m.full == [[True, False, True], [False, True, False]]
    assert m.method == "kvtool-rlkv" and (m.sink, m.window, m.sparsity) == (8, 32, 0.5)
    m.save(tmp_path / "h.json")
    back = HeadsMask.load(tmp_path / "h.json")
    np.testing.assert_allclose(back.scores, g.numpy(), rtol=1e-6)
    assert rlkv.export_heads(g, TrainConfig(model="x", method="duo", sparsity=0.5)).method == "duo"


# --- resume ------------------------------------------------------------------------------------------------------
def test_resume_is_identical_to_an_uninterrupted_run(tiny_dir, tmp_path):
    straight = rlkv.train(_cfg(tiny_dir, tmp_path / "a", steps=3), hash_reward, progress=False, echo=lambda m: None)
    rlkv.train(_cfg(tiny_dir, tmp_path / "b", steps=2), hash_reward, progress=False, echo=lambda m: None)
    resumed = rlkv.train(_cfg(tiny_dir, tmp_path / "b", steps=3, resume=True), hash_reward, progress=False,
                         echo=lambda m: None)
    assert not torch.equal(straight.gates, torch.ones_like(straight.gates))  # the run did train
    assert torch.equal(straight.gates, resumed.gates)
    la = [json.loads(x) for x in straight.log_path.read_text().splitlines()]
    lb = [json.loads(x) for x in resumed.log_path.read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert (x["reward"], x["mean_alpha"], x["loss"], x["tokens"]) == (y["reward"], y["mean_alpha"], y["loss"],
                                                                          y["tokens"])
    ck = torch.load(tmp_path / "b" / "run" / "ckpt" / "step_3.pt", weights_only=True)
    assert ck["step"] == 3 and set(ck["rng"][0]) >= {"python", "numpy", "torch"} and "state" in ck["optimizer"]
    with pytest.raises(KvtoolError, match="already holds checkpoints"):
        rlkv.train(_cfg(tiny_dir, tmp_path / "b", steps=4), hash_reward, progress=False, echo=lambda m: None)
    with pytest.raises(KvtoolError, match="lr"):
        rlkv.train(_cfg(tiny_dir, tmp_path / "b", steps=4, lr=0.5, resume=True), hash_reward, progress=False,
                   echo=lambda m: None)


# --- duo baseline ------------------------------------------------------------------------------------------------
def test_passkey_batch(gated):
    _, tok, _ = gated
    ids, tail = rlkv.passkey_batch(tok, 3, 160, 100, torch.Generator().manual_seed(0))
    assert ids.shape == tail.shape == (3, 160) and tail[:, -1].all() and not tail[:, 0].any()
    text = tok.decode(ids[0].tolist())
    key = text.split("The pass key is ")[1][:5]
    assert key.isdigit() and text.rstrip().endswith(f"The pass key is {key}.")


def test_duo_reduces_mse_and_moves_gates(gated, tmp_path):
    model, tok, gates = gated
    ids, tail = rlkv.passkey_batch(tok, 2, 160, 100, torch.Generator().manual_seed(0))
    cfg = _cfg("x", tmp_path, method="duo", l1=0.0, lr=0.1, sink=2, window=8)
    load_with_kvtool(model, 8, 2, gates=torch.full((2, 2), 0.3))
    [gates] = freeze_all_but_gates(model)
    opt = torch.optim.Adam([gates], lr=cfg.lr)
    first = rlkv.duo_step(model, opt, ids, tail, cfg)["mse"]
    for _ in range(4):
        rlkv.duo_step(model, opt, ids, tail, cfg)
    with torch.no_grad():
        after = float(rlkv.duo_loss(model, ids, tail))
    assert first > 0 and after < 0.5 * first and float(gates.detach().mean()) > 0.3
    # from gates = 1 (MSE 0) the L1 term alone moves them down
    set_gates(model, None)
    [gates] = freeze_all_but_gates(model)
    st = rlkv.duo_step(model, torch.optim.Adam([gates], lr=0.01), ids, tail, _cfg("x", tmp_path, method="duo"))
    assert st["mse"] == 0.0 and float(gates.detach().max()) < 1.0


# --- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_help_and_one_step_run(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from toolchain.commands.train import train

    r = CliRunner().invoke(train, ["heads", "--help"])
    assert r.exit_code == 0 and "--sparsity" in r.output and "--resume" in r.output
    out = tmp_path / "heads.json"
    args = ["heads", "--model", str(tiny_dir), "--task", "toy", "--no-filter", "--steps", "1", "--batch", "2",
            "--group", "2", "--max-new-tokens", "4", "--sink", "2", "--window", "4", "--device", "cpu", "--dtype", "f32",
            "--out-dir", str(tmp_path / "run"), "-o", str(out), "-q"]
    train.main(args, standalone_mode=False)
    m = HeadsMask.load(out)
    assert m.method == "kvtool-rlkv" and m.n_compressed() == 2 and m.scores is not None
    run = tmp_path / "run"
    assert (run / "gates.png").read_bytes()[:4] == b"\x89PNG" and (run / "ckpt" / "step_1.pt").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    with pytest.raises(KvtoolError, match="already holds checkpoints"):
        train.main(args, standalone_mode=False)
    train.main(["heads", "--model", str(tiny_dir), "--method", "duo", "--steps", "1", "--batch", "1", "--sink", "2",
                "--window", "8", "--seq-len", "140", "--out-dir", str(tmp_path / "duo"), "-q"], standalone_mode=False)
    assert HeadsMask.load(tmp_path / "duo" / "heads.json").method == "duo"


def test_cli_without_train_extras_is_one_line(monkeypatch):
    from toolchain.commands.train import EXTRAS_MSG, train

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(KvtoolError) as e:
        train.main(["heads", "--model", ".", "--steps", "1"], standalone_mode=False)
    assert str(e.value) == EXTRAS_MSG == "kvtool train needs the train extras: pip install 'kvtool[train]'"


def test_config_validation():
    with pytest.raises(KvtoolError, match="group"):
        TrainConfig(model="x", group=1)
    with pytest.raises(KvtoolError, match="method"):
        TrainConfig(model="x", method="ppo")
    with pytest.raises(KvtoolError, match="sparsity"):
        TrainConfig(model="x", sparsity=1.5)
    assert TrainConfig(model="x", method="duo").l1 == 0.05 and TrainConfig(model="x").l1 == 1e-3


def test_gguf_model_input(tiny_gguf):
    """A GGUF goes through transformers' gguf_file= loader (dequantized) and gives the HF model's logits."""
    from transformers import AutoModelForCausalLM

    model, tok = rlkv.load_model(str(tiny_gguf))
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent / "hf")
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok.eos_token_id == 2 and len(tok("the water")["input_ids"]) > 1
    with pytest.raises(KvtoolError, match="not a Hugging Face directory"):
        rlkv.load_model(str(tiny_gguf.parent / "nothing.bin"))


_DDP_SCRIPT = """
import hashlib, json, sys, torch
torch.set_num_threads(1)
from toolchain.tasks import Problem, register_task
from toolchain.train.rlkv import TrainConfig, train
register_task("toy", lambda n, seed: [Problem("toy", i, f"{i}+1=?", str(i + 1), {}, None) for i in range(n)])
reward = lambda p, c: float(hashlib.md5(c.encode()).digest()[0] % 2)
model, out, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
cfg = TrainConfig(model=model, tasks=("toy",), steps=steps, batch=4, group=2, sink=2, window=4, max_new_tokens=6,
                  pool=8, filter=False, out_dir=out, save_every=1, resume=resume)
r = train(cfg, reward, progress=False, echo=lambda m: None)
print("GATES", json.dumps(r.gates.flatten().tolist()))
"""


@pytest.mark.slow
def test_two_process_gloo_run_agrees_across_ranks_and_resumes(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): every rank ends with the same gates; resume is exact there too."""
    import subprocess
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])

    def run(out, steps, resume):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                            str(tiny_dir), str(out), str(steps), "1" if resume else "0"],
                           capture_output=True, text=True, timeout=300, cwd=root,
                           env={**__import__("os").environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        return [json.loads(x.split(" ", 1)[1]) for x in p.stdout.splitlines() if x.startswith("GATES ")]

    straight = run(tmp_path / "a", 3, False)
    assert len(straight) == 2 and straight[0] == straight[1] and straight[0] != [1.0] * 4
    run(tmp_path / "b", 2, False)
    assert run(tmp_path / "b", 3, True) == straight
