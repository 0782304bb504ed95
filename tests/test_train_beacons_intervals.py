"""Multi-interval beacon training (``kvtool train beacons --interval 8,16,32``) and beacon training under torchrun.

CPU, the tiny random llama and char tokenizer of test_train_beacons.py. What must hold: each training sequence
draws its interval statelessly (same draw on resume and on every rank), a per-row student batch is exactly the
single-interval batch of each row, the checkpoint lists the intervals and ``kvtool convert`` writes them into
``kvtool.beacon.intervals``, and a 2-process gloo run ends with the single process's beacon row and weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import test_train_beacons as _tb  # noqa: E402
from test_train_beacons import _cfg, _setup  # noqa: E402

tiny_dir = _tb.tiny_dir  # the fixture, shared with test_train_beacons

from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.train import beacons as tb  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def test_config_sorts_the_intervals_and_defaults_to_the_smallest(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, intervals=(16, 4, 8, 8))
    assert cfg.all_intervals == (4, 8, 16) and cfg.interval == 4
    one = _cfg(tiny_dir, tmp_path, intervals=(8,))
    assert one.all_intervals == (8,) and one.interval == 8 and one.intervals == ()
    with pytest.raises(KvtoolError, match="--interval values must be >= 1"):
        _cfg(tiny_dir, tmp_path, intervals=(4, 0))


def test_row_intervals_are_stateless_and_cover_every_interval(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, intervals=(4, 8, 16))
    a = [tb.row_intervals(cfg, s, 8) for s in range(1, 30)]
    assert a == [tb.row_intervals(cfg, s, 8) for s in range(1, 30)]  # a function of (seed, step) only
    flat = [c for row in a for c in row]
    assert set(flat) == {4, 8, 16} and min(flat.count(c) for c in (4, 8, 16)) > 40  # about uniform over 232 draws
    assert tb.row_intervals(_cfg(tiny_dir, tmp_path, intervals=(4, 8, 16), seed=1), 1, 8) != a[0] or \
        tb.row_intervals(_cfg(tiny_dir, tmp_path, intervals=(4, 8, 16), seed=1), 2, 8) != a[1]
    assert tb.row_intervals(_cfg(tiny_dir, tmp_path), 3, 5) == [4] * 5  # one interval: every row
    seeds = tb.row_seeds(cfg, 3, 6)
    assert len(set(seeds)) == 6 and seeds == tb.row_seeds(cfg, 3, 6) and seeds != tb.row_seeds(cfg, 4, 6)
    assert tb.row_seeds(cfg, 3, 6)[:4] == tb.row_seeds(cfg, 3, 4)  # a row's seed does not depend on the batch size


def test_per_row_student_batch_is_each_rows_single_interval_batch():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    comps = [list(range(20, 39)), list(range(40, 50)), list(range(50, 75))]
    cs = [4, 8, 16]
    sb = tb.student_batch(prompts, comps, cs, 97, 0)
    for i, c in enumerate(cs):
        one = tb.student_batch([prompts[i]], [comps[i]], c, 97, 0)
        L, T = int(one.attn.sum()), len(comps[i])
        assert torch.equal(sb.ids[i, :L], one.ids[0, :L]) and int(sb.attn[i].sum()) == L
        assert torch.equal(sb.chunk[i, :L], one.chunk[0, :L]) and torch.equal(sb.is_beacon[i, :L], one.is_beacon[0, :L])
        assert torch.equal(sb.rows[i, :T], one.rows[0, :T]) and torch.equal(sb.targets[i, :T], one.targets[0, :T])
        assert int(sb.is_beacon[i].sum()) == (T - 1) // c  # no beacon after the last token
    with pytest.raises(ValueError, match="intervals for"):
        tb.student_batch(prompts, comps, [4, 8], 97, 0)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_dir, tmp_path):
    """A row's rollout is the same alone or in a batch: what lets torchrun shard the rows."""
    s = _setup(tiny_dir, _cfg(tiny_dir, tmp_path))
    tok = s.tok
    prompts = [tok("12+1=?", add_special_tokens=False)["input_ids"], tok("34+1=?", add_special_tokens=False)["input_ids"]]
    both = tb.sample(s.model, prompts, 12, 1.0, s.beacon_id, [10 ** 6], tok.pad_token_id, seeds=[11, 22])
    one = tb.sample(s.model, prompts[1:], 12, 1.0, s.beacon_id, [10 ** 6], tok.pad_token_id, seeds=[22])
    assert both[1] == one[0]
    other = tb.sample(s.model, prompts[1:], 12, 1.0, s.beacon_id, [10 ** 6], tok.pad_token_id, seeds=[23])
    assert other[0] != one[0]


