"""RLKV gate training (``kvtool train heads``): which KV heads does reasoning need in full?

Method (RLKV, arXiv 2510.08525). Every KV head (l, h) gets a gate α ∈ [0, 1], initialised to 1, that mixes its full
attention with a sink + window ("stream") attention: ``out = α·full + (1 − α)·stream`` (``toolchain.train.attention``, the
same semantics the runtime implements). All model weights are frozen; only the L×H gates train, with

* **GRPO without KL**: G completions per prompt sampled from the *gated* model, raw 0/1 rewards from the task's
  verifier, group-normalised advantages ``(r − mean_g) / (std_g + 1e-4)``, PPO-clip ratio objective (ε = 0.2) with
  the old log-probs of the sampling pass, averaged over all completion tokens of the batch;
* **adaptive L1**: ``loss += β′·mean|α|`` with ``β′ = 1(r̄ > τ)·β·(exp(r̄) − 1)``, r̄ the batch mean raw reward: the
  gates are pushed towards streaming only while the gated model still solves the problems;
* **self-distillation sampling**: before training, the ungated model (gates = 1, i.e. full attention) samples G
  completions of every problem of a pool, and only problems it solves at least once are kept (cached as JSONL);
* Adam (lr 1e-2), gradient clip 1.0, gates clamped to [0, 1] after every step.

The final α are the head scores; ``heads.json`` is derived from them with the one mask rule of ``toolchain.heads``.
``method="duo"`` is the DuoAttention-style baseline: the same gates, trained to make the gated model's final hidden
states match the full model's (MSE on the answer span of locally generated passkey sequences) + L1 on the gates.

Why a loop of our own and not TRL's ``GRPOTrainer``. TRL would give us sampling, advantages and the clipped
objective, but everything that makes RLKV RLKV sits outside its extension points: (1) the trainable "model" is one
[L, H] tensor hung on a frozen network; TRL's Trainer machinery (PEFT/ref-model handling, saving the whole model at
every checkpoint, weight syncing to vLLM) is built around training model weights and would checkpoint gigabytes to
save a few hundred floats; (2) the L1 weight β′ depends on the *batch's raw reward*, which TRL computes inside its
generation step and does not hand to ``compute_loss``: we would override both private methods whose signatures
change between TRL releases; (3) gates must be clamped after every optimiser step and the self-distillation filter
runs before training with the ungated model; (4) TRL adds accelerate/datasets and its own version churn to an extra
whose only hard needs are torch and transformers. The GRPO part is about 60 lines here (:func:`rollout`,
:func:`group_advantages`, :func:`clipped_objective`, :func:`rlkv_step`), each unit-tested, and checkpoints hold
exactly gates + optimiser + RNG + step, so ``--resume`` continues bit-for-bit.

Multi-process (``torchrun``/``accelerate launch``): when ``WORLD_SIZE > 1`` each rank samples its share of every
batch, rewards/token counts are all-reduced so the loss is the same global token mean, and the gate gradient is
all-reduced before the (identical) optimiser step on every rank; rank 0 writes files. Gates are one small tensor, so a
manual all-reduce replaces DDP's wrapper (which would also get in the way of ``generate``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..console import echo_stderr
from ..errors import KvtoolError
from ..heads import DEFAULT_SINK, DEFAULT_WINDOW, HeadsMask, check_sink, check_sparsity, check_window, write_atomic
from ..tasks import Problem, encode_prompt, make_problems, score
from .attention import clamp_gates_, freeze_all_but_gates, get_kvtool, load_with_kvtool
from .common import (
    all_reduce_,
    batch_indices,
    checkpoint_path,
    clipped_objective,
    config_mismatch,
    dist_rank_world,
    eos_ids,
    group_advantages,
    init_dist,
    left_pad,
    load_model,
    load_state,
    open_out_dir,
    positions,
    resolve_device,
    resolve_dtype,
    rewrite_log,
    rng_state,
    row_slices,
    save_state_atomic,
    seed_all,
    set_rng_state,
)

RewardFn = Callable[[Problem, str], float]
METHOD_NAMES = {"rlkv": "kvtool-rlkv", "duo": "duo"}
DEFAULT_L1 = {"rlkv": 1e-3, "duo": 0.05}  # RLKV paper's β; DuoAttention's λ
# Fields that may change between a run and its --resume; every other field must match the checkpoint.
RESUMABLE_CHANGES = {"steps", "save_every", "output", "out_dir", "device", "micro_batch", "sparsity", "resume",
                     "tensorboard"}


@dataclass
class TrainConfig:
    model: str
    tasks: tuple = ("chain_sum",)
    method: str = "rlkv"  # rlkv | duo
    steps: int = 100
    batch: int = 8  # prompts (rlkv) or passkey sequences (duo) per step
    group: int = 4  # G completions per prompt
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    l1: Optional[float] = None  # β (rlkv, default 1e-3) or λ (duo, default 0.05)
    tau: float = 0.5
    lr: float = 1e-2
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    ppo_epochs: int = 1  # optimiser updates per sampled batch (1: ratio == 1, the RLKV setting)
    max_new_tokens: int = 256
    temperature: float = 1.0
    pool: int = 256  # problems sampled for the self-distillation filter
    filter: bool = True  # self-distillation filter on/off
    seq_len: int = 0  # duo passkey length (0: 4·(sink + window), at least 128)
    micro_batch: int = 0  # rows per backward pass (0: all)
    device: str = "auto"
    dtype: str = "auto"  # auto | bf16 | f32
    attn_backend: str = "auto"  # auto | reference | sdpa
    sparsity: float = 0.5
    out_dir: str = "runs/kvtool-heads"
    output: Optional[str] = None  # heads.json path (default out_dir/heads.json)
    save_every: int = 50
    seed: int = 0
    resume: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.method not in METHOD_NAMES:
            raise KvtoolError(f"--method must be rlkv or duo, got {self.method!r}")
        if self.l1 is None:
            self.l1 = DEFAULT_L1[self.method]
        for name in ("steps", "batch", "save_every", "max_new_tokens", "ppo_epochs"):
            if int(getattr(self, name)) < 1:
                raise KvtoolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.method == "rlkv" and self.group < 2:
            raise KvtoolError(f"--group must be >= 2 (group-normalised advantages), got {self.group}")
        if self.pool < 1 or self.micro_batch < 0 or self.seq_len < 0 or self.seed < 0:
            raise KvtoolError("--pool must be >= 1; --micro-batch, --seq-len and --seed >= 0")
        for name in ("l1", "lr", "grad_clip", "clip_eps", "temperature"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0 or (name in ("lr", "temperature", "grad_clip") and v == 0):
                raise KvtoolError(f"--{name.replace('_', '-')} must be a finite number > 0 (l1, clip: >= 0), got {v}")
        check_sink(self.sink), check_window(self.window), check_sparsity(self.sparsity)
        if self.dtype not in ("auto", "bf16", "f32"):
            raise KvtoolError(f"--dtype must be auto, bf16 or f32, got {self.dtype!r}")
        if self.attn_backend not in ("auto", "reference", "sdpa"):
            raise KvtoolError(f"attention backend must be auto, reference or sdpa, got {self.attn_backend!r}")

    @property
    def duo_seq_len(self) -> int:
        return self.seq_len or max(128, 4 * (self.sink + self.window))


# ---------------------------------------------------------------------------------------------------------------
# The pieces of the objective (pure functions, unit-tested)
# ---------------------------------------------------------------------------------------------------------------
def adaptive_beta(mean_reward: float, beta: float, tau: float) -> float:
    """β′ = 1(r̄ > τ)·β·(exp(r̄) − 1)."""
    r = float(mean_reward)
    return beta * (math.exp(r) - 1.0) if r > tau else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Process group (torchrun / accelerate launch) -- a no-op in a single process
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_gates(model) -> Iterator[None]:
    """Temporarily set every gate to 1 (= full attention, the ungated model); restores the trained values."""
    gates = get_kvtool(model).gates
    saved = gates.detach().clone()
    with torch.no_grad():
        gates.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            gates.copy_(saved)


# ---------------------------------------------------------------------------------------------------------------
# Sampling and log-probs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    ids: torch.Tensor  # [N, P + T] left-padded prompt + completion
    attn: torch.Tensor  # [N, P + T] 1 = real token (completion up to and including EOS)
    n_prompt: int  # P
    comp_mask: torch.Tensor  # [N, T] bool
    rewards: torch.Tensor  # [N] float
    texts: list = field(default_factory=list)
    old_logp: Optional[torch.Tensor] = None  # [N, T], only with ppo_epochs > 1


@torch.no_grad()
def rollout(model, tok, problems: Sequence[Problem], group: int, max_new_tokens: int, temperature: float,
            reward_fn: RewardFn = score) -> Rollout:
    """``group`` samples per problem from the model as it is (gated or not), rows grouped by problem, with rewards."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompts = [encode_prompt(p, tok) for p in problems]
    ids, attn = left_pad(prompts, tok.pad_token_id)
    ids, attn = ids.repeat_interleave(group, 0).to(device), attn.repeat_interleave(group, 0).to(device)
    eos = eos_ids(model, tok)
    # Plain ancestral sampling at `temperature` (no top-k/top-p), so the loss's log-probs are the sampling policy's.
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                          pad_token_id=int(tok.pad_token_id), eos_token_id=eos)
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)
    P = ids.shape[1]
    comp = out[:, P:]
    is_eos = torch.isin(comp, torch.tensor(eos, device=comp.device))
    comp_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    texts = [tok.decode(comp[i][comp_mask[i]].tolist(), skip_special_tokens=True) for i in range(comp.shape[0])]
    rewards = torch.tensor([float(reward_fn(problems[i // group], t)) for i, t in enumerate(texts)])
    return Rollout(out, torch.cat([attn, comp_mask.long()], 1), P, comp_mask, rewards, texts)


def completion_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, n_prompt: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """log p(token) of every completion token under the model's temperature-scaled distribution, [N, T] float32."""
    T = ids.shape[1] - n_prompt
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False,
                logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, n_prompt:].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------------


def rlkv_step(model, tok, opt: torch.optim.Optimizer, problems: Sequence[Problem], cfg: TrainConfig,
              reward_fn: RewardFn = score) -> dict:
    """Sample from the gated model, one (or ppo_epochs) clipped-GRPO update(s) of the gates + adaptive L1."""
    gates = get_kvtool(model).gates
    t0 = time.perf_counter()
    ro = rollout(model, tok, problems, cfg.group, cfg.max_new_tokens, cfg.temperature, reward_fn)
    dev = gates.device
    adv = group_advantages(ro.rewards, cfg.group).to(dev)
    mask = ro.comp_mask.float()
    stats_t = torch.tensor([ro.rewards.sum().item(), ro.rewards.numel(), mask.sum().item()], dtype=torch.float64,
                           device=dev)
    r_sum, n_rows, n_tok = all_reduce_(stats_t).tolist()
    r_mean = r_sum / n_rows
    beta_p = adaptive_beta(r_mean, cfg.l1, cfg.tau)
    rows = row_slices(ro.ids.shape[0], cfg.micro_batch)
    if cfg.ppo_epochs > 1:  # the sampling pass's policy, frozen for all epochs
        with torch.no_grad():
            ro.old_logp = torch.cat([completion_logprobs(model, ro.ids[s], ro.attn[s], ro.n_prompt, cfg.temperature)
                                     for s in rows])
    pg_loss = l1_val = 0.0
    grad_norm = 0.0
    any_signal = bool(all_reduce_(torch.tensor([float(adv.abs().sum() > 0)], device=dev)).item() > 0)
    for _ in range(cfg.ppo_epochs):
        opt.zero_grad(set_to_none=False)
        pg_loss = 0.0
        if any_signal:  # with all advantages 0 the policy term and its gradient are exactly 0: skip the forwards
            for s in rows:
                logp = completion_logprobs(model, ro.ids[s], ro.attn[s], ro.n_prompt, cfg.temperature)
                old = ro.old_logp[s] if ro.old_logp is not None else logp.detach()
                loss = clipped_objective(logp, old, adv[s], mask[s].to(dev), cfg.clip_eps) / max(n_tok, 1.0)
                loss.backward()
                pg_loss += loss.item()
        if gates.grad is None:
            gates.grad = torch.zeros_like(gates)
        all_reduce_(gates.grad)
        pg_loss = float(all_reduce_(torch.tensor([pg_loss], dtype=torch.float64, device=dev)).item())
        l1 = beta_p * gates.abs().mean()
        if beta_p > 0:
            l1.backward()
        l1_val = float(l1.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_([gates], cfg.grad_clip))
        opt.step()
        clamp_gates_(model)
    dt = time.perf_counter() - t0
    return {"reward": r_mean, "mean_alpha": float(gates.detach().mean()), "beta_prime": beta_p,
            "loss": pg_loss + l1_val, "pg_loss": pg_loss, "l1": l1_val, "grad_norm": grad_norm,
            "tokens": int(n_tok), "tok_s": n_tok / dt if dt > 0 else 0.0, "time_s": dt}


# --- DuoAttention-style baseline -------------------------------------------------------------------------------
def passkey_batch(tok, batch: int, seq_len: int, vocab_size: int, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic passkey retrieval: random filler tokens with a needle (``The pass key is 12345 ...``) early in the
    sequence and the question + answer at the end. Returns ids [B, seq_len] and the answer-span mask [B, seq_len]."""
    special = set(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(min(len(tok), vocab_size)) if i not in special], dtype=torch.long)
    prefix = list(tok("", add_special_tokens=True)["input_ids"])
    rows, masks = [], []
    for _ in range(batch):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (5,), generator=gen))
        needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False)["input_ids"]
        question = tok(f" What is the pass key? The pass key is {key}.", add_special_tokens=False)["input_ids"]
        n_fill = seq_len - len(prefix) - len(needle) - len(question)
        if n_fill < 1:
            raise KvtoolError(f"--seq-len {seq_len} is too short for a passkey sequence with this tokenizer")
        filler = allowed[torch.randint(0, len(allowed), (n_fill,), generator=gen)].tolist()
        depth = int(torch.randint(0, max(1, n_fill // 2), (1,), generator=gen))
        ids = prefix + filler[:depth] + list(needle) + filler[depth:] + list(question)
        rows.append(ids)
        masks.append([False] * (seq_len - len(question)) + [True] * len(question))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state.float()


def duo_loss(model, ids: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """MSE between the gated and the full model's final hidden states over the answer span (no L1)."""
    with torch.no_grad(), full_gates(model):
        ref = _final_hidden(model, ids)
    h = _final_hidden(model, ids)
    m = tail.to(h.device).unsqueeze(-1).float()
    return ((h - ref) ** 2 * m).sum() / (m.sum() * h.shape[-1])


def duo_step(model, opt: torch.optim.Optimizer, ids: torch.Tensor, tail: torch.Tensor, cfg: TrainConfig) -> dict:
    gates = get_kvtool(model).gates
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    mse = duo_loss(model, ids.to(gates.device), tail)
    mse.backward()
    if gates.grad is None:
        gates.grad = torch.zeros_like(gates)
    n_proc = float(all_reduce_(torch.tensor([1.0], device=gates.device)).item())
    all_reduce_(gates.grad).div_(n_proc)
    l1 = cfg.l1 * gates.abs().mean()
    l1.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_([gates], cfg.grad_clip))
    opt.step()
    clamp_gates_(model)
    dt = time.perf_counter() - t0
    n_tok = ids.numel() * n_proc
    mse_v, l1_v = float(mse.detach()), float(l1.detach())
    return {"reward": None, "mse": mse_v, "mean_alpha": float(gates.detach().mean()), "beta_prime": cfg.l1,
            "loss": mse_v + l1_v, "l1": l1_v, "grad_norm": grad_norm, "tokens": int(n_tok),
            "tok_s": n_tok / dt if dt > 0 else 0.0, "time_s": dt}


# ---------------------------------------------------------------------------------------------------------------
# Self-distillation filter
# ---------------------------------------------------------------------------------------------------------------
def _model_key(path: str) -> str:
    p = Path(path).resolve()
    stamp = [str(p)]
    for f in ([p] if p.is_file() else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + [p / "config.json"]):
        if f.exists():
            st = f.stat()
            stamp.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(stamp)


def distill_cache_path(cfg: TrainConfig) -> Path:
    key = json.dumps({"model": _model_key(cfg.model), "tasks": list(cfg.tasks), "seed": cfg.seed, "n": cfg.pool,
                      "group": cfg.group, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature},
                     sort_keys=True)
    return Path(cfg.out_dir) / "selfdistill" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def self_distill_filter(pool: Sequence[Problem], n_correct: Sequence[int]) -> list[Problem]:
    """Keep the problems solved at least once."""
    return [p for p, k in zip(pool, n_correct) if k >= 1]


def _load_distill_cache(path: Path, pool: Sequence[Problem]) -> Optional[list[Problem]]:
    try:
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    by_key = {(p.task, p.index): p for p in pool}
    kept = []
    for rec in lines[1:]:  # line 0 is the header
        p = by_key.get((rec.get("task"), rec.get("index")))
        if p is None or p.question != rec.get("question"):  # reasoning-gym changed: recompute
            return None
        kept.append(p)
    return kept


def self_distill(model, tok, pool: Sequence[Problem], cfg: TrainConfig, reward_fn: RewardFn = score,
                 cache: Optional[Path] = None, progress: bool = False) -> list[Problem]:
    """Problems of ``pool`` that the ungated model solves at least once in ``cfg.group`` samples (cached as JSONL)."""
    rank, world = dist_rank_world()
    if cache is not None and cache.exists():
        kept = _load_distill_cache(cache, pool)
        if kept is not None:
            return kept
    from tqdm.auto import tqdm

    mine = list(range(rank, len(pool), world))
    counts: dict[int, int] = {}
    bar = tqdm(total=len(mine), desc="self-distillation", unit="problem", disable=not progress or rank != 0)
    with full_gates(model):
        for j in range(0, len(mine), cfg.batch):
            idx = mine[j:j + cfg.batch]
            ro = rollout(model, tok, [pool[i] for i in idx], cfg.group, cfg.max_new_tokens, cfg.temperature,
                         reward_fn)
            for k, i in enumerate(idx):
                counts[i] = int((ro.rewards[k * cfg.group:(k + 1) * cfg.group] >= 1.0).sum().item())
            bar.update(len(idx))
    bar.close()
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, counts)
        counts = {k: v for part in parts for k, v in part.items()}
    n_correct = [counts[i] for i in range(len(pool))]
    kept = self_distill_filter(pool, n_correct)
    if cache is not None and rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        head = {"kind": "kvtool.selfdistill/1", "model": str(cfg.model), "tasks": list(cfg.tasks), "seed": cfg.seed,
                "n": cfg.pool, "group": cfg.group, "kept": len(kept)}
        lines = [json.dumps(head)] + [json.dumps({"task": p.task, "index": p.index, "question": p.question,
                                                   "answer": p.answer, "n_correct": k})
                                      for p, k in zip(pool, n_correct) if k >= 1]
        write_atomic(cache, ("\n".join(lines) + "\n").encode("utf-8"))
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, step: int, gates: torch.Tensor, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    rng: Optional[list] = None) -> Path:
    """Gates, optimiser, RNG states (one per rank), step and config; written to a temp file and renamed."""
    state = {"format": "kvtool.rlkv-ckpt/1", "step": int(step), "gates": gates.detach().float().cpu().clone(),
             "optimizer": opt.state_dict(), "rng": rng if rng is not None else [rng_state()],
             "config": dataclasses.asdict(cfg)}
    return save_state_atomic(state, path)


def load_checkpoint(path: Path) -> dict:
    return load_state(path, "kvtool.rlkv-ckpt/1", "RLKV")


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def export_heads(gates: Any, cfg: TrainConfig, model_info: Optional[dict] = None,
                 extra: Optional[dict] = None) -> HeadsMask:
    """heads.json from the final gates: scores = α, mask by the one rule at ``cfg.sparsity``."""
    scores = np.asarray(gates.detach().float().cpu() if isinstance(gates, torch.Tensor) else gates, dtype=np.float64)
    mask = HeadsMask.from_scores(scores.tolist(), cfg.sparsity, METHOD_NAMES[cfg.method], sink=cfg.sink,
                                 window=cfg.window, model=model_info)
    mask.extra = extra
    return mask.validate()


def _model_info(model, path: str) -> dict:
    info = {"name": Path(path).resolve().name}
    mt = getattr(model.config, "model_type", None)
    if isinstance(mt, str):
        info["arch"] = mt
    return info


@dataclass
class TrainResult:
    mask: HeadsMask
    heads_path: Path
    plot_path: Optional[Path]
    log_path: Path
    gates: torch.Tensor
    steps_done: int
    kept: Optional[int] = None  # problems kept by self-distillation


def train(cfg: TrainConfig, reward_fn: RewardFn = score, progress: bool = True,
          echo: Callable[[str], None] = echo_stderr, model_and_tok=None) -> TrainResult:
    """Run ``kvtool train heads``. ``reward_fn``/``model_and_tok`` let tests inject a verifier or a loaded model."""
    device = resolve_device(cfg.device)
    init_dist(device)
    rank, world = dist_rank_world()
    if cfg.method == "rlkv" and cfg.batch % world:
        raise KvtoolError(f"--batch {cfg.batch} must be a multiple of the number of processes ({world})")
    out_dir, log_path, ckpt = open_out_dir(cfg.out_dir, cfg.resume)

    SummaryWriter = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KvtoolError("--tensorboard needs tensorboard: pip install tensorboard") from None

    seed_all(cfg.seed + rank)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = model_and_tok if model_and_tok is not None else load_model(cfg.model, device, dtype)
    backend = cfg.attn_backend if cfg.attn_backend != "auto" else ("sdpa" if device.startswith("cuda") else "reference")
    load_with_kvtool(model, cfg.window, cfg.sink, gates=True, backend=backend)
    [gates] = freeze_all_but_gates(model)
    opt = torch.optim.Adam([gates], lr=cfg.lr)

    problems, kept_n = None, None
    if cfg.method == "rlkv":
        pool = make_problems(cfg.tasks, cfg.pool, cfg.seed)
        if cfg.filter:
            cache = distill_cache_path(cfg)
            if rank == 0:
                echo(f"self-distillation: {len(pool)} problems x {cfg.group} samples with the ungated model"
                     + (" (cached)" if cache.exists() else ""))
            problems = self_distill(model, tok, pool, cfg, reward_fn, cache, progress)
            if world > 1:
                torch.distributed.barrier()
            kept_n = len(problems)
            if rank == 0:
                echo(f"self-distillation kept {kept_n} of {len(pool)} problems ({cache})")
            if not problems:
                raise KvtoolError(f"the ungated model solved none of {len(pool)} problems: RL gets no reward signal. "
                                  "Use an easier --task, a larger --max-new-tokens or a stronger model")
        else:
            problems = pool

    start = 0
    if cfg.resume and ckpt is not None:
        st = load_checkpoint(ckpt)
        bad = config_mismatch(st["config"], cfg, RESUMABLE_CHANGES)
        if bad:
            raise KvtoolError(f"--resume with settings that differ from {ckpt.name}: " + "; ".join(bad))
        if len(st["rng"]) != world:
            raise KvtoolError(f"{ckpt.name} was written by {len(st['rng'])} process(es), this run has {world}")
        with torch.no_grad():
            gates.copy_(st["gates"].to(gates.device))
        opt.load_state_dict(st["optimizer"])
        start = int(st["step"])
        set_rng_state(st["rng"][rank])
        if rank == 0:
            rewrite_log(log_path, start)
            echo(f"resuming from {ckpt} (step {start})")
    else:
        if cfg.resume and rank == 0:
            echo(f"--resume: no checkpoint under {out_dir / 'ckpt'}, starting from step 0")
        # Training randomness starts from a fixed state whether or not self-distillation came from its cache.
        seed_all(cfg.seed + 1_000_003 * (rank + 1))
        if rank == 0 and log_path.exists():
            log_path.unlink()

    writer = SummaryWriter(str(out_dir / "tb")) if SummaryWriter is not None and rank == 0 else None

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=f"train heads ({cfg.method})", unit="step",
               disable=not progress or rank != 0)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            if cfg.method == "rlkv":
                idx = batch_indices(step, cfg.batch, len(problems), cfg.seed)[rank::world]
                stats = rlkv_step(model, tok, opt, [problems[i] for i in idx], cfg, reward_fn)
            else:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
                ids, tail = passkey_batch(tok, cfg.batch, cfg.duo_seq_len, vocab, gen)
                stats = duo_step(model, opt, ids, tail, cfg)
            stats = {"step": step, **stats}
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(stats) + "\n")
                if writer is not None:
                    for k, v in stats.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, step)
            post = {"α": f"{stats['mean_alpha']:.3f}", "β′": f"{stats['beta_prime']:.2g}",
                    "tok/s": f"{stats['tok_s']:.0f}"}
            if stats.get("reward") is not None:
                post = {"reward": f"{stats['reward']:.2f}", **post}
            else:
                post = {"mse": f"{stats['mse']:.3g}", **post}
            bar.set_postfix(post)
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                rngs = [rng_state()]
                if world > 1:
                    rngs = [None] * world
                    torch.distributed.all_gather_object(rngs, rng_state())
                if rank == 0:
                    save_checkpoint(checkpoint_path(out_dir, step), step, gates, opt, cfg, rngs)
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    extra = {"steps": max(step, start), "seed": cfg.seed, "l1": cfg.l1, "lr": cfg.lr}
    if cfg.method == "rlkv":
        extra.update(tasks=list(cfg.tasks), group=cfg.group, tau=cfg.tau, kept=kept_n)
    else:
        extra.update(seq_len=cfg.duo_seq_len)
    mask = export_heads(gates, cfg, _model_info(model, cfg.model), extra)
    from ..swa_mask import restrict_to_global, swa_layers_of_config

    mask, note = restrict_to_global(mask, swa_layers_of_config(model.config))  # SWA hybrids: global heads only
    if note and rank == 0:
        echo(f"kvtool: {note}")
    heads_path = Path(cfg.output) if cfg.output else out_dir / "heads.json"
    plot_path = None
    if rank == 0:
        mask.save(heads_path)
        np.savetxt(out_dir / "gates.tsv", gates.detach().float().cpu().numpy(), fmt="%.6f", delimiter="\t")
        try:
            from ..heads import plot_mask

            plot_path = plot_mask(mask, out_dir / "gates.png")
        except KvtoolError as e:  # matplotlib missing: the mask is still useful
            echo(f"no heatmap: {e}")
        echo(f"wrote {heads_path}: {mask.n_compressed()} of {mask.n_layer * mask.n_head_kv} heads compressed "
             f"(mean α {float(gates.detach().mean()):.3f})")
    return TrainResult(mask, heads_path, plot_path, log_path, gates.detach().cpu().clone(), max(step, start), kept_n)
