"""Beacon training (``kvtool train beacons``): Breadcrumbs Reasoning (arXiv 2510.13797), joint distillation + RL.

Every ``c`` generated tokens the model decodes a learned beacon token, and the ``c`` tokens before it leave the KV
cache (docs/architecture.md §5). A model has to learn to write what it will still need into the beacon's KV entries. Recipe:

* **beacon token**: a new special token ``<|beacon|>`` is added to the tokenizer, the input embedding and an untied
  ``lm_head`` (rows initialised to the mean of the existing rows). ``reuse_token=ID`` takes an existing id instead
  (nothing is resized). During training the beacon's input vector is a separate float32 parameter put in place by a
  forward hook on the embedding, so its optimiser state is one row, not the whole matrix; the export writes it back;
* **teacher** = the same model with no beacons and a full cache: the LoRA model with its adapter disabled, or, with
  ``full=True``, a frozen copy made before any change. It samples rollouts on the task, scored by the task verifier;
* **student** = the model with beacons. It sees each teacher rollout with a beacon after every ``c`` completion tokens
  under the beacon mask (``toolchain.train.attention.use_segments``). Loss: token-level KL(teacher ‖ student) on every
  completion token (``distill_on="correct"`` keeps only rollouts the verifier accepts), plus, when ``rl_weight > 0``,
  a GRPO term (group-normalised advantages, PPO-clip) on the student's *own* compressed-mode rollouts. That term is
  zero until the student earns reward with some variance inside a group, which is the paper's point: RL alone cannot
  start, so the teacher's outputs carry the learning until compression works;
* both distributions ban the beacon id (the runtime never samples it), so the KL is over the same support the runtime
  samples from;
* trainable: the beacon embedding plus LoRA adapters (peft, ``all-linear``) or every weight (``full=True``).

Student rollouts in compressed mode use an incremental loop with a transformers ``DynamicCache`` and manual eviction
(:func:`sample`): the beacon is fed right after the c-th chunk token, then the chunk's slots are cut out of every
layer's keys/values and out of the 2D attention mask. RoPE positions are passed explicitly, so they keep the holes
exactly like the runtime, and each slot's position is handed to the attention (``use_slot_positions``) so that
per-head windows (``mask``) count positions, not surviving slots, as llama.cpp does. Its logits match a full-sequence
forward with the beacon mask, with and without per-head windows (tested).

Outputs under ``out_dir``: ``ckpt/step_N.pt`` (trainable tensors + beacon row + optimiser + RNG + config, so
``resume=True`` continues bit for bit), ``log.jsonl`` and, at the end, the HF checkpoint (``out_dir/model`` or
``output``) with the beacon token in tokenizer and weights (LoRA merged) and ``kvtool.json``:
``{"format": "kvtool.beacons/1", "beacon": {"token": "<|beacon|>", "token_id": N, "interval": c, "reused": false}, ...}``.
``kvtool convert CKPT_DIR -o m.gguf`` turns that into ``kvtool.beacon.token_id`` / ``kvtool.beacon.interval``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from converters.beacon_checkpoint import KVTOOL_JSON

from ..console import echo_stderr
from ..errors import KvtoolError
from ..heads import write_atomic
from ..tasks import Problem, encode_prompt, make_problems, score
from .attention import (
    _model_dims,
    beacon_layout,
    find_kvtool,
    get_kvtool,
    load_with_kvtool,
    unload_kvtool,
    use_segments,
    use_slot_positions,
)
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

BEACON_TOKEN = "<|beacon|>"
DEFAULT_INTERVAL = 16
JSON_FORMAT = "kvtool.beacons/1"
CKPT_FORMAT = "kvtool.beacons-ckpt/1"
RewardFn = Callable[[Problem, str], float]
# Fields that may change between a run and its --resume; every other field must match the checkpoint. The RL term's
# settings are among them so that a run can distil first and add GRPO once the student earns reward (a later phase
# of the same run; the step counter and optimiser state carry on).
RESUMABLE_CHANGES = {"steps", "save_every", "output", "out_dir", "device", "micro_batch", "resume",
                     "rl_weight", "rl_group"}


@dataclass
class BeaconTrainConfig:
    model: str
    tasks: tuple = ("chain_sum",)
    interval: int = DEFAULT_INTERVAL
    # several intervals: each training sequence draws one (stateless in seed, step and row), and the exported
    # checkpoint lists them all, so one file serves any of them at load time (``interval`` becomes the smallest)
    intervals: tuple = ()
    steps: int = 100
    batch: int = 4  # problems per step
    group: int = 2  # teacher rollouts per problem
    max_new_tokens: int = 256
    temperature: float = 1.0
    lr: float = 1e-4
    beacon_lr: float = 1e-3  # the beacon embedding row
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (to 0 at ``steps``; a --resume with more steps stretches it)
    warmup: int = 0  # linear warm-up steps (both schedules)
    full: bool = False  # train every weight instead of LoRA adapters
    lora_r: int = 16
    lora_alpha: int = 32
    reuse_token: Optional[int] = None
    mask: Optional[str] = None  # heads.json: train under its per-head windows (the mixed cache the file will run with)
    distill_on: str = "all"  # all | correct
    rl_weight: float = 0.0  # GRPO term on the student's compressed rollouts (0: off)
    rl_group: int = 4
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    micro_batch: int = 0  # rows per backward pass (0: all)
    pool: int = 1024  # problems drawn from the task(s); steps walk through seeded permutations of them
    device: str = "auto"
    dtype: str = "auto"  # auto | bf16 | f32
    attn_backend: str = "auto"  # auto | reference | sdpa
    out_dir: str = "runs/kvtool-beacons"
    output: Optional[str] = None  # HF checkpoint dir (default out_dir/model)
    save_every: int = 50
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.intervals = tuple(sorted({int(c) for c in self.intervals}))
        if any(c < 1 for c in self.intervals):
            raise KvtoolError(f"--interval values must be >= 1, got {','.join(map(str, self.intervals))}")
        if len(self.intervals) == 1:
            self.interval, self.intervals = self.intervals[0], ()
        elif self.intervals:
            self.interval = self.intervals[0]
        for name in ("interval", "steps", "batch", "group", "max_new_tokens", "save_every", "lora_r", "lora_alpha"):
            if int(getattr(self, name)) < 1:
                raise KvtoolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rl_weight > 0 and self.rl_group < 2:
            raise KvtoolError(f"--rl-group must be >= 2 (group-normalised advantages), got {self.rl_group}")
        for name in ("lr", "beacon_lr", "temperature", "grad_clip"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise KvtoolError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        for name in ("rl_weight", "clip_eps", "weight_decay"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise KvtoolError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise KvtoolError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.warmup < 0:
            raise KvtoolError(f"--warmup must be >= 0, got {self.warmup}")
        if self.distill_on not in ("all", "correct"):
            raise KvtoolError(f"--distill-on must be all or correct, got {self.distill_on!r}")
        if self.reuse_token is not None and int(self.reuse_token) < 0:
            raise KvtoolError(f"--reuse-token must be >= 0, got {self.reuse_token}")
        if self.pool < 1:
            raise KvtoolError(f"--pool must be >= 1, got {self.pool}")
        if self.micro_batch < 0 or self.seed < 0:
            raise KvtoolError("--micro-batch and --seed must be >= 0")
        if self.dtype not in ("auto", "bf16", "f32"):
            raise KvtoolError(f"--dtype must be auto, bf16 or f32, got {self.dtype!r}")
        if self.attn_backend not in ("auto", "reference", "sdpa"):
            raise KvtoolError(f"attention backend must be auto, reference or sdpa, got {self.attn_backend!r}")

    @property
    def all_intervals(self) -> tuple:
        """The intervals this run trains (one, or the sorted ``intervals``)."""
        return self.intervals or (int(self.interval),)


def row_intervals(cfg: BeaconTrainConfig, step: int, n_rows: int) -> list[int]:
    """The interval of each of the step's ``n_rows`` rollout rows (global order): drawn uniformly from the run's
    intervals, stateless in (seed, step), so a resumed or multi-process run gives every row the same c."""
    cs = cfg.all_intervals
    if len(cs) == 1:
        return [cs[0]] * n_rows
    import numpy as np

    rng = np.random.default_rng([int(cfg.seed), int(step), 0xBEAC])
    return [int(cs[i]) for i in rng.integers(0, len(cs), n_rows)]


def row_seeds(cfg: BeaconTrainConfig, step: int, n_rows: int, salt: int = 0) -> list[int]:
    """One sampling seed per rollout row (global order), stateless in (seed, step, row): a row samples the same
    tokens whichever process holds it, which is what makes a torchrun run equal a single process."""
    import numpy as np

    ss = np.random.SeedSequence([int(cfg.seed), int(step), int(salt)])
    return [int(x) for x in ss.generate_state(max(1, n_rows), dtype=np.uint64)[:n_rows] % (1 << 63)]


# ---------------------------------------------------------------------------------------------------------------
# The beacon token
# ---------------------------------------------------------------------------------------------------------------
def add_beacon_token(model, tok, reuse_token: Optional[int] = None) -> int:
    """Add ``<|beacon|>`` to ``tok`` and the model's embedding (+ an untied ``lm_head``), rows = mean of the existing
    rows; returns its id. With ``reuse_token`` nothing changes and that id is returned (after a range check)."""
    emb = model.get_input_embeddings()
    n_rows = int(emb.weight.shape[0])
    if reuse_token is not None:
        if not 0 <= int(reuse_token) < n_rows:
            raise KvtoolError(f"--reuse-token {reuse_token} is outside the model's vocabulary of {n_rows}")
        return int(reuse_token)
    from transformers import AddedToken

    if BEACON_TOKEN in tok.get_vocab():
        raise KvtoolError(f"the tokenizer already has {BEACON_TOKEN}: is this a beacon checkpoint already? "
                          "Train from the base model, or pass --reuse-token with its id")
    tok.add_tokens([AddedToken(BEACON_TOKEN, special=True, normalized=False)], special_tokens=True)
    bid = int(tok.convert_tokens_to_ids(BEACON_TOKEN))
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    with torch.no_grad():
        mean_in = emb.weight[:n_rows].float().mean(0)
        mean_out = head.weight[:n_rows].float().mean(0) if head is not None and not tied else None
    if bid >= n_rows:  # the usual case; a model whose matrix has spare padding rows already holds bid
        model.resize_token_embeddings(bid + 1, mean_resizing=False)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
    with torch.no_grad():
        emb.weight[bid] = mean_in.to(emb.weight.dtype)
        if mean_out is not None:
            head.weight[bid] = mean_out.to(head.weight.dtype)
    return bid


class BeaconEmbedding:
    """The beacon's input vector as its own float32 parameter, written over the embedding output where the input id
    is the beacon (a forward hook). ``detach()`` removes the hook; :meth:`write_back` copies the row into the matrix."""

    def __init__(self, model, beacon_id: int):
        self.emb = model.get_input_embeddings()
        self.beacon_id = int(beacon_id)
        self.row = nn.Parameter(self.emb.weight[self.beacon_id].detach().float().clone())
        self._handle = self.emb.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        ids = args[0] if args else None
        if ids is None:
            return out
        hit = (ids == self.beacon_id).unsqueeze(-1)
        if not bool(hit.any()):
            return out
        return torch.where(hit, self.row.to(out.dtype), out)

    def write_back(self) -> None:
        with torch.no_grad():
            self.emb.weight[self.beacon_id] = self.row.to(self.emb.weight.dtype)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ---------------------------------------------------------------------------------------------------------------
# Student / teacher setup
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: Any  # what forwards go through (a PeftModel with LoRA, else the HF model)
    base: Any  # the HF model (kvtool attention registered on it)
    tok: Any
    beacon: BeaconEmbedding
    beacon_id: int
    interval: int
    teacher_copy: Any = None  # full=True: the frozen beacon-free copy
    full: bool = False
    orig_impl: str = "sdpa"
    vocab_rows: int = 0  # rows of the (resized) output matrix

    @contextlib.contextmanager
    def teacher(self) -> Iterator[Any]:
        """The model without beacons: the frozen copy, or the LoRA model with its adapter disabled."""
        if self.teacher_copy is not None:
            yield self.teacher_copy
            return
        state = get_kvtool(self.base)
        saved = None
        if state is not None and bool(state.windows.any()):  # --mask: the teacher keeps every head full
            saved = state.windows.clone()
            state.windows.zero_()
        try:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
        finally:
            if saved is not None:
                state.windows.copy_(saved)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def parameters(self) -> list[nn.Parameter]:
        return [self.beacon.row] + [p for _, p in self.trainable()]


def mask_windows(path: str, model) -> tuple[list[list[int]], int]:
    """Per-head windows ([layer][kv head], 0 = full) and sink of a heads.json, checked against the model's shape."""
    from ..heads import HeadsMask

    m = HeadsMask.load(path)
    n_layer, n_kv = _model_dims(model)
    if (m.n_layer, m.n_head_kv) != (n_layer, n_kv):
        raise KvtoolError(f"--mask {path} is for {m.n_layer} layers x {m.n_head_kv} KV heads, the model has "
                          f"{n_layer} x {n_kv}")
    flat = m.head_window()
    return [flat[i * n_kv:(i + 1) * n_kv] for i in range(n_layer)], int(m.sink)