def test_multi_interval_training_logs_the_draws_and_exports_them(tiny_dir, tmp_path):
    from converters.beacon_checkpoint import beacon_from_checkpoint

    cfg = _cfg(tiny_dir, tmp_path, intervals=(4, 8), steps=3, batch=2, group=2)
    res = tb.train(cfg, progress=False, echo=lambda m: None)
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    want = [tb.row_intervals(cfg, s, 4) for s in (1, 2, 3)]
    for line, rows in zip(log, want):
        assert line["rows_per_interval"] == {"4": rows.count(4), "8": rows.count(8)}
    info = json.loads((res.output / "kvtool.json").read_text())["beacon"]
    assert info["interval"] == 4 and info["intervals"] == [4, 8]
    bc = beacon_from_checkpoint(res.output)
    assert (bc.interval, bc.intervals) == (4, (4, 8))


def test_checkpoint_intervals_are_validated(tmp_path):
    from converters.beacon_checkpoint import beacon_from_checkpoint

    def write(beacon):
        (tmp_path / "kvtool.json").write_text(json.dumps({"beacon": {"token_id": 5, "interval": 8, **beacon}}))

    write({"intervals": [8, 16]})
    assert beacon_from_checkpoint(tmp_path).intervals == (8, 16)
    write({"intervals": [8]})
    assert beacon_from_checkpoint(tmp_path).intervals is None  # one interval: nothing to list
    for bad, msg in (([16, 32], "does not hold"), ([16, 8], "strictly ascending"), ([8, 0], ">= 1"),
                     ("8,16", "list of integers")):
        write({"intervals": bad})
        with pytest.raises(KvtoolError, match=msg):
            beacon_from_checkpoint(tmp_path)


