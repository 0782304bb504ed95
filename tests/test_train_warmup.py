"""Tests for the supervised warm-up (toolchain/train/warmup.py, toolchain/tasks/traces.py, `kvtool train warmup`).

CPU only, a tiny random llama with a character-level tokenizer, a few steps each. The checks are against
independent computations: traces against the dataset's own verifier, labels against the prompt/completion lengths,
the loss mask against the gradient that reaches the logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")

from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.heads import HeadsMask  # noqa: E402
from toolchain.tasks import make_problems, score  # noqa: E402
from toolchain.tasks.traces import cot_trace, dataset_cot_trace, running_sum_trace  # noqa: E402
from toolchain.train import warmup  # noqa: E402
from toolchain.train.common import load_model  # noqa: E402

torch.set_num_threads(1)
TASK = "chain_sum:min_terms=2,max_terms=3,max_digits=1"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers_models import make_tiny_char_llama

    return make_tiny_char_llama(tmp_path_factory.mktemp("warmup") / "tiny")


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


# --- traces ------------------------------------------------------------------------------------------------------
def test_running_sum_trace():
    assert running_sum_trace("4 - 1 - 7") == "4 - 1 = 3\n3 - 7 = -4\n<answer>-4</answer>"
    assert running_sum_trace("12 + -3") == "12 + -3 = 9\n<answer>9</answer>"
    assert running_sum_trace("2 * 3") is None and running_sum_trace("(1 + 2) - 3") is None
    assert running_sum_trace("5") is None


def test_traces_pass_the_task_verifier():
    for p in make_problems([TASK, "chain_sum"], 30, seed=3):
        t = cot_trace(p)
        assert t is not None and score(p, t) == 1.0 and t.endswith(f"<answer>{p.answer}</answer>")
    g = make_problems(["gsm_symbolic"], 3, seed=0)
    for p in g:  # the dataset's own worked solution, its '#### N' line turned into the tag
        t = cot_trace(p)
        assert t is not None and "####" not in t and score(p, t) == 1.0
        assert t.startswith(p.entry["metadata"]["answer_cot"].split("\n")[0])
    assert dataset_cot_trace("a = 2\n#### 2", "2") == "a = 2\n<answer>2</answer>"
    assert all(cot_trace(p) is None for p in make_problems(["simple_equations"], 5, seed=0))


# --- data and loss -------------------------------------------------------------------------------------------------
def test_only_completion_tokens_carry_loss(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    ex = warmup.make_examples(make_problems([TASK], 3, seed=5), tok)
    assert len(ex) == 3 and all(e.completion[-1] == tok.eos_token_id for e in ex)
    b = warmup.build_batch(ex, tok.pad_token_id)
    for i, e in enumerate(ex):
        P, C = len(e.prompt), len(e.completion)
        lab = b["labels"][i]
        assert (lab[:P] == -100).all() and (lab[P + C:] == -100).all()
        assert lab[P:P + C].tolist() == e.completion
        assert b["input_ids"][i, :P].tolist() == e.prompt and int(b["attention_mask"][i].sum()) == P + C
        # the test tokenizer has no newline (it becomes <unk>, dropped on decode)
        assert tok.decode(e.completion, skip_special_tokens=True).strip() == cot_trace(
            make_problems([TASK], 3, seed=5)[i]).replace("\n", "")
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    logits = out.logits.detach().requires_grad_(True)
    loss = warmup.completion_loss(logits, b["labels"])
    loss.backward()
    g = logits.grad.abs().sum(-1)  # [B, L]: row t predicts token t+1
    for i, e in enumerate(ex):
        P, C = len(e.prompt), len(e.completion)
        assert (g[i, :P - 1] == 0).all() and (g[i, P + C - 1:] == 0).all()  # prompt and padding: no gradient
        assert (g[i, P - 1:P + C - 1] > 0).all()  # every completion token (EOS included) does
    # the value is the token mean over completion tokens, computed independently
    lp = torch.log_softmax(out.logits.detach().float(), -1)
    terms = [-lp[i, t - 1, b["input_ids"][i, t]] for i, e in enumerate(ex)
             for t in range(len(e.prompt), len(e.prompt) + len(e.completion))]
    assert loss.item() == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_loss_falls_on_a_fixed_batch(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    b = warmup.build_batch(warmup.make_examples(make_problems([TASK], 4, seed=2), tok), tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = warmup.batch_loss(model, b)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_held_out_questions_are_not_trained_on(tiny_dir):
    _, tok = load_model(str(tiny_dir))
    held = make_problems([TASK], 8, seed=0)
    train = make_problems([TASK], 200, seed=1)
    ex = warmup.make_examples(train, tok, exclude=held)
    held_prompts = {tuple(warmup.make_examples([p], tok)[0].prompt) for p in held}
    overlap = sum(p.question in {h.question for h in held} for p in train)
    assert overlap > 0 and len(ex) == len(train) - overlap  # the test would be vacuous without an overlap
    assert not held_prompts & {tuple(e.prompt) for e in ex}


# --- the command ---------------------------------------------------------------------------------------------------
def _args(model, out, *extra):
    return ["warmup", "--model", str(model), "-o", str(out), "--task", TASK, "--steps", "2", "--batch", "4",
            "--train-problems", "20", "--eval-pool", "2", "--eval-group", "2", "--max-new-tokens", "4",
            "--device", "cpu", "-q", *extra]


def test_cli_writes_an_hf_dir_that_train_heads_accepts(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.commands.train import train

    out = tmp_path / "warm"
    train.main(_args(tiny_dir, out, "--lora-rank", "0"), standalone_mode=False)  # every weight
    assert sorted(x.name for x in tmp_path.iterdir()) == ["warm"]  # no temp directory left behind
    m = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert m.config.num_hidden_layers == 2 and tok("1 + 2")["input_ids"] == AutoTokenizer.from_pretrained(
        tiny_dir)("1 + 2")["input_ids"]
    base, new = _weights(tiny_dir), _weights(out)
    assert set(base) == set(new) and not torch.equal(base["model.embed_tokens.weight"], new["model.embed_tokens.weight"])
    log = [json.loads(x) for x in (out / warmup.LOG_NAME).read_text().splitlines()]
    assert [r.get("eval", r.get("step")) for r in log] == ["before", 1, 2, "after"]
    assert all(r["loss"] > 0 and r["tokens"] > 0 for r in log if "step" in r)
    info = (out / "kvtool_warmup.json").read_text()
    assert str(tmp_path) not in info and json.loads(info)["config"]["model"] == "tiny"
    # the output is a model `kvtool train heads` takes
    heads = tmp_path / "heads.json"
    train.main(["heads", "--model", str(out), "--task", TASK, "--no-filter", "--steps", "1", "--batch", "2",
                "--group", "2", "--max-new-tokens", "4", "--sink", "2", "--window", "4", "--device", "cpu",
                "--out-dir", str(tmp_path / "run"), "-o", str(heads), "-q"], standalone_mode=False)
    assert HeadsMask.load(heads).n_layer == 2
    # --force replaces it in place
    train.main(_args(tiny_dir, out, "--force", "--seed", "2", "--lora-rank", "0"), standalone_mode=False)
    assert any(not torch.equal(new[k], v) for k, v in _weights(out).items())


def test_lora_output_is_merged(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from toolchain.commands.train import train

    pytest.importorskip("peft")
    out = tmp_path / "lora"
    train.main(_args(tiny_dir, out, "--lr", "1e-2", "--eval-pool", "0"), standalone_mode=False)  # LoRA is the default
    base, new = _weights(tiny_dir), _weights(out)
    assert set(base) == set(new)  # no adapter tensors: merged into the plain weights
    assert any(not torch.equal(base[k], new[k]) for k in base if "proj" in k)
    assert torch.equal(base["model.embed_tokens.weight"], new["model.embed_tokens.weight"])  # not a LoRA target
    assert json.loads((out / "kvtool_warmup.json").read_text())["config"]["lora_rank"] == 16
    assert warmup.WarmupConfig(model="m", output="o").lr == 1e-3
    assert warmup.WarmupConfig(model="m", output="o", lora_rank=0).lr == 1e-4
    AutoModelForCausalLM.from_pretrained(out)


def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path):
    from toolchain.commands.train import train

    out = tmp_path / "x"
    cases = [(["--steps", "0"], "--steps must be >= 1"), (["--lr", "nan"], "--lr must be"),
             (["--lora-rank", "-1"], "--lora-rank must be >= 0")]
    for extra, msg in cases:
        with pytest.raises(KvtoolError, match=msg):
            train.main(_args(tiny_dir, out, *extra), standalone_mode=False)
    with pytest.raises(KvtoolError, match="no training traces"):
        train.main(["warmup", "--model", str(tiny_dir), "-o", str(out), "--task", "simple_equations", "-q"],
                   standalone_mode=False)
    with pytest.raises(KvtoolError, match="input model's directory"):
        train.main(_args(tiny_dir, tiny_dir, "--force"), standalone_mode=False)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(KvtoolError, match="already exists: pass --force"):
        train.main(_args(tiny_dir, out), standalone_mode=False)
    with pytest.raises(KvtoolError, match="does not exist"):
        train.main(_args(tiny_dir, tmp_path / "no" / "such"), standalone_mode=False)
    # through the real entry point: one line on stderr, exit 2, no traceback
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "train", *_args(tiny_dir, out)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"kvtool: error: -o {out} already exists: pass --force to replace it"]
