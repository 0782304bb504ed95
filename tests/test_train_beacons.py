"""Beacon training (toolchain/train/beacons.py, `kvtool train beacons`) and beacon checkpoints into GGUF.

CPU only, tiny random llama (2 layers, 2 KV heads, untied lm_head). A random model earns no task reward, so the GRPO
term is driven by a fake verifier; the distillation pieces are checked against independent computations.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.tasks import Problem, register_task  # noqa: E402
from toolchain.train import beacons as tb  # noqa: E402
from toolchain.train.attention import BeaconSegments, get_kvtool, insert_beacons, reference_logits, use_slot_positions  # noqa: E402
from toolchain.train.common import load_model  # noqa: E402

torch.set_num_threads(1)
C = 4


def _toy(n: int, seed: int) -> list[Problem]:
    return [Problem("btoy", i, f"{i}+1=?", str(i + 1), {"i": i}, lambda a, e: float(a == str(e["i"] + 1)))
            for i in range(n)]


register_task("btoy", _toy)


def hash_reward(problem: Problem, completion: str) -> float:
    return float(hashlib.md5(completion.encode()).digest()[0] % 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Char-level fast tokenizer (98 ids) on a 98-row model: adding the beacon must grow the matrices to 99."""
    from helpers_models import make_tiny_char_llama

    d = make_tiny_char_llama(tmp_path_factory.mktemp("beacons") / "tiny", vocab=98, seed=4)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 98 and not cfg["tie_word_embeddings"]
    return d


def _cfg(tiny_dir, tmp_path, **kw) -> tb.BeaconTrainConfig:
    base = dict(model=str(tiny_dir), tasks=("btoy",), interval=C, steps=2, batch=2, group=2, max_new_tokens=10,
                lr=1e-3, beacon_lr=1e-3, pool=16, out_dir=str(tmp_path / "run"), save_every=1)
    base.update(kw)
    return tb.BeaconTrainConfig(**base)


def _setup(tiny_dir, cfg):
    model, tok = load_model(str(tiny_dir))
    return tb.prepare(model, tok, cfg)