def prepare(model, tok, cfg: BeaconTrainConfig) -> Setup:
    """Teacher copy (full), beacon token, kvtool attention, beacon embedding hook, LoRA (or all weights trainable)."""
    orig_impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    device = next(model.parameters()).device
    teacher_copy = None
    if cfg.full:
        teacher_copy = copy.deepcopy(model).eval()
        for p in teacher_copy.parameters():
            p.requires_grad_(False)
    beacon_id = add_beacon_token(model, tok, cfg.reuse_token)
    backend = cfg.attn_backend if cfg.attn_backend != "auto" else ("sdpa" if device.type == "cuda" else "reference")
    windows, sink = mask_windows(cfg.mask, model) if cfg.mask else (0, 0)
    load_with_kvtool(model, windows, sink, backend=backend)
    beacon = BeaconEmbedding(model, beacon_id)
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
        wrapped = model
    else:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise KvtoolError("LoRA needs peft: pip install peft (or train every weight with --full)") from None
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules="all-linear")
        wrapped = get_peft_model(model, lcfg)
    wrapped.eval()  # no dropout: sampling and the loss see the same function
    rows = int(model.get_output_embeddings().weight.shape[0])
    return Setup(wrapped, model, tok, beacon, beacon_id, cfg.interval, teacher_copy, cfg.full, orig_impl, rows)


