"""What both trainers (``rlkv`` for head gates, ``beacons`` for beacon tokens) share: devices and dtypes, model
loading, GRPO advantages and the clipped objective, left-padded batches, RNG state, and atomic, resumable checkpoints.

Why one module: the two trainers must agree on these exactly (a checkpoint of one layout, one resume rule, one
advantage definition); a copy in each drifts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import KvtoolError
from ..heads import write_atomic


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − group mean) / (group std + eps) for rewards laid out group-contiguous ([p0 g0, p0 g1, ..., p1 g0, ...]).

    std is the unbiased sample std (as in DeepSeekMath's GRPO and TRL); a group whose rewards are all equal gets 0.
    """
    r = rewards.float().reshape(-1, group)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      eps: float = 0.2) -> torch.Tensor:
    """Sum over completion tokens of the PPO-clip loss −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = exp(logp − old_logp).

    ``logp``/``old_logp``/``mask`` [N, T], ``adv`` [N]. Returns a sum: the caller divides by the batch's token count.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv.to(logp.dtype).unsqueeze(1)
    obj = torch.minimum(ratio * a, ratio.clamp(1.0 - eps, 1.0 + eps) * a)
    return -(obj * mask.to(obj.dtype)).sum()


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Problems of (1-based) ``step``: consecutive slices of a per-epoch seeded permutation. Stateless, so a resumed
    run picks the same problems as an uninterrupted one."""
    out, perms = [], {}
    for k in range((step - 1) * batch, step * batch):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][pos]))
    return out


def dist_rank_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist_rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def init_dist(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def resolve_device(name: str) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise KvtoolError("--device cuda but torch sees no CUDA device (use --device cpu)")
        if "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif name != "cpu" and not name.startswith("cuda:"):
        raise KvtoolError(f"--device must be auto, cuda or cpu, got {name!r}")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "f32": torch.float32}[name]


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face directory or a GGUF file (dequantized by transformers ``gguf_file=``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_dir():
        src, kw = p, {}
    elif p.is_file() and p.suffix.lower() == ".gguf":
        src, kw = p.parent, {"gguf_file": p.name}
    else:
        raise KvtoolError(f"--model {path}: not a Hugging Face directory or a .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except (OSError, ValueError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise KvtoolError(f"cannot load {path} with transformers: {msg}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()  # no dropout: the sampling and the loss see the same function
    return model, tok


def eos_ids(model, tok) -> list[int]:
    ids = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(x) for x in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise KvtoolError("the tokenizer has no EOS token: cannot tell where a completion ends")
    return sorted(ids)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
            attn[i, P - len(s):] = 1
    return ids, attn


def positions(attn: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` uses with left padding: real tokens count from 0."""
    return (attn.long().cumsum(-1) - 1).clamp(min=0)


def row_slices(n: int, micro: int) -> list[slice]:
    micro = micro or n
    return [slice(i, min(n, i + micro)) for i in range(0, n, micro)]


def rng_state() -> dict:
    st = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in st["python"]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_path(out_dir, step: int) -> Path:
    return Path(out_dir) / "ckpt" / f"step_{step}.pt"


def latest_checkpoint(out_dir) -> Optional[Path]:
    d = Path(out_dir) / "ckpt"
    found = []
    for f in d.glob("step_*.pt") if d.is_dir() else []:
        try:
            found.append((int(f.stem.split("_", 1)[1]), f))
        except ValueError:
            continue
    return max(found)[1] if found else None


def save_state_atomic(state: dict, path: Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def open_out_dir(out_dir, resume: bool):
    """(out_dir, log path, latest checkpoint or None); a used out-dir without --resume is refused."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise KvtoolError(f"{out_dir} already holds checkpoints (latest {ckpt.name}): pass --resume or another --out-dir")
    return out_dir, out_dir / "log.jsonl", ckpt


def load_state(path: Path, fmt: str, what: str) -> dict:
    """A checkpoint dict of format ``fmt``, or one KvtoolError line (``what`` names the kind of checkpoint)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KvtoolError(f"{path}: not a readable kvtool checkpoint ({e.__class__.__name__})") from None
    if not isinstance(st, dict) or st.get("format") != fmt:
        raise KvtoolError(f"{path}: not a kvtool {what} checkpoint")
    return st


def config_mismatch(saved: dict, cfg: Any, resumable: set) -> list[str]:
    """The settings of ``cfg`` (a dataclass) that differ from a checkpoint's, except the ``resumable`` ones."""
    now = dataclasses.asdict(cfg)
    bad = []
    for k, v in now.items():
        if k in resumable or k not in saved:
            continue
        old = saved[k]
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(old, tuple):
            old = list(old)
        if k == "model":
            v, old = str(Path(v).resolve()), str(Path(old).resolve())
        if old != v:
            bad.append(f"{k} ({old!r} in the checkpoint, {v!r} now)")
    return bad


def rewrite_log(path: Path, upto: int) -> None:
    """Drop log lines past the resumed step (they belong to the interrupted tail)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= upto:
                keep.append(line)
        except (json.JSONDecodeError, ValueError, AttributeError):
            continue
    write_atomic(path, ("\n".join(keep) + "\n" if keep else "").encode("utf-8"))