# --- the beacon token ---------------------------------------------------------------------------------------------
def test_beacon_token_added_with_mean_init(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    bid = tb.add_beacon_token(model, tok)
    assert bid == 98 and tok.convert_tokens_to_ids("<|beacon|>") == 98 and len(tok) == 99
    assert tok("a<|beacon|>b", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("a"), 98,
                                                                           tok.convert_tokens_to_ids("b")]
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == 99
    assert torch.equal(emb[:98], emb0) and torch.equal(head[:98], head0)
    torch.testing.assert_close(emb[98], emb0.mean(0))
    torch.testing.assert_close(head[98], head0.mean(0))
    with pytest.raises(KvtoolError, match="already has"):
        tb.add_beacon_token(model, tok)


def test_reuse_token_changes_nothing(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    n = len(tok)
    assert tb.add_beacon_token(model, tok, reuse_token=97) == 97
    assert len(tok) == n and model.get_input_embeddings().weight.shape[0] == 98
    with pytest.raises(KvtoolError, match="outside the model's vocabulary"):
        tb.add_beacon_token(model, tok, reuse_token=98)


# --- sampling: the PyTorch beacon loop -------------------------------------------------------------------------------
def test_compressed_sampling_matches_full_forward(tiny_dir, tmp_path):
    """Incremental DynamicCache loop with eviction == one full-sequence forward under the beacon mask; and the
    same model's reference_logits (attention.py's oracle) agree too."""
    s = _setup(tiny_dir, _cfg(tiny_dir, tmp_path))
    tok = s.tok
    prompts = [tok("3+1=?")["input_ids"], tok("12+1=?")["input_ids"]]
    rec: list = []
    comps = tb.sample(s.model, prompts, 19, 0.0, s.beacon_id, [10 ** 6], tok.pad_token_id, interval=C, record=rec)
    assert [len(c) for c in comps] == [19, 19] and all(s.beacon_id not in c for c in comps)
    sb = tb.student_batch(prompts, comps, C, s.beacon_id, tok.pad_token_id)
    with torch.no_grad():
        full = tb.student_logits(s, sb)
    inc = torch.stack(rec, 1)
    torch.testing.assert_close(full, inc, atol=1e-4, rtol=0)
    assert torch.equal(full.argmax(-1), sb.targets)  # greedy
    ids, seg = insert_beacons(prompts[0], comps[0], C, s.beacon_id)
    ids, seg = ids[:-1], BeaconSegments(seg.chunk[:-1], seg.is_beacon[:-1])  # 19 tokens: no trailing beacon
    ref = reference_logits(s.model, ids, 0, 0, segments=seg)
    rows = sb.rows[0]
    ref_rows = ref[rows].clone()
    ref_rows[:, s.beacon_id] = tb.NEG
    torch.testing.assert_close(ref_rows, inc[0], atol=1e-4, rtol=0)


def test_mask_trains_under_per_head_windows(tiny_dir, tmp_path):
    """--mask: the student's forward is the AND of the beacon rule and the heads.json windows (attention.py's oracle),
    the teacher stays full (LoRA: same module, windows switched off inside the teacher context)."""
    from toolchain.heads import HeadsMask

    mpath = tmp_path / "heads.json"
    HeadsMask.from_scores([[1.0, 0.0], [0.0, 1.0]], 0.5, "manual", sink=1, window=3).save(mpath)
    s = _setup(tiny_dir, _cfg(tiny_dir, tmp_path, mask=str(mpath)))
    windows = [[0, 3], [3, 0]]
    tok = s.tok
    prompts, comps = [tok("3+1=?")["input_ids"]], [[40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
    sb = tb.student_batch(prompts, comps, C, s.beacon_id, tok.pad_token_id)
    with torch.no_grad():
        got = tb.student_logits(s, sb)[0]
    ids, seg = insert_beacons(prompts[0], comps[0], C, s.beacon_id)
    ids, seg = ids[:-1], BeaconSegments(seg.chunk[:-1], seg.is_beacon[:-1])
    rows = sb.rows[0]
    want = reference_logits(s.model, ids, windows, 1, segments=seg)[rows]
    plain = reference_logits(s.model, ids, 0, 0, segments=seg)[rows]
    want[:, s.beacon_id] = plain[:, s.beacon_id] = tb.NEG
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the windows bite on this sequence
    orig, _ = load_model(str(tiny_dir))
    t = tb.teacher_logits(s, prompts, comps)[0]
    with torch.no_grad():
        full = orig(input_ids=torch.tensor([prompts[0] + comps[0]])).logits[0, len(prompts[0]) - 1:-1]
    torch.testing.assert_close(t[:, :98], full, atol=1e-5, rtol=0)
    assert get_kvtool(s.base).windows.tolist() == windows  # restored after the teacher context
    HeadsMask.from_scores([[1.0, 0.0, 1.0]], 0.5, "manual").save(tmp_path / "bad.json")
    with pytest.raises(KvtoolError, match="1 layers x 3 KV heads, the model has 2 x 2"):
        _setup(tiny_dir, _cfg(tiny_dir, tmp_path, mask=str(tmp_path / "bad.json")))


def _window_mask(tmp_path):
    from toolchain.heads import HeadsMask

    mpath = tmp_path / "heads.json"
    HeadsMask.from_scores([[1.0, 0.0], [0.0, 1.0]], 0.5, "manual", sink=1, window=3).save(mpath)
    return str(mpath)


def test_compressed_sampling_under_mask_counts_positions(tiny_dir, tmp_path, monkeypatch):
    """--mask with the compressed loop (GRPO rollouts): after an eviction the windows must measure sequence positions
    (llama.cpp keeps each cell's pos), so the incremental logits equal the full forward under beacon rule AND windows.
    Without the slot positions (windows counted over surviving slots) they do not: the test can tell."""
    s = _setup(tiny_dir, _cfg(tiny_dir, tmp_path, mask=_window_mask(tmp_path)))
    tok = s.tok
    prompts = [tok("3+1=?")["input_ids"], tok("12+1=?")["input_ids"]]

    def run():
        rec: list = []
        comps = tb.sample(s.model, prompts, 19, 0.0, s.beacon_id, [10 ** 6], tok.pad_token_id, interval=C, record=rec)
        sb = tb.student_batch(prompts, comps, C, s.beacon_id, tok.pad_token_id)
        with torch.no_grad():
            return tb.student_logits(s, sb), torch.stack(rec, 1)

    full, inc = run()
    torch.testing.assert_close(full, inc, atol=1e-4, rtol=0)
    with use_slot_positions(s.model, torch.arange(3)[None]), pytest.raises(ValueError, match="cover 3 cache slots"):
        s.model(input_ids=torch.tensor([prompts[0]]))
    monkeypatch.setattr(tb, "use_slot_positions", lambda model, pos: contextlib.nullcontext())
    full2, inc2 = run()
    assert (full2 - inc2).abs().max() > 1e-3


def test_student_batch_layout():
    sb = tb.student_batch([[1, 2, 3], [1]], [[5, 6, 7, 8, 9], [5, 6, 7, 8]], 2, 99, 0)
    assert sb.ids[0].tolist() == [1, 2, 3, 5, 6, 99, 7, 8, 99, 9]
    assert sb.ids[1].tolist() == [1, 5, 6, 99, 7, 8, 0, 0, 0, 0]  # no trailing beacon, right padding
    assert sb.attn[1].tolist() == [1] * 6 + [0] * 4
    assert sb.rows[0].tolist() == [2, 3, 5, 6, 8] and sb.rows[1].tolist() == [0, 1, 3, 4, 0]
    assert sb.mask[1].tolist() == [True] * 4 + [False]
    assert sb.is_beacon[0].tolist() == [False] * 5 + [True, False, False, True, False]
    assert sb.chunk[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


# --- the objective -----------------------------------------------------------------------------------------------------
def test_token_kl_matches_definition():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    want = sum(float((pt[i, j] * (pt[i, j].log() - ps[i, j].log())).sum()) for i, j in [(0, 0), (0, 1), (1, 0)])
    assert float(tb.token_kl(t, s, mask)) == pytest.approx(want, rel=1e-5)
    assert float(tb.token_kl(t, t, mask)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_the_beacon_free_model(tiny_dir, tmp_path):
    """After a LoRA step the adapter-disabled teacher still gives the original model's logits."""
    cfg = _cfg(tiny_dir, tmp_path)
    s = _setup(tiny_dir, cfg)
    opt = tb.make_optimizer(s, cfg)
    tb.beacon_step(s, opt, _toy(2, 0), cfg)
    orig, tok = load_model(str(tiny_dir))
    prompts, comps = [tok("7+1=?")["input_ids"]], [[40, 41, 42, 43, 44, 45]]
    got = tb.teacher_logits(s, prompts, comps)[0]
    ids = torch.tensor([prompts[0] + comps[0]])
    with torch.no_grad():
        want = orig(input_ids=ids).logits[0, len(prompts[0]) - 1:-1]
    torch.testing.assert_close(got[:, :98], want, atol=1e-5, rtol=0)
    assert (got[:, s.beacon_id] == tb.NEG).all()


def test_one_step_lowers_kl_and_trains_only_intended_params(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path)
    s = _setup(tiny_dir, cfg)
    base_before = {k: v.detach().clone() for k, v in s.base.state_dict().items() if "lora_" not in k}
    lora_before = {n: p.detach().clone() for n, p in s.trainable()}
    row_before = s.beacon.row.detach().clone()
    assert lora_before and all("lora_" in n for n in lora_before)
    torch.manual_seed(0)
    with s.teacher() as teacher:
        data = tb.rollouts(teacher, s.tok, _toy(2, 0), 2, 10, 1.0, s.beacon_id)
    k0, n = tb.distill_kl(s, data.prompts, data.comps)
    opt = tb.make_optimizer(s, cfg)
    st = tb.beacon_step(s, opt, _toy(2, 0), cfg, teacher_data=data)
    assert st["kl"] == pytest.approx(k0 / n, rel=1e-5) and st["distill_tokens"] == n > 0
    k1, _ = tb.distill_kl(s, data.prompts, data.comps)
    assert k1 < k0
    # frozen: every base weight, the beacon's embedding-matrix row included (the trained row lives in the hook)
    for k, v in s.base.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    assert not torch.equal(s.beacon.row, row_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in s.trainable())


def test_full_mode_trains_weights_and_keeps_a_frozen_teacher(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, full=True, lr=1e-4)
    s = _setup(tiny_dir, cfg)
    assert s.teacher_copy is not None and s.teacher_copy.get_input_embeddings().weight.shape[0] == 98
    teacher_before = {k: v.clone() for k, v in s.teacher_copy.state_dict().items()}
    w_before = s.base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt = tb.make_optimizer(s, cfg)
    tb.beacon_step(s, opt, _toy(2, 0), cfg)
    assert not torch.equal(s.base.model.layers[0].self_attn.q_proj.weight, w_before)
    for k, v in s.teacher_copy.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.parametrize("masked", [False, True], ids=["full-heads", "mask"])
def test_grpo_term_on_compressed_student_rollouts(tiny_dir, tmp_path, masked):
    """The GRPO term runs on compressed rollouts, with and without per-head windows (--mask with --rl-weight)."""
    mask = _window_mask(tmp_path) if masked else None
    cfg = _cfg(tiny_dir, tmp_path, rl_weight=1.0, rl_group=4, mask=mask)
    s = _setup(tiny_dir, cfg)
    opt = tb.make_optimizer(s, cfg)
    torch.manual_seed(1)
    st = tb.beacon_step(s, opt, _toy(2, 0), cfg, reward_fn=hash_reward)
    assert 0.0 < st["student_reward"] < 1.0 and st["rl_loss"] != 0.0
    assert np.isfinite(st["grad_norm"]) and np.isfinite(st["kl"])


@pytest.mark.parametrize("masked,n_new", [(False, 11), (True, 15)], ids=["full-heads", "mask"])
def test_logprobs_of_student_rollouts_match_sampling(tiny_dir, tmp_path, masked, n_new):
    """The GRPO log-probs (full forward + beacon mask, AND the windows with --mask) are those of the distribution the
    compressed loop sampled."""
    s = _setup(tiny_dir, _cfg(tiny_dir, tmp_path, mask=_window_mask(tmp_path) if masked else None))
    prompts = [s.tok("5+1=?")["input_ids"]] * 2
    torch.manual_seed(3)
    rec: list = []
    comps = tb.sample(s.model, prompts, n_new, 0.7, s.beacon_id, [2], s.tok.pad_token_id, interval=C, record=rec)
    lp, mask = tb.student_logprobs(s, prompts, comps, 0.7)
    inc = torch.log_softmax(torch.stack(rec, 1) / 0.7, -1)
    for i, c in enumerate(comps):
        want = inc[i, torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(lp[i, :len(c)], want, atol=1e-4, rtol=0)


# --- the loop: checkpoints, resume, export ---------------------------------------------------------------------------
def _state(run_dir, step):
    st = tb.load_checkpoint(tb.checkpoint_path(run_dir, step))
    return st["beacon_row"], st["trainable"], st["optimizer"]["state"]


def test_resume_is_exact(tiny_dir, tmp_path):
    a = _cfg(tiny_dir, tmp_path / "a", steps=3)
    tb.train(a, progress=False, echo=lambda m: None, export=False)
    b = _cfg(tiny_dir, tmp_path / "b", steps=1)
    tb.train(b, progress=False, echo=lambda m: None, export=False)
    with pytest.raises(KvtoolError, match="--resume"):
        tb.train(_cfg(tiny_dir, tmp_path / "b", steps=3), progress=False, echo=lambda m: None, export=False)
    with pytest.raises(KvtoolError, match="differ"):
        tb.train(_cfg(tiny_dir, tmp_path / "b", steps=3, interval=8, resume=True), progress=False,
                 echo=lambda m: None, export=False)
    tb.train(_cfg(tiny_dir, tmp_path / "b", steps=3, resume=True), progress=False, echo=lambda m: None, export=False)
    ra, ta, oa = _state(a.out_dir, 3)
    rb, tb_, ob = _state(b.out_dir, 3)
    assert torch.equal(ra, rb)
    assert ta.keys() == tb_.keys() and all(torch.equal(ta[k], tb_[k]) for k in ta)
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)
    la = [json.loads(x) for x in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == [1, 2, 3] and [x["kl"] for x in la] == [x["kl"] for x in lb]
    # a later phase may add the GRPO term: the step counter carries on and the log shows the student's reward
    tb.train(_cfg(tiny_dir, tmp_path / "b", steps=4, resume=True, rl_weight=0.5, rl_group=2), progress=False,
             echo=lambda m: None, export=False)
    lb = [json.loads(x) for x in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == [1, 2, 3, 4] and "student_reward" in lb[-1] and "student_reward" not in lb[2]


def test_lr_schedule(tiny_dir, tmp_path):
    c = _cfg(tiny_dir, tmp_path, steps=10, warmup=2, lr_schedule="cosine")
    f = [tb.lr_factor(c, s) for s in range(1, 11)]
    assert f[:2] == [0.5, 1.0] and f[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(f[1:], f[2:]))                       # strictly decaying after warm-up
    assert [tb.lr_factor(_cfg(tiny_dir, tmp_path, steps=10), s) for s in (1, 10)] == [1.0, 1.0]
    with pytest.raises(KvtoolError, match="--lr-schedule"):
        _cfg(tiny_dir, tmp_path, lr_schedule="linear")
    with pytest.raises(KvtoolError, match="--warmup"):
        _cfg(tiny_dir, tmp_path, warmup=-1)
    # the optimiser sees it: the logged rate is the schedule's, for both parameter groups
    tb.train(_cfg(tiny_dir, tmp_path, steps=3, lr_schedule="cosine"), progress=False, echo=lambda m: None,
             export=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in log] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in (1, 2, 3)])


def test_export_writes_hf_checkpoint_with_beacon_and_kvtool_json(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, steps=1)
    res = tb.train(cfg, progress=False, echo=lambda m: None)
    out = res.output
    info = json.loads((out / "kvtool.json").read_text())
    assert info["format"] == "kvtool.beacons/1"
    assert info["beacon"] == {"token": "<|beacon|>", "token_id": 98, "interval": C, "reused": False}
    st = tb.load_checkpoint(tb.checkpoint_path(cfg.out_dir, 1))
    model, tok = load_model(str(out))
    assert tok.convert_tokens_to_ids("<|beacon|>") == 98
    assert model.config._attn_implementation != "kvtool_mixed"
    torch.testing.assert_close(model.get_input_embeddings().weight[98], st["beacon_row"])
    # LoRA merged: the exported weights reproduce the trained student's logits under the beacon mask
    s = _setup(tiny_dir, cfg)
    tb.restore(s, tb.make_optimizer(s, cfg), st)
    ids, seg = insert_beacons(tok("9+1=?")["input_ids"], list(range(40, 50)), C, 98)
    want = reference_logits(s.model, ids, 0, 0, segments=seg)
    got = reference_logits(model, ids, 0, 0, segments=seg)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    from converters.beacon_checkpoint import beacon_from_checkpoint

    bc = beacon_from_checkpoint(out)
    assert (bc.token_id, bc.interval, bc.token) == (98, C, "<|beacon|>")


def test_cli_train_beacons(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from toolchain.commands.train_beacons import beacons_cmd

    args = ["--model", str(tiny_dir), "--task", "btoy", "--interval", "4", "--steps", "1", "--batch", "1",
            "--group", "2", "--max-new-tokens", "6", "--pool", "4", "--out-dir", str(tmp_path / "r"), "-q",
            "-o", str(tmp_path / "ckpt")]
    r = CliRunner().invoke(beacons_cmd, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ckpt" / "kvtool.json").read_text())["beacon"]["interval"] == 4
    bad = CliRunner().invoke(beacons_cmd, args[:-2] + ["--interval", "0"])
    assert bad.exit_code != 0 and "--interval must be >= 1" in str(bad.exception or bad.output)


def test_beacon_from_checkpoint_validation(tmp_path):
    from converters.beacon_checkpoint import beacon_from_checkpoint

    assert beacon_from_checkpoint(tmp_path) is None
    (tmp_path / "kvtool.json").write_text(json.dumps({"beacon": {"token_id": 5, "interval": 0}}))
    with pytest.raises(KvtoolError, match="interval must be an integer >= 1"):
        beacon_from_checkpoint(tmp_path)
    (tmp_path / "kvtool.json").write_text("{")
    with pytest.raises(KvtoolError, match="unreadable"):
        beacon_from_checkpoint(tmp_path)
    (tmp_path / "kvtool.json").write_text(json.dumps({"beacon": {"token_id": 5, "interval": 3, "reused": True,
                                                                   "token": "x"}}))
    bc = beacon_from_checkpoint(tmp_path)
    assert (bc.token_id, bc.interval, bc.token) == (5, 3, None)


# --- into GGUF and back through the runtime -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory):
    """A beacon checkpoint of a SentencePiece tiny llama (the converter accepts its tokenizer; transformers needs
    protobuf to read it). Untrained beacons: prepare + export only."""
    pytest.importorskip("google.protobuf")
    from helpers_models import make_tiny_hf

    d = tmp_path_factory.mktemp("beacon-sp")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=6)
    cfg = tb.BeaconTrainConfig(model=str(hf), tasks=("btoy",), interval=C, out_dir=str(d / "run"))
    model, tok = load_model(str(hf))
    s = tb.prepare(model, tok, cfg)
    return tb.export_checkpoint(s, d / "ckpt", cfg), d


def test_convert_checkpoint_carries_beacon_keys_and_runs(sp_ckpt, patched_runtime):
    from converters.beacon_checkpoint import convert_checkpoint
    from converters.gguf_budgets import open_gguf, read_budgets
    from toolchain.runtime.beacons import generate_with_beacons
    from toolchain.runtime.model import Model

    ckpt, d = sp_ckpt
    bid = json.loads((ckpt / "kvtool.json").read_text())["beacon"]["token_id"]
    out = convert_checkpoint(ckpt, d / "b.gguf", outtype="f32")
    b = read_budgets(out)
    assert (b.beacon_token_id, b.beacon_interval) == (bid, C) and b.head_window is None
    with open_gguf(out) as h:
        assert h.value("tokenizer.ggml.tokens")[bid] == "<|beacon|>"
    with Model.load(out, n_ctx=256, cache_type="f32", n_threads=2) as m:  # an untrained beacon model still runs
        text = generate_with_beacons(m, "the", max_tokens=3 * C + 1)
        assert isinstance(text, str) and m.beacon_stats.beacons >= 1
        assert m.beacon_stats.peak_live_cells <= m.beacon_stats.prompt_tokens + m.beacon_stats.beacons + C + 1


def test_convert_checkpoint_with_mask(sp_ckpt, patched_runtime):
    from converters.beacon_checkpoint import convert_checkpoint
    from converters.gguf_budgets import read_budgets
    from toolchain.heads import random_mask

    ckpt, d = sp_ckpt
    out = convert_checkpoint(ckpt, d / "bm.gguf", mask=random_mask(2, 2, 0.5, seed=0), outtype="f32")
    b = read_budgets(out)
    assert b.beacon_interval == C and b.head_window is not None and b.enabled


def test_gguf_without_the_beacon_token_is_rejected(sp_ckpt, tmp_path):
    from converters.beacon_checkpoint import check_beacon_token, write_beacon_keys
    from converters.hf_to_gguf import hf_to_gguf

    ckpt, d = sp_ckpt
    plain = d / "plain.gguf"
    if not plain.exists():
        hf_to_gguf(d / "hf", plain, "f32")  # the base model: its vocabulary has no beacon
    bid = json.loads((ckpt / "kvtool.json").read_text())["beacon"]["token_id"]
    with pytest.raises(KvtoolError, match="lacks the beacon token id"):
        write_beacon_keys(plain, tmp_path / "x.gguf", bid, C)
    with pytest.raises(KvtoolError, match="lacks the beacon token"):
        check_beacon_token(plain, 5, "<|beacon|>")
    assert not (tmp_path / "x.gguf").exists()


def test_kvtool_convert_cli_reads_kvtool_json(sp_ckpt, patched_runtime):
    from click.testing import CliRunner

    from converters.gguf_budgets import read_budgets
    from toolchain.cli import cli

    ckpt, d = sp_ckpt
    r = CliRunner().invoke(cli, ["convert", str(ckpt), "-o", str(d / "cli.gguf"), "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    assert read_budgets(d / "cli.gguf").beacon_interval == C
