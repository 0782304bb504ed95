"""``kvtool train``: learn which KV heads to keep in full (RLKV gates, or the DuoAttention-style baseline), and the
supervised warm-up that gives a small model something for RLKV to reward.

Thin shells over ``toolchain.train.rlkv.train`` and ``toolchain.train.warmup.train``; torch and transformers are imported only when a command runs, so
``kvtool --help`` works on an edge install without the train extras.
"""
from __future__ import annotations

import click

from ..errors import KvtoolError
from ..heads import DEFAULT_SINK, DEFAULT_WINDOW

EXTRAS_MSG = "kvtool train needs the train extras: pip install 'kvtool[train]'"


def require_train_extras() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise KvtoolError(EXTRAS_MSG) from None


@click.group("train")
def train() -> None:
    """Training: RLKV head gates (`heads`), supervised warm-up (`warmup`), beacons (`beacons`)."""


@train.command("heads")
@click.option("--model", required=True, type=click.Path(exists=True),
              help="Hugging Face model directory, or a .gguf file (dequantized by transformers).")
@click.option("--task", "tasks", multiple=True, default=("chain_sum",), show_default=True,
              help="reasoning-gym task, repeatable; options as name:key=value,key=value.")
@click.option("--method", type=click.Choice(["rlkv", "duo"]), default="rlkv", show_default=True,
              help="rlkv: GRPO + adaptive L1 (paper). duo: match full hidden states on passkey data + L1.")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimiser steps.")
@click.option("--batch", type=int, default=8, show_default=True, help="Prompts (duo: passkey sequences) per step.")
@click.option("--group", type=int, default=4, show_default=True, help="Samples per prompt (G).")
@click.option("--sink", type=int, default=DEFAULT_SINK, show_default=True, help="Sink tokens of the stream branch.")
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True, help="Window of the stream branch.")
@click.option("--l1", type=float, default=None, help="L1 weight: β of β′ (rlkv, default 1e-3) or λ (duo, default 0.05).")
@click.option("--tau", type=float, default=0.5, show_default=True, help="Reward threshold τ of the adaptive L1.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Adam learning rate for the gates.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Completion length cap.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--pool", type=int, default=256, show_default=True,
              help="Problems sampled for the self-distillation filter (the training set before filtering).")
@click.option("--no-filter", is_flag=True, help="Skip self-distillation: train on the whole pool.")
@click.option("--seq-len", type=int, default=0, help="duo: passkey sequence length (default 4*(sink+window), >= 128).")
@click.option("--micro-batch", type=int, default=0, help="Rows per backward pass (0: all; lowers memory).")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f32"]), default="auto", show_default=True,
              help="Model dtype (auto: bf16 on CUDA, f32 on CPU). Gates are always f32.")
@click.option("--sparsity", "-s", type=float, default=0.5, show_default=True,
              help="Fraction of KV heads compressed in the output heads.json.")
@click.option("--out-dir", type=click.Path(file_okay=False), default="runs/kvtool-heads", show_default=True,
              help="Checkpoints, log.jsonl, gates.png/tsv, self-distillation cache.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out-dir.")
@click.option("--tensorboard", is_flag=True, help="Also log scalars to OUT_DIR/tb (needs tensorboard).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="heads.json to write (default OUT_DIR/heads.json).")
def heads_cmd(model, tasks, method, steps, batch, group, sink, window, l1, tau, lr, max_new_tokens, temperature, pool,
              no_filter, seq_len, micro_batch, device, dtype, sparsity, out_dir, save_every, resume, tensorboard, seed,
              quiet, output):
    """Train per-KV-head gates and write heads.json (scores = gates) plus a heatmap.

    \b
    Example (GPU):
      kvtool train heads --model ./SmolLM2-135M-Instruct --task chain_sum --task basic_arithmetic \\
        --steps 200 --batch 16 --group 4 --sink 16 --window 64 -o heads.json
    """
    require_train_extras()
    from ..train.rlkv import TrainConfig
    from ..train.rlkv import train as run_train

    cfg = TrainConfig(model=model, tasks=tuple(tasks), method=method, steps=steps, batch=batch, group=group, sink=sink,
                      window=window, l1=l1, tau=tau, lr=lr, max_new_tokens=max_new_tokens, temperature=temperature,
                      pool=pool, filter=not no_filter, seq_len=seq_len, micro_batch=micro_batch, device=device,
                      dtype=dtype, sparsity=sparsity, out_dir=out_dir, output=output, save_every=save_every,
                      seed=seed, resume=resume, tensorboard=tensorboard)
    run_train(cfg, progress=not quiet)


@train.command("warmup")
@click.option("--model", required=True, type=click.Path(exists=True),
              help="Hugging Face model directory, or a .gguf file (dequantized by transformers).")
@click.option("-o", "--output", required=True, type=click.Path(), help="HF directory to write (renamed into place).")
@click.option("--task", "tasks", multiple=True, default=None,
              help="Task with worked solutions, repeatable (default chain_sum:min_terms=2,max_terms=3,max_digits=1).")
@click.option("--steps", type=int, default=20, show_default=True, help="Optimiser steps.")
@click.option("--batch", type=int, default=8, show_default=True, help="Examples per step.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3 with LoRA, 1e-4 with --lora-rank 0).")
@click.option("--lora-rank", type=int, default=16, show_default=True,
              help="LoRA adapters of rank R (peft), merged into the output; 0: fine-tune every weight.")
@click.option("--train-problems", type=int, default=2000, show_default=True,
              help="Problems generated for traces (held-out questions are removed).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the training problems and batch order.")
@click.option("--eval-pool", type=int, default=32, show_default=True,
              help="Held-out problems scored before and after (0: none). Use train heads' --pool to see its filter.")
@click.option("--eval-seed", type=int, default=0, show_default=True, help="= train heads' --seed (its pool is held out).")
@click.option("--eval-group", type=int, default=4, show_default=True, help="Samples per held-out problem (= --group).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Eval completion length cap.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Eval sampling temperature.")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f32"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def warmup_cmd(model, output, tasks, steps, batch, lr, lora_rank, train_problems, seed, eval_pool, eval_seed,
               eval_group, max_new_tokens, temperature, device, dtype, force, quiet):
    """Fine-tune on worked solutions in the <answer> format, so RLKV's self-distillation filter keeps problems.

    \b
    Example (CPU, SmolLM2-135M-Instruct):
      kvtool train warmup --model ./SmolLM2-135M-Instruct -o ./smollm2-warm --steps 20 --batch 8
      kvtool train heads --model ./smollm2-warm --task chain_sum:min_terms=2,max_terms=3,max_digits=1 ...
    """
    require_train_extras()
    from ..train.warmup import DEFAULT_TASK, WarmupConfig
    from ..train.warmup import train as run_warmup

    cfg = WarmupConfig(model=model, output=output, tasks=tuple(tasks) or (DEFAULT_TASK,), steps=steps, batch=batch,
                       lr=lr, lora_rank=lora_rank, train_problems=train_problems, seed=seed, eval_pool=eval_pool,
                       eval_seed=eval_seed, eval_group=eval_group, max_new_tokens=max_new_tokens,
                       temperature=temperature, device=device, dtype=dtype, force=force)
    run_warmup(cfg, progress=not quiet)


from .train_beacons import beacons_cmd  # noqa: E402

train.add_command(beacons_cmd)
