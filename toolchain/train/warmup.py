"""Supervised warm-up (``kvtool train warmup``): teach a small model the ``<answer>`` format before RLKV.

Why: RLKV's rewards come from problems the *ungated* model already solves (the self-distillation filter of
``kvtool train heads``). SmolLM2-135M-Instruct solves none of reasoning-gym's ``chain_sum`` in the ``<answer>``
format, so the filter keeps nothing and RL gets no signal. A short fine-tune on worked solutions
(:mod:`toolchain.tasks.traces`: the dataset's ``answer_cot`` where it has one, else a generated running sum) in
exactly the prompt (:func:`toolchain.tasks.encode_prompt`, chat template included) and answer format that
:func:`toolchain.tasks.score` rewards fixes that.

* Loss: token-mean cross-entropy on the completion tokens only (the trace and the closing EOS, which is what ends a
  sampled completion); prompt and padding positions carry label -100.
* Held-out problems: the pool ``kvtool train heads --pool N --seed S`` will draw (``eval_pool``, ``eval_seed``) is
  removed from the training problems by question text, and the ungated model's solve rate on it is measured before
  and after with the self-distillation filter's own sampler (:func:`toolchain.train.rlkv.rollout`, plain ancestral
  sampling at the same temperature and length cap, G samples per problem). "kept" is exactly what the filter would
  keep: problems solved at least once.
* Trainable: LoRA adapters (default rank 16, peft, ``all-linear``) merged into the weights at the end, or every weight
  (``lora_rank=0``). On SmolLM2-135M on 2 CPU cores LoRA's step took a median 4.7 s against 6.4 s, and 20 steps left
  12 of 16 held-out problems kept against 10 (docs/training.md). Either way the output is a plain HF directory
  that ``kvtool train heads --model`` and ``kvtool convert`` read, written to a temp directory beside the target and
  renamed into place.

Why a loop of our own and not TRL's ``SFTTrainer``. The whole recipe is: tokenise prompt and completion separately
(the prompt ids must be the ones ``rollout`` feeds, so ``apply_chat_template`` + completion re-tokenised jointly would
train on a token boundary the sampler never produces), mask the prompt, a few dozen AdamW steps, save. Its core is
about 40 lines here (:func:`build_batch`, :func:`completion_loss` and the step loop of :func:`train`), each tested. ``SFTTrainer`` would need
our prompts and completions converted to a ``datasets.Dataset`` in its prompt/completion schema and its own chat
formatting disabled, and it pulls trl, datasets and accelerate (with pyarrow) into an extra whose hard needs are torch
and transformers; its checkpointing and logging are built for long GPU runs, not a 2-minute CPU warm-up. trl is
therefore not added.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..console import echo_stderr
from ..errors import KvtoolError
from ..tasks import Problem, encode_prompt, make_problems
from ..tasks.traces import cot_trace
from .common import batch_indices, eos_ids, load_model, resolve_device, resolve_dtype, seed_all

DEFAULT_TASK = "chain_sum:min_terms=2,max_terms=3,max_digits=1"
LOG_NAME = "kvtool_warmup.jsonl"  # inside the output directory: one line per step, plus the two evals


@dataclass
class WarmupConfig:
    model: str
    output: str
    tasks: tuple = (DEFAULT_TASK,)
    steps: int = 20
    batch: int = 8
    lr: Optional[float] = None  # None: 1e-3 with LoRA, 1e-4 for a full fine-tune (the measured SmolLM2 settings)
    lora_rank: int = 16  # 0: every weight. LoRA measured faster on CPU with no worse solve rate (docs/training.md)
    train_problems: int = 2000  # problems generated for traces (before the held-out ones are removed)
    seed: int = 1  # of the training problems and of the batch order
    eval_pool: int = 32  # held-out problems (0: no evaluation)
    eval_seed: int = 0  # = `kvtool train heads --seed`, so the held-out pool is the one RLKV's filter draws
    eval_group: int = 4  # = `kvtool train heads --group`
    max_new_tokens: int = 64  # of the eval samples (= `kvtool train heads --max-new-tokens`)
    temperature: float = 1.0
    grad_clip: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False  # replace an existing output directory

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.lr is None:
            self.lr = 1e-3 if self.lora_rank else 1e-4
        for name in ("steps", "batch", "train_problems", "eval_group", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise KvtoolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_rank", "eval_pool", "seed", "eval_seed"):
            if int(getattr(self, name)) < 0:
                raise KvtoolError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature", "grad_clip"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise KvtoolError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if self.dtype not in ("auto", "bf16", "f32"):
            raise KvtoolError(f"--dtype must be auto, bf16 or f32, got {self.dtype!r}")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    prompt: list  # token ids, exactly what rollout() feeds
    completion: list  # trace ids + EOS


def make_examples(problems: Sequence[Problem], tok, exclude: Sequence[Problem] = ()) -> list[Example]:
    """Prompt/completion ids of every problem that has a trace and is not (by question) in ``exclude``."""
    if tok.eos_token_id is None:
        raise KvtoolError("the tokenizer has no EOS token: a completion could not end")
    held = {p.question for p in exclude}
    out = []
    for p in problems:
        if p.question in held:
            continue
        trace = cot_trace(p)
        if trace is None:
            continue
        prompt = encode_prompt(p, tok)
        chat = bool(getattr(tok, "chat_template", None)) and p.prompt is None
        text = trace if chat else " " + trace  # a plain prompt ends in "Solution:"
        out.append(Example(prompt, list(tok(text, add_special_tokens=False)["input_ids"]) + [int(tok.eos_token_id)]))
    return out


def build_batch(examples: Sequence[Example], pad_id: int) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (-100 on prompt and padding positions)."""
    L = max(len(e.prompt) + len(e.completion) for e in examples)
    ids = torch.full((len(examples), L), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        seq = list(e.prompt) + list(e.completion)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, :len(seq)] = 1
        labels[i, len(e.prompt):len(seq)] = torch.tensor(list(e.completion), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of position t's logits against token t+1, where that label is not -100."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def batch_loss(model, batch: dict) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), use_cache=False)
    return completion_loss(out.logits, batch["labels"].to(dev))


# ---------------------------------------------------------------------------------------------------------------
# The filter's view: how many held-out problems would self-distillation keep?
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def solve_rate(model, tok, problems: Sequence[Problem], group: int, max_new_tokens: int, temperature: float,
               seed: int = 0, chunk: int = 8) -> dict:
    """The ungated model's ``group`` samples per problem with RLKV's ``rollout``: problems solved at least once
    (``kept``, what the filter keeps), the per-sample solve rate and the share of samples with an answer tag."""
    from ..tasks import extract_answer
    from .rlkv import rollout

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    kept = solved = tagged = 0
    for j in range(0, len(problems), chunk):
        part = list(problems[j:j + chunk])
        ro = rollout(model, tok, part, group, max_new_tokens, temperature)
        r = ro.rewards.reshape(len(part), group)
        kept += int((r.max(1).values >= 1.0).sum())
        solved += int((r >= 1.0).sum())
        tagged += sum(extract_answer(t) is not None for t in ro.texts)
    model.train(was_training)
    n = len(problems) * group
    return {"problems": len(problems), "group": group, "kept": kept, "kept_rate": kept / max(len(problems), 1),
            "sample_solve_rate": solved / max(n, 1), "tag_rate": tagged / max(n, 1),
            "time_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def check_output(cfg: WarmupConfig) -> Path:
    out = Path(cfg.output).expanduser()
    src = Path(cfg.model).expanduser()
    if out.exists() and src.exists() and os.path.samefile(out, src if src.is_dir() else src.parent):
        raise KvtoolError(f"-o {cfg.output} is the input model's directory; give another output path")
    if out.exists() and not (cfg.force and out.is_dir()):
        raise KvtoolError(f"-o {cfg.output} already exists" + ("" if out.is_dir() else " and is not a directory")
                          + (": pass --force to replace it" if out.is_dir() else ""))
    if not out.parent.is_dir():
        raise KvtoolError(f"output directory {out.parent} does not exist")
    return out


def save_atomic(model, tok, out: Path, log_lines: Sequence[dict], info: dict) -> Path:
    """save_pretrained into a temp directory beside ``out``, then rename: a crash leaves no half checkpoint."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", suffix=".kvtool.tmpdir", dir=out.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / LOG_NAME).write_text("".join(json.dumps(x) + "\n" for x in log_lines), encoding="utf-8")
        (tmp / "kvtool_warmup.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # --force: move the old one aside first, so `out` is always either old or new
            old = out.parent / f".{out.name[:64]}.old.{os.getpid()}.kvtool.tmpdir"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class WarmupResult:
    output: Path
    log: list
    before: Optional[dict]
    after: Optional[dict]
    n_examples: int


def _add_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KvtoolError("--lora-rank needs peft: pip install peft (or train every weight: --lora-rank 0)") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def train(cfg: WarmupConfig, progress: bool = True, echo: Callable[[str], None] = echo_stderr) -> WarmupResult:
    out = check_output(cfg)
    device = resolve_device(cfg.device)
    held = make_problems(cfg.tasks, cfg.eval_pool, cfg.eval_seed) if cfg.eval_pool else []
    problems = make_problems(cfg.tasks, cfg.train_problems, cfg.seed)
    seed_all(cfg.seed)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    examples = make_examples(problems, tok, exclude=held)
    if not examples:
        raise KvtoolError(f"no training traces for {', '.join(cfg.tasks)}: these problems have no answer_cot and are "
                          "not +/- chains (try chain_sum, basic_arithmetic or gsm_symbolic), or all are held out")
    if int(tok.eos_token_id) not in eos_ids(model, tok):
        raise KvtoolError("the tokenizer's EOS is not one the model stops on")
    echo(f"warm-up: {len(examples)} traced problems of {len(problems)} ({len(held)} held out), "
         f"{cfg.steps} steps x {cfg.batch}")
    log: list = []
    before = after = None
    if held:
        before = solve_rate(model, tok, held, cfg.eval_group, cfg.max_new_tokens, cfg.temperature, cfg.eval_seed)
        log.append({"eval": "before", **before})
        echo(f"before: filter keeps {before['kept']}/{before['problems']}, sample solve rate "
             f"{before['sample_solve_rate']:.3f}, <answer> tag in {before['tag_rate']:.3f} ({before['time_s']} s)")
    net = _add_lora(model, cfg.lora_rank) if cfg.lora_rank else model
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    from tqdm.auto import tqdm

    net.train()
    bar = tqdm(total=cfg.steps, desc="warm-up", unit="step", disable=not progress)
    try:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = build_batch([examples[i] for i in batch_indices(step, cfg.batch, len(examples), cfg.seed)],
                                tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(net, batch)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            n_tok = int((batch["labels"] != -100).sum())
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": float(loss.detach()), "grad_norm": gn, "tokens": n_tok,
                   "seq_len": int(batch["input_ids"].shape[1]), "time_s": round(dt, 3)}
            log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", s_step=f"{dt:.1f}")
            bar.update(1)
    finally:
        bar.close()
    if cfg.lora_rank:
        model = net.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if held:
        after = solve_rate(model, tok, held, cfg.eval_group, cfg.max_new_tokens, cfg.temperature, cfg.eval_seed)
        log.append({"eval": "after", **after})
        echo(f"after: filter keeps {after['kept']}/{after['problems']}, sample solve rate "
             f"{after['sample_solve_rate']:.3f}, <answer> tag in {after['tag_rate']:.3f} ({after['time_s']} s)")
    settings = dataclasses.asdict(cfg)
    settings["model"] = Path(cfg.model).name  # no machine paths in the record
    settings["output"] = out.name
    info = {"format": "kvtool.warmup/1", "config": settings, "examples": len(examples), "before": before,
            "after": after}
    save_atomic(model, tok, out, log, info)
    echo(f"wrote {out}")
    return WarmupResult(out, log, before, after, len(examples))
