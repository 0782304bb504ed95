"""The CPU-trainable reasoner: a character tokenizer, a small GQA llama and its training loop.

No real reasoning model can be loaded offline, so ``examples/cpu_reasoner`` trains one from scratch on CPU and runs
the whole kvtool pipeline on it (the feasibility study behind these choices is summarised in
``docs/architecture.md``). The tasks it learns, ``long_addition`` and ``cyclic_sum``, live in :mod:`toolchain.tasks`
with their shared alphabet (``^`` begin, ``$`` end, ``#`` beacon, one id per character).

**Tokenizer**: saved twice with the same ids, as a ``tokenizer.json`` (WordLevel; ``PreTrainedTokenizerFast`` loads
it, its post-processor adds ``^``) and as a SentencePiece ``tokenizer.model`` with one piece per character, written
here as raw protobuf (no protobuf package needed). The vendored ``convert_hf_to_gguf.py`` takes the SentencePiece
route for llama (a home-made BPE ``tokenizer.json`` would be rejected for its unknown pre-tokenizer hash), and
llama.cpp's SPM tokenizer cannot merge anything when every piece is a single character, so ids are the same in both.

**Model**: ``LlamaForCausalLM`` from a config: 4 layers, hidden 256, 8 query heads of dim 32, 4 KV heads (GQA),
FFN 768, rope theta 1e4, tied embeddings (3.16 M parameters).

**Training**: fresh random problems every step, loss on the chain of thought only, AdamW (0.9, 0.98), weight decay
0.01, peak lr 1.5e-3, 150 warm-up steps then cosine decay, batch 16 x 278 tokens, gradient clip 1.0, bf16 autocast.
With ``minutes=`` the cosine runs over wall-clock time (the step count is unknown in advance on a shared machine).

CLI: ``python -m toolchain.train.reasoner train --out DIR --minutes 25`` and
``python -m toolchain.train.reasoner eval DIR --n 200``.

torch/transformers are imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..console import echo_stderr
from ..tasks.alphabet import BOS, EOS, PAD, UNK, VOCAB
from ..tasks.long_addition import N_DIGITS, TASK, prompt_len, sequences_text
from ..tasks.registry import task_spec


# --- tokenizer -----------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # protobuf encodes negative int32 as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v)


def _field_bytes(num: int, b: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(b)) + b


def _field_float(num: int, f: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", f)


# sentencepiece_model.proto: SentencePiece.Type
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_UNUSED = 1, 2, 3, 5


def spm_model_bytes() -> bytes:
    """A serialized SentencePiece ``ModelProto`` (CHAR model) with exactly :data:`VOCAB`'s pieces and ids."""
    pieces = b""
    for i, p in enumerate(VOCAB):
        if p in ("<pad>", "^", "$"):
            t = _SP_CONTROL
        elif p == "<unk>":
            t = _SP_UNKNOWN
        elif p.startswith("<x"):
            t = _SP_UNUSED
        else:
            t = _SP_NORMAL
        msg = _field_bytes(1, p.encode()) + _field_float(2, 0.0 if t != _SP_NORMAL else -float(i)) + _field_varint(3, t)
        pieces += _field_bytes(1, msg)
    trainer = (_field_varint(3, 4)  # model_type = CHAR
               + _field_varint(4, len(VOCAB))  # vocab_size
               + _field_varint(35, 0)  # byte_fallback = false
               + _field_varint(40, UNK) + _field_varint(41, BOS) + _field_varint(42, EOS) + _field_varint(43, PAD)
               + _field_bytes(45, b"<unk>") + _field_bytes(46, b"^") + _field_bytes(47, b"$") + _field_bytes(48, b"<pad>"))
    normalizer = (_field_bytes(1, b"identity") + _field_varint(3, 0)  # add_dummy_prefix = false
                  + _field_varint(4, 0) + _field_varint(5, 0))  # remove_extra_whitespaces, escape_whitespaces
    return pieces + _field_bytes(2, trainer) + _field_bytes(3, normalizer)


def _fast_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "^", "$", "<unk>")])
    tk.post_processor = processors.TemplateProcessing(single="^ $A", pair="^ $A $B", special_tokens=[("^", BOS)])
    return tk