# ---------------------------------------------------------------------------------------------------------------
# Sampling: full cache (teacher) or compressed with beacons (student)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    prompts: list  # list[list[int]] (no padding)
    comps: list  # list[list[int]]: completion up to and including the first EOS
    rewards: torch.Tensor  # [N]
    texts: list


NEG = -1e30  # "banned" logit: exp() underflows to 0 like -inf, but differences stay finite (no NaN gradients)


def _banned(logits: torch.Tensor, beacon_id: int) -> torch.Tensor:
    """float32 logits with the beacon id banned (a beacon-free teacher's matrix may not have that row at all)."""
    out = logits.float().clone()
    if beacon_id < out.shape[-1]:
        out[..., beacon_id] = NEG
    return out


def _evict(cache, a: int, b: int) -> None:
    """Cut slots [a, b) out of every layer of a transformers DynamicCache."""
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layer.keys = torch.cat([k[..., :a, :], k[..., b:, :]], dim=-2)
        layer.values = torch.cat([v[..., :a, :], v[..., b:, :]], dim=-2)


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, beacon_id: int,
           eos_ids: Sequence[int], pad_id: int, interval: Optional[int] = None, forced: Optional[torch.Tensor] = None,
           record: Optional[list] = None, seeds: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Ancestral sampling at ``temperature`` (0: greedy), the beacon id banned. ``interval`` None: plain full cache;
    ``interval=c``: the runtime's beacon loop (beacon fed after every c tokens, then the chunk evicted).
    ``forced`` [B, T] feeds fixed tokens instead (teacher forcing); ``record`` receives the logits [B, V] used for
    every sampled token. ``seeds``: one per row, each row then draws from its own generator (the same tokens in any
    batch composition, up to float noise in the logits); None draws from torch's global RNG.
    Returns each row's completion up to and including its first EOS."""
    device = next(model.parameters()).device
    gens = None
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} rows")
        gens = [torch.Generator(device=device).manual_seed(int(x)) for x in seeds]
    ids, attn = left_pad(prompts, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    B, P = ids.shape
    pos = positions(attn)
    # Each cache slot's sequence position, kept through evictions so per-head windows (--mask) measure positions.
    slot_pos = pos.clone()
    has_kvtool = find_kvtool(model) is not None

    def forward(**kw):  # reads slot_pos at call time: it grows with every feed and shrinks with every eviction
        with use_slot_positions(model, slot_pos) if has_kvtool else contextlib.nullcontext():
            return model(**kw)

    out = forward(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    next_pos = pos[:, -1] + 1
    eos = torch.tensor(list(eos_ids), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks: list[torch.Tensor] = []
    slot_start, in_chunk = P, 0
    steps = max_new_tokens if forced is None else min(max_new_tokens, forced.shape[1])
    for j in range(steps):
        lg = _banned(logits, beacon_id)
        if record is not None:
            record.append(lg.cpu())
        if forced is not None:
            tok = forced[:, j].to(device)
        elif temperature > 0 and gens is not None:
            probs = torch.softmax(lg / temperature, -1)
            tok = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0] for i in range(B)])
        elif temperature > 0:
            tok = torch.multinomial(torch.softmax(lg / temperature, -1), 1)[:, 0]
        else:
            tok = lg.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, int(pad_id)), tok)
        toks.append(tok)
        done |= torch.isin(tok, eos)
        if bool(done.all()) or j == steps - 1:
            break
        feed = tok[:, None]
        full_chunk = interval is not None and in_chunk + 1 == interval
        if full_chunk:
            feed = torch.cat([feed, torch.full_like(feed, beacon_id)], 1)
        k = feed.shape[1]
        attn = torch.cat([attn, torch.ones(B, k, dtype=attn.dtype, device=device)], 1)
        p = next_pos[:, None] + torch.arange(k, device=device)[None]
        slot_pos = torch.cat([slot_pos, p], 1)
        out = forward(input_ids=feed, attention_mask=attn, position_ids=p, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_pos = next_pos + k
        if full_chunk:
            _evict(cache, slot_start, slot_start + interval)
            attn = torch.cat([attn[:, :slot_start], attn[:, slot_start + interval:]], 1)
            slot_pos = torch.cat([slot_pos[:, :slot_start], slot_pos[:, slot_start + interval:]], 1)
            slot_start, in_chunk = slot_start + 1, 0
        else:
            in_chunk += 1
    comp = torch.stack(toks, 1).cpu() if toks else torch.zeros(B, 0, dtype=torch.long)
    res = []
    for i in range(B):
        row = comp[i].tolist()
        for t, tk in enumerate(row):
            if tk in eos_ids:
                row = row[:t + 1]
                break
        res.append(row)
    return res


def rollouts(model, tok, problems: Sequence[Problem], group: int, max_new_tokens: int, temperature: float,
             beacon_id: int, interval: Optional[int] = None, reward_fn: RewardFn = score,
             seeds: Optional[Sequence[int]] = None) -> Rollouts:
    """``group`` samples per problem (rows grouped by problem), scored by ``reward_fn``; ``seeds`` as in
    :func:`sample` (one per row)."""
    prompts = [encode_prompt(p, tok) for p in problems for _ in range(group)]
    eos = eos_ids(model, tok)
    comps = sample(model, prompts, max_new_tokens, temperature, beacon_id, eos, int(tok.pad_token_id), interval,
                   seeds=seeds)
    texts = [tok.decode(c, skip_special_tokens=True) for c in comps]
    rewards = torch.tensor([float(reward_fn(problems[i // group], t)) for i, t in enumerate(texts)])
    return Rollouts(prompts, comps, rewards, texts)


# ---------------------------------------------------------------------------------------------------------------
# Student batches and the losses
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StudentBatch:
    ids: torch.Tensor  # [B, L] beacon sequences, right-padded
    attn: torch.Tensor  # [B, L]
    chunk: torch.Tensor  # [B, L] BeaconSegments.chunk
    is_beacon: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [B, T] index of the row that predicts completion token j
    targets: torch.Tensor  # [B, T] completion tokens
    mask: torch.Tensor  # [B, T] bool


def student_batch(prompts: Sequence[Sequence[int]], comps: Sequence[Sequence[int]],
                  interval: Union[int, Sequence[int]], beacon_id: int, pad_id: int) -> StudentBatch:
    """prompt · chunk_1 · b_1 · chunk_2 · … per row (no trailing beacon: nothing follows it), as the runtime decodes.
    ``interval``: one c for every row, or one per row (multi-interval training)."""
    seqs, lays, rows = [], [], []
    cs = [int(interval)] * len(prompts) if isinstance(interval, int) else [int(c) for c in interval]
    if len(cs) != len(prompts):
        raise ValueError(f"{len(cs)} intervals for {len(prompts)} rows")
    for p, comp, c in zip(prompts, comps, cs):
        s = list(p)
        for j, t in enumerate(comp):
            s.append(int(t))
            if (j + 1) % c == 0 and j + 1 < len(comp):
                s.append(int(beacon_id))
        seqs.append(s)
        lays.append(beacon_layout(len(p), len(s), c))
        rows.append([len(p) + j + j // c - 1 for j in range(len(comp))])
    B = len(seqs)
    L = max(len(s) for s in seqs)
    T = max((len(c_) for c_ in comps), default=0)
    ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    chunk = torch.zeros((B, L), dtype=torch.long)
    is_b = torch.zeros((B, L), dtype=torch.bool)
    r = torch.zeros((B, T), dtype=torch.long)
    tg = torch.full((B, T), int(pad_id), dtype=torch.long)
    m = torch.zeros((B, T), dtype=torch.bool)
    for i, (s, lay, rw, comp) in enumerate(zip(seqs, lays, rows, comps)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        chunk[i, :len(s)] = lay.chunk
        is_b[i, :len(s)] = lay.is_beacon
        if comp:
            r[i, :len(comp)] = torch.tensor(rw)
            tg[i, :len(comp)] = torch.tensor(list(comp))
            m[i, :len(comp)] = True
    return StudentBatch(ids, attn, chunk, is_b, r, tg, m)


def student_logits(setup: Setup, sb: StudentBatch) -> torch.Tensor:
    """[B, T, V] float32 logits at the rows predicting each completion token, under the beacon mask (beacon banned)."""
    from .attention import BeaconSegments

    device = next(setup.model.parameters()).device
    ids, attn = sb.ids.to(device), sb.attn.to(device)
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    with use_segments(setup.base, BeaconSegments(sb.chunk.to(device), sb.is_beacon.to(device))):
        out = setup.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
    rows = sb.rows.to(device)
    lg = out.logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
    return _banned(lg, setup.beacon_id)


@torch.no_grad()
def teacher_logits(setup: Setup, prompts: Sequence[Sequence[int]], comps: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, T, V] float32 logits of the beacon-free model (full cache) predicting each completion token."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, comps)]
    pad = int(setup.tok.pad_token_id)
    ids, attn = left_pad(seqs, pad)  # left padding: every row's completion ends at the same column
    T = max((len(c) for c in comps), default=0)
    with setup.teacher() as teacher:
        device = next(teacher.parameters()).device
        ids, attn = ids.to(device), attn.to(device)
        out = teacher(input_ids=ids, attention_mask=attn, position_ids=positions(attn), use_cache=False,
                      logits_to_keep=T + 1)
    lg = out.logits[:, :-1].float()  # [B, T, V_teacher]; row j predicts the token T - j columns from the end
    B = len(seqs)
    V = setup.vocab_rows
    res = torch.zeros((B, T, V), device=lg.device)  # rows past a completion's end: masked by the caller
    for i, c in enumerate(comps):
        n = len(c)
        if n:
            res[i, :n, :lg.shape[-1]] = lg[i, T - n:]
            res[i, :n, lg.shape[-1]:] = NEG  # rows the beacon-free teacher does not have
    return _banned(res, setup.beacon_id)


def per_token_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) = Σ_v p_t (log p_t − log p_s) at every position, both softmaxed over the (beacon-banned)
    vocabulary: ``[..., V] -> [...]``."""
    lt = torch.log_softmax(t_logits.float(), -1)
    ls = torch.log_softmax(s_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def token_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of :func:`per_token_kl`."""
    kl = per_token_kl(t_logits, s_logits)
    return torch.where(mask, kl, torch.zeros_like(kl)).sum()


def distill_kl(setup: Setup, prompts, comps, grad: bool = False, scale: float = 1.0,
               intervals: Optional[Sequence[int]] = None) -> tuple[float, int]:
    """Summed KL over the completion tokens of (prompts, comps); with ``grad`` also backward(kl * scale).
    ``intervals``: the student's c per row (default: the setup's one interval)."""
    if not any(len(c) for c in comps):
        return 0.0, 0
    cs = setup.interval if intervals is None else list(intervals)
    sb = student_batch(prompts, comps, cs, setup.beacon_id, int(setup.tok.pad_token_id))
    tl = teacher_logits(setup, prompts, comps)
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        sl = student_logits(setup, sb)
        kl = token_kl(tl.to(sl.device), sl, sb.mask.to(sl.device))
        if grad:
            (kl * scale).backward()
    return float(kl.detach()), int(sb.mask.sum())


def student_logprobs(setup: Setup, prompts, comps, temperature: float,
                     interval: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) of the student's own completions under its compressed-mode sampling distribution; [B, T], mask."""
    c = setup.interval if interval is None else int(interval)
    sb = student_batch(prompts, comps, c, setup.beacon_id, int(setup.tok.pad_token_id))
    sl = student_logits(setup, sb) / temperature
    lp = torch.log_softmax(sl, -1).gather(-1, sb.targets.to(sl.device).unsqueeze(-1)).squeeze(-1)
    mask = sb.mask.to(sl.device)
    return torch.where(mask, lp, torch.zeros_like(lp)), mask


def beacon_step(setup: Setup, opt: torch.optim.Optimizer, problems: Sequence[Problem], cfg: BeaconTrainConfig,
                reward_fn: RewardFn = score, teacher_data: Optional[Rollouts] = None,
                intervals: Optional[Sequence[int]] = None, seeds: Optional[Sequence[int]] = None,
                rl_interval: Optional[int] = None, rl_seeds: Optional[Sequence[int]] = None) -> dict:
    """One optimiser step: teacher rollouts → KL distillation (+ GRPO on student rollouts when enabled).

    ``intervals``: the student's c for each teacher row (default: the setup's one interval); ``seeds``: the
    teacher rows' sampling seeds (``rl_interval``/``rl_seeds`` likewise for the student's own rollouts). Under
    torchrun ``problems`` is this rank's share: token counts, KL and rewards are all-reduced, so the loss is the
    global token mean, and the summed gradients give every rank the same optimiser step."""
    t0 = time.perf_counter()
    tok = setup.tok
    dev = setup.beacon.row.device
    world = dist_rank_world()[1]
    if teacher_data is None:
        with setup.teacher() as teacher:
            teacher_data = rollouts(teacher, tok, problems, cfg.group, cfg.max_new_tokens, cfg.temperature,
                                    setup.beacon_id, None, reward_fn, seeds=seeds)
    cs = [setup.interval] * len(teacher_data.comps) if intervals is None else [int(c) for c in intervals]
    keep = list(range(len(teacher_data.comps)))
    if cfg.distill_on == "correct":
        keep = [i for i in keep if float(teacher_data.rewards[i]) >= 1.0]
    prompts = [teacher_data.prompts[i] for i in keep]
    comps = [teacher_data.comps[i] for i in keep]
    cs = [cs[i] for i in keep]
    local = torch.tensor([float(sum(len(c) for c in comps)), float(len(comps)),
                          float(teacher_data.rewards.sum()), float(len(teacher_data.rewards))],
                         dtype=torch.float64, device=dev)
    n_tok, n_rows, r_sum, r_n = all_reduce_(local).tolist()
    n_tok, n_rows = int(n_tok), int(n_rows)
    opt.zero_grad(set_to_none=True)
    kl_sum = 0.0
    for sl in row_slices(len(comps), cfg.micro_batch):
        k, _ = distill_kl(setup, prompts[sl], comps[sl], grad=True, scale=1.0 / max(1, n_tok), intervals=cs[sl])
        kl_sum += k
    kl_sum = float(all_reduce_(torch.tensor([kl_sum], dtype=torch.float64, device=dev)).item())
    stats = {"kl": kl_sum / n_tok if n_tok else None, "teacher_reward": r_sum / r_n if r_n else 0.0,
             "distill_rows": n_rows, "distill_tokens": n_tok}
    if len(cfg.all_intervals) > 1:
        counts = torch.tensor([float(sum(1 for c in cs if c == x)) for x in cfg.all_intervals], device=dev)
        stats["rows_per_interval"] = {str(x): int(v) for x, v in zip(cfg.all_intervals, all_reduce_(counts).tolist())}

    if cfg.rl_weight > 0:
        c_rl = setup.interval if rl_interval is None else int(rl_interval)
        sr = rollouts(setup.model, tok, problems, cfg.rl_group, cfg.max_new_tokens, cfg.temperature,
                      setup.beacon_id, c_rl, reward_fn, seeds=rl_seeds)
        adv = group_advantages(sr.rewards, cfg.rl_group)
        rl_local = torch.tensor([float(sum(len(c) for c in sr.comps)), float(sr.rewards.sum()),
                                 float(len(sr.rewards))], dtype=torch.float64, device=dev)
        rl_tok, sr_sum, sr_n = all_reduce_(rl_local).tolist()
        rl_tok = int(rl_tok)
        stats["student_reward"] = sr_sum / sr_n if sr_n else 0.0
        rl_loss = 0.0
        if bool((adv != 0).any()) and rl_tok:  # the student earns reward with some variance: GRPO has a signal
            for sl in row_slices(len(sr.comps), cfg.micro_batch):
                lp, mask = student_logprobs(setup, sr.prompts[sl], sr.comps[sl], cfg.temperature, c_rl)
                loss = clipped_objective(lp, lp.detach(), adv[sl].to(lp.device), mask, cfg.clip_eps)
                (loss * cfg.rl_weight / rl_tok).backward()
                rl_loss += float(loss.detach())
        rl_loss = float(all_reduce_(torch.tensor([rl_loss], dtype=torch.float64, device=dev)).item())
        stats["rl_loss"] = rl_loss / rl_tok if rl_tok else 0.0
        n_tok += rl_tok

    params = setup.parameters()
    if world > 1:  # every rank holds its rows' share of the global token mean: the sum is the global gradient
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_(p.grad)
    gn = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip) \
        if any(p.grad is not None for p in params) else torch.tensor(0.0)
    opt.step()
    dt = time.perf_counter() - t0
    stats.update(grad_norm=float(gn), tok_s=n_tok / dt if dt > 0 else 0.0, step_s=dt)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ---------------------------------------------------------------------------------------------------------------
def make_optimizer(setup: Setup, cfg: BeaconTrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": [setup.beacon.row], "lr": cfg.beacon_lr, "weight_decay": 0.0}]
    rest = [p for _, p in setup.trainable()]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98))


def lr_factor(cfg: BeaconTrainConfig, step: int) -> float:
    """Multiplier on every group's learning rate at 1-based ``step``: linear warm-up over ``cfg.warmup`` steps, then
    constant or a cosine decay to 0 at ``cfg.steps`` (exact-match tasks gain from a quiet end of training)."""
    if cfg.warmup and step <= cfg.warmup:
        return step / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, max(0.0, (step - cfg.warmup) / span))
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def trainable_state(setup: Setup) -> dict:
    return {n: p.detach().cpu().clone() for n, p in setup.trainable()}


def save_checkpoint(path: Path, step: int, setup: Setup, opt: torch.optim.Optimizer, cfg: BeaconTrainConfig,
                    rng=None) -> Path:
    """``rng``: this process's RNG state (default), or under torchrun the list of every rank's."""
    state = {"format": CKPT_FORMAT, "step": int(step), "beacon_id": setup.beacon_id,
             "beacon_row": setup.beacon.row.detach().cpu().clone(), "trainable": trainable_state(setup),
             "optimizer": opt.state_dict(), "rng": rng_state() if rng is None else rng,
             "config": dataclasses.asdict(cfg)}
    return save_state_atomic(state, path)


def load_checkpoint(path: Path) -> dict:
    return load_state(path, CKPT_FORMAT, "beacon")


def restore(setup: Setup, opt: torch.optim.Optimizer, st: dict, rank: int = 0, world: int = 1) -> int:
    if int(st["beacon_id"]) != setup.beacon_id:
        raise KvtoolError(f"checkpoint beacon id {st['beacon_id']} != {setup.beacon_id} of this run")
    named = dict(setup.trainable())
    missing = set(named) ^ set(st["trainable"])
    if missing:
        raise KvtoolError(f"checkpoint parameters do not match this run's trainable set ({sorted(missing)[:3]} ...)")
    with torch.no_grad():
        setup.beacon.row.copy_(st["beacon_row"])
        for n, p in named.items():
            p.copy_(st["trainable"][n].to(p.device, p.dtype))
    opt.load_state_dict(st["optimizer"])
    rngs = st["rng"] if isinstance(st["rng"], list) else [st["rng"]]
    if len(rngs) != world:
        raise KvtoolError(f"the checkpoint was written by {len(rngs)} process(es), this run has {world}")
    set_rng_state(rngs[rank])
    return int(st["step"])


# What a tokenizer may consist of on disk; convert_hf_to_gguf.py reads these (tokenizer.model for SentencePiece vocabularies,
# add_bos_token from tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def _copy_source_tokenizer(model: str, out: Path) -> None:
    """With a reused beacon id the vocabulary is unchanged, so the source's tokenizer files are copied verbatim over what
    ``save_pretrained`` wrote: a re-save through the fast backend drops ``tokenizer.model`` and flags such as
    ``add_bos_token``, and the GGUF converter then fails or changes BOS handling. A GGUF source has no such files."""
    src = Path(model)
    if not src.is_dir():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            write_atomic(out / name, (src / name).read_bytes())


def export_checkpoint(setup: Setup, out: Path, cfg: BeaconTrainConfig, extra: Optional[dict] = None) -> Path:
    """Write the HF checkpoint: LoRA merged, beacon row in the embedding, stock attention, tokenizer, kvtool.json.
    Consumes the setup (the model is merged in place)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = setup.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    setup.beacon.write_back()
    setup.beacon.detach()
    unload_kvtool(model, setup.orig_impl if setup.orig_impl != "kvtool_mixed" else "sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    model.save_pretrained(out, safe_serialization=True)
    setup.tok.save_pretrained(out)
    if cfg.reuse_token is not None:
        _copy_source_tokenizer(cfg.model, out)
    info = {"format": JSON_FORMAT,
            "beacon": {"token": setup.tok.convert_ids_to_tokens(setup.beacon_id), "token_id": setup.beacon_id,
                       "interval": setup.interval, "reused": cfg.reuse_token is not None},
            "training": {"base_model": str(cfg.model), "tasks": list(cfg.tasks), "full": cfg.full,
                         "lora_r": None if cfg.full else cfg.lora_r, "rl_weight": cfg.rl_weight,
                         "mask": cfg.mask, **(extra or {})}}
    if len(cfg.all_intervals) > 1:  # the file may run at any of them (``interval`` is the default: the smallest)
        info["beacon"]["intervals"] = list(cfg.all_intervals)
    write_atomic(out / KVTOOL_JSON, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BeaconTrainResult:
    output: Path
    log_path: Path
    steps_done: int
    beacon_id: int
    last: Optional[dict] = None


def train(cfg: BeaconTrainConfig, reward_fn: RewardFn = score, progress: bool = True,
          echo: Callable[[str], None] = echo_stderr, model_and_tok=None, export: bool = True) -> BeaconTrainResult:
    """Run ``kvtool train beacons``. ``reward_fn``/``model_and_tok`` let tests inject a verifier or a loaded model."""
    device = resolve_device(cfg.device)
    init_dist(device)
    rank, world = dist_rank_world()
    if cfg.batch % world:
        raise KvtoolError(f"--batch {cfg.batch} must be a multiple of the number of processes ({world})")
    out_dir, log_path, ckpt = open_out_dir(cfg.out_dir, cfg.resume)
    if world > 1:  # every rank has looked for checkpoints before rank 0 writes any
        torch.distributed.barrier()
    seed_all(cfg.seed)
    model, tok = model_and_tok if model_and_tok is not None else load_model(cfg.model, device,
                                                                            resolve_dtype(cfg.dtype, device))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    setup = prepare(model, tok, cfg)
    opt = make_optimizer(setup, cfg)
    problems = make_problems(cfg.tasks, cfg.pool, cfg.seed)

    start = 0
    if cfg.resume and ckpt is not None:
        st = load_checkpoint(ckpt)
        bad = config_mismatch(st["config"], cfg, RESUMABLE_CHANGES)
        if bad:
            raise KvtoolError(f"--resume with settings that differ from {ckpt.name}: " + "; ".join(bad))
        start = restore(setup, opt, st, rank, world)
        if rank == 0:
            rewrite_log(log_path, start)
            echo(f"resuming from {ckpt} (step {start})")
    else:
        if cfg.resume and rank == 0:
            echo(f"--resume: no checkpoint under {out_dir / 'ckpt'}, starting from step 0")
        seed_all(cfg.seed + 1_000_003 * (rank + 1))
        if rank == 0 and log_path.exists():
            log_path.unlink()

    from tqdm.auto import tqdm

    cs = ",".join(map(str, cfg.all_intervals))
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=f"train beacons (c={cs})", unit="step",
               disable=not progress or rank != 0)
    step, stats = start, None
    per = cfg.batch // world  # problems per rank; rows are grouped by problem, so a rank's rows are contiguous
    try:
        for step in range(start + 1, cfg.steps + 1):
            idx = batch_indices(step, cfg.batch, len(problems), cfg.seed)[rank * per:(rank + 1) * per]
            rows = slice(rank * per * cfg.group, (rank + 1) * per * cfg.group)
            n_rows = cfg.batch * cfg.group
            rl_rows = slice(rank * per * cfg.rl_group, (rank + 1) * per * cfg.rl_group)
            f_lr = lr_factor(cfg, step)
            for g in opt.param_groups:
                g["lr"] = g.setdefault("base_lr", g["lr"]) * f_lr
            rl_c = row_intervals(cfg, step, 1 + n_rows)[-1]  # the student's own rollouts: one c per step
            out = beacon_step(setup, opt, [problems[i] for i in idx], cfg, reward_fn,
                              intervals=row_intervals(cfg, step, n_rows)[rows],
                              seeds=row_seeds(cfg, step, n_rows)[rows], rl_interval=rl_c,
                              rl_seeds=row_seeds(cfg, step, cfg.batch * cfg.rl_group, salt=1)[rl_rows])
            stats = {"step": step, **out, "lr": opt.param_groups[-1]["lr"]}
            if len(cfg.all_intervals) > 1 and cfg.rl_weight > 0:
                stats["rl_interval"] = rl_c
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(stats) + "\n")
            post = {"kl": "-" if stats["kl"] is None else f"{stats['kl']:.4f}",
                    "r_teacher": f"{stats['teacher_reward']:.2f}"}
            if "student_reward" in stats:
                post["r_student"] = f"{stats['student_reward']:.2f}"
            bar.set_postfix(post)
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                rngs = rng_state()
                if world > 1:
                    rngs = [None] * world
                    torch.distributed.all_gather_object(rngs, rng_state())
                if rank == 0:
                    save_checkpoint(checkpoint_path(out_dir, step), step, setup, opt, cfg, rngs)
    finally:
        bar.close()
    output = Path(cfg.output) if cfg.output else out_dir / "model"
    if world > 1:
        torch.distributed.barrier()
    if export and rank == 0:
        export_checkpoint(setup, output, cfg, {"steps": max(step, start), "seed": cfg.seed})
        echo(f"wrote {output}: beacon {BEACON_TOKEN if cfg.reuse_token is None else 'reused'} id {setup.beacon_id}, "
             f"interval{'s' if len(cfg.all_intervals) > 1 else ''} {','.join(map(str, cfg.all_intervals))}")
    return BeaconTrainResult(output, log_path, max(step, start), setup.beacon_id, stats)