def test_cli_parses_an_interval_list(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from toolchain.commands.train_beacons import beacons_cmd, parse_intervals

    assert parse_intervals("16") == (16,) and parse_intervals("32, 8,16") == (8, 16, 32)
    for bad in ("8,x", "0", "8,,16", "-4"):
        with pytest.raises(KvtoolError, match="--interval must be >= 1"):
            parse_intervals(bad)
    args = ["--model", str(tiny_dir), "--task", "btoy", "--interval", "8,4", "--steps", "1", "--batch", "1",
            "--group", "1", "--max-new-tokens", "6", "--pool", "4", "--out-dir", str(tmp_path / "r"), "-q",
            "-o", str(tmp_path / "ckpt")]
    r = CliRunner().invoke(beacons_cmd, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((tmp_path / "ckpt" / "kvtool.json").read_text())["beacon"]["intervals"] == [4, 8]


def test_convert_writes_the_intervals_key(tmp_path, patched_runtime):
    """HF checkpoint with two intervals -> GGUF with kvtool.beacon.intervals, read back by read_budgets."""
    pytest.importorskip("google.protobuf")
    from helpers_models import make_tiny_hf

    from converters.beacon_checkpoint import convert_checkpoint
    from converters.gguf_budgets import read_budgets
    from toolchain.heads import random_mask
    from toolchain.train.common import load_model

    hf = make_tiny_hf(tmp_path / "hf", arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=6)
    cfg = tb.BeaconTrainConfig(model=str(hf), tasks=("btoy",), intervals=(4, 8, 16), out_dir=str(tmp_path / "run"))
    model, tok = load_model(str(hf))
    ckpt = tb.export_checkpoint(tb.prepare(model, tok, cfg), tmp_path / "ckpt", cfg)
    b = read_budgets(convert_checkpoint(ckpt, tmp_path / "b.gguf", outtype="f32"))
    assert b.beacon_interval == 4 and b.beacon_intervals == (4, 8, 16) and b.supported_intervals() == (4, 8, 16)
    bm = read_budgets(convert_checkpoint(ckpt, tmp_path / "bm.gguf", mask=random_mask(2, 2, 0.5, seed=0),
                                         outtype="f32"))
    assert bm.beacon_intervals == (4, 8, 16) and bm.head_window is not None


# --- torchrun ---------------------------------------------------------------------------------------------------------
_DDP = r"""
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[4])
import test_train_beacons  # registers the btoy task
from toolchain.train import beacons as tb
from toolchain.train.common import dist_rank_world
cfg = tb.BeaconTrainConfig(model=sys.argv[1], tasks=("btoy",), intervals=(4, 8), steps=int(sys.argv[3]), batch=4,
                           group=2, max_new_tokens=10, lr=1e-2, beacon_lr=1e-2, pool=16, out_dir=sys.argv[2],
                           save_every=1, rl_weight=float(sys.argv[5]), rl_group=2)
reward = test_train_beacons.hash_reward
res = tb.train(cfg, reward_fn=reward, progress=False, echo=lambda m: None, export=False)
st = tb.load_checkpoint(tb.checkpoint_path(sys.argv[2], cfg.steps))
rank = dist_rank_world()[0]
import pathlib
pathlib.Path(sys.argv[2], f"state_{rank}.json").write_text(json.dumps({"row": st["beacon_row"].tolist(),
    "lora": {k: v.flatten()[:64].tolist() for k, v in sorted(st["trainable"].items())[:6]}}))
"""


def _run(script: Path, model: Path, out: Path, steps: int, nproc: int, rl: float) -> dict:
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else [])
    p = subprocess.run(cmd + [str(script), str(model), str(out), str(steps), str(ROOT / "tests"), str(rl)],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    # one file per rank (stdout lines of two ranks can interleave); every rank ran to the end
    assert sorted(f.name for f in out.glob("state_*.json")) == [f"state_{r}.json" for r in range(nproc)]
    return json.loads((out / "state_0.json").read_text())


def test_two_process_gloo_equals_one_process(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 problems per rank, against 1 process with the same global batch of 4:
    the same rollouts (per-row seeds), the same global token mean, so the same beacon row and LoRA weights."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    one = _run(script, tiny_dir, tmp_path / "one", 2, 1, 0.5)
    two = _run(script, tiny_dir, tmp_path / "two", 2, 2, 0.5)
    row1, row2 = torch.tensor(one["row"]), torch.tensor(two["row"])
    moved = float((row1 - torch.tensor(_initial_row(tiny_dir))).abs().max())
    assert moved > 1e-3  # the row trained (lr 1e-2, 2 steps), so agreeing is not trivial
    torch.testing.assert_close(row2, row1, atol=1e-5, rtol=1e-4)
    assert one["lora"].keys() == two["lora"].keys()
    for k in one["lora"]:
        torch.testing.assert_close(torch.tensor(two["lora"][k]), torch.tensor(one["lora"][k]), atol=1e-5, rtol=1e-4)
    log1 = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [x["distill_tokens"] for x in log1] == [x["distill_tokens"] for x in log2]
    assert [x["rows_per_interval"] for x in log1] == [x["rows_per_interval"] for x in log2]
    for a, b in zip(log1, log2):
        assert abs(a["kl"] - b["kl"]) <= 1e-5 * max(1.0, abs(a["kl"]))


def _initial_row(tiny_dir) -> list:
    from toolchain.train.common import load_model

    model, tok = load_model(str(tiny_dir))
    return model.get_input_embeddings().weight.detach().float().mean(0).tolist()  # the new token's mean init


def test_torchrun_batch_must_split_evenly(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "dist_rank_world", lambda: (0, 3))
    monkeypatch.setattr(tb, "init_dist", lambda device: None)
    with pytest.raises(KvtoolError, match="multiple of the number of processes"):
        tb.train(_cfg(tiny_dir, tmp_path, batch=4), progress=False, echo=lambda m: None, export=False)