def save_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` (HF) and ``tokenizer.model``
    (SentencePiece, for the GGUF converter) into ``out_dir``. Returns ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=_fast_tokenizer(), bos_token="^", eos_token="$",
                                  pad_token="<pad>", unk_token="<unk>", model_max_length=1024)
    tok.save_pretrained(str(d))
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # read by convert_hf_to_gguf.py: no SentencePiece dummy prefix, BOS added, no EOS added
    cfg.update({"add_prefix_space": False, "add_bos_token": True, "add_eos_token": False,
                "tokenizer_class": "PreTrainedTokenizerFast"})
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (d / "tokenizer.model").write_bytes(spm_model_bytes())
    return d


# --- model ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    n_layer: int = 4
    hidden: int = 256
    n_head: int = 8
    n_head_kv: int = 4
    head_dim: int = 32
    ffn: int = 768
    rope_theta: float = 1e4
    max_pos: int = 1024


def make_config(shape: Optional[ModelShape] = None):
    from transformers import LlamaConfig

    s = shape or ModelShape()
    return LlamaConfig(vocab_size=len(VOCAB), hidden_size=s.hidden, intermediate_size=s.ffn,
                       num_hidden_layers=s.n_layer, num_attention_heads=s.n_head, num_key_value_heads=s.n_head_kv,
                       head_dim=s.head_dim, max_position_embeddings=s.max_pos, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": float(s.rope_theta)},
                       tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       initializer_range=0.02, architectures=["LlamaForCausalLM"])


def make_model(shape: Optional[ModelShape] = None, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(shape)).float()


def load_hf(path: str | os.PathLike):
    """(model, tokenizer) of a saved reasoner directory, float32, eval mode."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


# --- training ------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    out_dir: str = "runs/cpu_reasoner"
    steps: Optional[int] = None      # stop after this many steps (cosine over steps)
    minutes: Optional[float] = None  # or after this wall-clock budget (cosine over time)
    batch: int = 16
    lr: float = 1.5e-3
    warmup: int = 150
    min_lr_frac: float = 0.0
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.01
    clip: float = 1.0
    bf16: bool = True
    threads: Optional[int] = 0       # 0: auto (probe 1 vs max_threads every probe_every steps, keep the faster)
    max_threads: int = 2
    probe_every: int = 200
    seed: int = 0
    n_digits: int = N_DIGITS
    task: str = TASK                 # a key of TASK_SPECS
    log_every: int = 25
    eval_every: int = 0              # steps between quick held-out evals (0: only at the end)
    eval_n: int = 200
    save_every_s: float = 300.0      # also save OUT/hf every this many seconds (a crash loses little)
    shape: ModelShape = field(default_factory=ModelShape)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if isinstance(self.shape, dict):
            self.shape = ModelShape(**self.shape)


def lr_at(cfg: TrainConfig, step: int, frac: float) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine from the peak to ``min_lr_frac`` x peak as ``frac``
    (progress through the budget, steps or time) goes from the end of warm-up to 1."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(max(frac, 0.0), 1.0)
    lo = cfg.lr * cfg.min_lr_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def cot_loss(model, ids, autocast: bool = True, n_digits: int = N_DIGITS, P: Optional[int] = None):
    """Mean cross-entropy of the chain-of-thought tokens (prompt tokens, the first ``P``, are context only)."""
    import torch
    import torch.nn.functional as F

    P = prompt_len(n_digits) if P is None else P
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids[:, :-1]).logits
    pred = logits[:, P - 1:].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, P:].reshape(-1))


def train(cfg: TrainConfig, echo: Callable[[str], None] = echo_stderr, model=None) -> dict:
    """Train from scratch and save the HF directory ``cfg.out_dir/hf`` (weights, config, tokenizer).

    Writes ``log.jsonl`` (one line per ``log_every`` steps, plus eval lines) and ``train.json`` (config and final
    metrics) in ``cfg.out_dir``. Returns the summary dict.
    """
    import torch

    auto = cfg.threads == 0
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    probe = _ThreadProbe(cfg.max_threads, cfg.probe_every) if auto else None
    thread_log: list[tuple[int, int]] = []
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = make_model(cfg.shape, cfg.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    rng = np.random.Generator(np.random.PCG64([cfg.seed, 0x7A1]))
    log = open(out / "log.jsonl", "w")
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
    spec = task_spec(cfg.task, cfg.n_digits)
    echo(f"[reasoner] {cfg.task}: {n_params / 1e6:.2f} M parameters, batch {cfg.batch} x {spec.prompt_len + spec.cot_len}"
         f" tokens, {'%d steps' % cfg.steps if cfg.steps else '%.1f min' % cfg.minutes}, threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    step, tokens, first_loss, ema = 0, 0, None, None
    t_warm = None
    last_log = last_save = t0
    losses = []
    while True:
        now = time.perf_counter()
        el = now - t0
        if cfg.steps is not None and step >= cfg.steps:
            break
        if budget_s is not None and el >= budget_s:
            break
        if cfg.steps is not None:
            frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        else:
            if step == cfg.warmup:
                t_warm = el
            tw = t_warm if t_warm is not None else 0.0
            frac = (el - tw) / max(1e-9, budget_s - tw)
        lr = lr_at(cfg, step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        if probe is not None:
            n_thr = probe.threads_for(step)
            if n_thr != torch.get_num_threads():
                torch.set_num_threads(n_thr)
            if not thread_log or thread_log[-1][1] != n_thr:
                thread_log.append((step, n_thr))
        ts = time.perf_counter()
        ids = torch.from_numpy(spec.make_batch(rng, cfg.batch))
        loss = cot_loss(model, ids, cfg.bf16, P=spec.prompt_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        if probe is not None:
            probe.record(step, time.perf_counter() - ts)
        step += 1
        tokens += ids.numel()
        lv = float(loss.detach())
        losses.append(lv)
        first_loss = lv if first_loss is None else first_loss
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % cfg.log_every == 0 or step == 1:
            t = time.perf_counter()
            rec = {"step": step, "loss": round(lv, 5), "loss_ema": round(ema, 5), "lr": lr, "grad_norm": float(gn),
                   "time_s": round(t - t0, 2), "tok_s": round(tokens / max(1e-9, t - t0), 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if t - last_log > 20 or step == 1:
                echo(f"[reasoner] step {step} loss {ema:.4f} lr {lr:.2e} {rec['tok_s']:.0f} tok/s {rec['time_s']:.0f} s")
                last_log = t
        if cfg.save_every_s and time.perf_counter() - last_save > cfg.save_every_s:
            save(model, out / "hf")
            last_save = time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0:
            m = evaluate(model, n=min(cfg.eval_n, 64), seed=cfg.seed + 1, n_digits=cfg.n_digits, task=cfg.task)
            model.train()
            rec = {"step": step, "eval": m, "time_s": round(time.perf_counter() - t0, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            echo(f"[reasoner] step {step} eval exact {m['exact']:.3f} token_acc {m['token_acc']:.4f} loss {m['loss']:.4f}")
    train_s = time.perf_counter() - t0
    model.eval()
    hf = save(model, out / "hf")
    summary = {"steps": step, "train_s": round(train_s, 1), "tokens": tokens,
               "tok_s": round(tokens / max(1e-9, train_s), 1), "first_loss": first_loss,
               "last_loss_mean20": float(np.mean(losses[-20:])) if losses else None, "n_params": n_params,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "hf_dir": str(hf),
               "thread_changes": thread_log if auto else None,
               "config": _jsonable(asdict(cfg))}
    if cfg.eval_n:
        te = time.perf_counter()
        summary["eval"] = evaluate(model, n=cfg.eval_n, seed=1_000_000 + cfg.seed, n_digits=cfg.n_digits,
                                   task=cfg.task)
        summary["eval"]["time_s"] = round(time.perf_counter() - te, 1)
        echo(f"[reasoner] held-out n={cfg.eval_n}: exact {summary['eval']['exact']:.3f} "
             f"token_acc {summary['eval']['token_acc']:.4f} loss {summary['eval']['loss']:.4f}")
    log.close()
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"[reasoner] {step} steps in {train_s / 60:.1f} min; saved {hf}")
    return summary


class _ThreadProbe:
    """Thread count for a shared machine: every ``every`` steps, time 4 steps with 1 thread and 4 with ``hi``
    threads (the first of each discarded as warm-up) and keep the faster until the next probe. Measured here under
    load from other processes at nice 19: 1 thread 1.9 s/step, 2 threads 2.6-8.7 s/step (OpenMP barriers stall when
    one thread is descheduled); on an idle machine 2 threads are about twice as fast."""

    def __init__(self, hi: int, every: int):
        self.hi, self.every = max(1, hi), max(20, every)
        self.choice = self.hi
        self.times: dict[int, list[float]] = {}

    def _phase(self, step: int) -> Optional[int]:
        k = step % self.every
        return 1 if k < 4 else (self.hi if k < 8 else None)

    def threads_for(self, step: int) -> int:
        ph = self._phase(step)
        if ph is None and step % self.every == 8 and self.times:
            med = {t: float(np.median(v[1:])) for t, v in self.times.items() if len(v) > 1}
            if len(med) == 2:
                self.choice = min(med, key=med.get)
            self.times = {}
        return ph if ph is not None else self.choice

    def record(self, step: int, seconds: float) -> None:
        ph = self._phase(step)
        if ph is not None:
            self.times.setdefault(ph, []).append(seconds)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def save(model, out_dir: str | os.PathLike) -> Path:
    """Weights (safetensors, float32) + config + tokenizer, loadable by transformers and ``kvtool convert``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    save_tokenizer(d)
    return d


# --- evaluation in PyTorch ----------------------------------------------------------------------------------------
def greedy_chains(model, prompts, n_new: int):
    """Greedy decode ``n_new`` tokens for a batch of equal-length prompts (``[B, P]`` ids), with a KV cache."""
    import torch

    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        gen = [nxt]
        for _ in range(n_new - 1):
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            gen.append(nxt)
    return torch.stack(gen, 1)


def evaluate(model, n: int = 200, seed: int = 1_000_000, n_digits: int = N_DIGITS, batch: int = 100,
             windows=None, sink: int = 4, task: str = TASK) -> dict:
    """Held-out exact match, token accuracy (free-running greedy vs the reference, position by position) and
    teacher-forced chain-of-thought loss. ``windows`` ([layer][kv head], 0 = full) evaluates a head mask with the
    PyTorch reference attention (``toolchain.train.attention``), the same semantics as the runtime."""
    import torch

    model.eval()
    if windows is not None:
        from .attention import load_with_kvtool, unload_kvtool

        load_with_kvtool(model, windows, sink)
    try:
        rng = np.random.Generator(np.random.PCG64([int(seed), 0xE7A1]))
        spec = task_spec(task, n_digits)
        ids = torch.from_numpy(spec.make_batch(rng, n))
        P, C = spec.prompt_len, spec.cot_len
        exact = tok = loss = 0.0
        for i in range(0, n, batch):
            x = ids[i:i + batch]
            gen = greedy_chains(model, x[:, :P], C)
            eq = gen == x[:, P:]
            exact += float(eq.all(1).sum())
            tok += float(eq.float().mean(1).sum())
            with torch.no_grad():
                loss += float(cot_loss(model, x, False, P=P)) * len(x)
    finally:
        if windows is not None:
            unload_kvtool(model)
    return {"n": n, "exact": exact / n, "token_acc": tok / n, "loss": loss / n}


def head_sensitivity(model, sink: int = 4, window: int = 32, n: int = 64, seed: int = 3_000_000,
                     n_digits: int = N_DIGITS, task: str = TASK) -> list[list[float]]:
    """Teacher-forced chain-of-thought loss increase when one KV head alone is compressed (sink + window), for every
    head: an oracle ranking that needs labels (higher = more critical). It is the yardstick a learned gate (RLKV)
    should approach; ``heads.json`` scores read the same way (high = keep full)."""
    import torch

    from .attention import load_with_kvtool, unload_kvtool

    model.eval()
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    rng = np.random.Generator(np.random.PCG64([int(seed), 0x0AC1]))
    spec = task_spec(task, n_digits)
    ids = torch.from_numpy(spec.make_batch(rng, n))
    with torch.no_grad():
        base = float(cot_loss(model, ids, False, P=spec.prompt_len))
    out = [[0.0] * H for _ in range(L)]
    try:
        for layer in range(L):
            for h in range(H):
                w = [[0] * H for _ in range(L)]
                w[layer][h] = window
                load_with_kvtool(model, w, sink)
                with torch.no_grad():
                    out[layer][h] = float(cot_loss(model, ids, False, P=spec.prompt_len)) - base
    finally:
        unload_kvtool(model)
    return out


# --- CLI -----------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m toolchain.train.reasoner", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch and save OUT/hf")
    t.add_argument("--out", default="runs/cpu_reasoner")
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads; 0 = auto (probe 1 vs 2 every 200 steps)")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--eval-n", type=int, default=200)
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    t.add_argument("--task", default=TASK, help="long_addition (default) or cyclic_sum (short prompt, long chain)")
    e = sub.add_parser("eval", help="held-out exact match / token accuracy / loss of a saved HF dir")
    e.add_argument("hf_dir")
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=1_000_000)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--mask", default=None, help="heads.json: evaluate with this mask (PyTorch reference attention)")
    e.add_argument("--task", default=TASK)
    tk = sub.add_parser("tokenizer", help="write the tokenizer files into a directory")
    tk.add_argument("out_dir")
    o = sub.add_parser("oracle", help="heads.json from per-head compression sensitivity (labelled oracle)")
    o.add_argument("hf_dir")
    o.add_argument("-o", "--output", required=True)
    o.add_argument("--sparsity", "-s", type=float, default=0.5)
    o.add_argument("--sink", type=int, default=4)
    o.add_argument("--window", type=int, default=32)
    o.add_argument("--n", type=int, default=64)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--task", default=TASK)
    tx = sub.add_parser("text", help="write N whole sequences back to back (a text for kvtool eval --ppl)")
    tx.add_argument("out_file")
    tx.add_argument("--n", type=int, default=100)
    tx.add_argument("--seed", type=int, default=2_000_000)
    a = ap.parse_args(argv)
    if a.cmd == "train":
        if a.minutes is None and a.steps is None:
            ap.error("give --minutes or --steps")
        cfg = TrainConfig(out_dir=a.out, minutes=a.minutes, steps=a.steps, seed=a.seed, threads=a.threads,
                          batch=a.batch, lr=a.lr, eval_every=a.eval_every, eval_n=a.eval_n, bf16=not a.fp32,
                          task=a.task)
        s = train(cfg)
        print(json.dumps({k: v for k, v in s.items() if k != "config"}, indent=2))
    elif a.cmd == "eval":
        import torch

        torch.set_num_threads(a.threads)
        model, _ = load_hf(a.hf_dir)
        windows, sink = None, 4
        if a.mask:
            from ..heads import HeadsMask

            m = HeadsMask.load(a.mask)
            windows, sink = m.head_window(), m.sink
        t0 = time.perf_counter()
        r = evaluate(model, n=a.n, seed=a.seed, windows=windows, sink=sink, task=a.task)
        r["time_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(r))
    elif a.cmd == "oracle":
        import torch

        from ..heads import HeadsMask

        torch.set_num_threads(a.threads)
        model, _ = load_hf(a.hf_dir)
        sc = head_sensitivity(model, a.sink, a.window, a.n, task=a.task)
        # heads.json has no "oracle" method: "manual" scores, with the provenance in extra
        m = HeadsMask.from_scores(sc, a.sparsity, "manual", sink=a.sink, window=a.window)
        m.extra = {"source": "toolchain.train.reasoner oracle: teacher-forced CoT loss increase when the head alone "
                             "is compressed", "n": a.n}
        m.save(a.output)
        print(json.dumps({"scores": sc, "output": a.output}))
    elif a.cmd == "text":
        Path(a.out_file).write_text(sequences_text(a.n, a.seed))
        print(a.out_file)
    else:
        print(save_tokenizer(a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
