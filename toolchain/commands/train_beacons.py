"""``kvtool train beacons``: teach a model to compress its reasoning into beacon tokens (Breadcrumbs Reasoning).

A thin shell over ``toolchain.train.beacons.train``; torch, transformers and peft are imported only when the command
runs, so ``kvtool --help`` works on an edge install. ``beacons_cmd`` is added to the ``train`` group by cli/train.py.
"""
from __future__ import annotations

import click

from ..errors import KvtoolError


def parse_intervals(text: str) -> tuple:
    """``"16"`` -> (16,); ``"8,16,32"`` -> (8, 16, 32) sorted; one error line naming a bad value."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise KvtoolError(f"--interval must be >= 1 (one integer or a list such as 8,16,32), got {part!r}")
        out.append(int(part))
    return tuple(sorted(set(out)))


def _require_extras(full: bool) -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise KvtoolError("kvtool train needs the train extras: pip install 'kvtool[train]'") from None
    if not full:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise KvtoolError("LoRA training needs peft: pip install peft (or train every weight with --full)") from None


@click.command("beacons")
@click.option("--model", required=True, type=click.Path(exists=True),
              help="Hugging Face model directory, or a .gguf file (dequantized by transformers).")
@click.option("--task", "tasks", multiple=True, default=("chain_sum",), show_default=True,
              help="reasoning-gym task, repeatable; options as name:key=value,key=value.")
@click.option("--interval", "-c", default="16", show_default=True,
              help="A beacon every C generated tokens; a list such as 8,16,32 trains one beacon for all of them "
                   "(each sequence draws its c) and the file can run at any of them (--beacon-interval at load).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimiser steps.")
@click.option("--batch", type=int, default=4, show_default=True, help="Problems per step.")
@click.option("--group", type=int, default=2, show_default=True, help="Teacher rollouts per problem.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Rollout length cap.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature of rollouts.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate (LoRA or all weights).")
@click.option("--beacon-lr", type=float, default=1e-3, show_default=True, help="Learning rate of the beacon embedding.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="Learning-rate schedule after warm-up (cosine decays to 0 at --steps).")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--full", is_flag=True, help="Train every weight (default: LoRA adapters + the beacon embedding).")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=int, default=32, show_default=True)
@click.option("--reuse-token", type=int, default=None,
              help="Use this existing token id as the beacon instead of adding <|beacon|> (the token is repurposed).")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="heads.json: train under its per-head windows, for a file converted with the same --mask.")
@click.option("--distill-on", type=click.Choice(["all", "correct"]), default="all", show_default=True,
              help="Distil on every teacher rollout, or only on those the verifier accepts.")
@click.option("--rl-weight", type=float, default=0.0, show_default=True,
              help="Weight of the GRPO term on the student's compressed-mode rollouts (0: off; costs student sampling).")
@click.option("--rl-group", type=int, default=4, show_default=True, help="Student samples per problem for GRPO.")
@click.option("--micro-batch", type=int, default=0, help="Rows per backward pass (0: all; lowers memory).")
@click.option("--pool", type=int, default=1024, show_default=True, help="Problems drawn from the task(s).")
@click.option("--device", default="auto", show_default=True, help="auto | cuda | cpu")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f32"]), default="auto", show_default=True,
              help="Model dtype (auto: bf16 on CUDA, f32 on CPU).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="runs/kvtool-beacons", show_default=True,
              help="Checkpoints and log.jsonl.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="HF checkpoint directory to write (default OUT_DIR/model).")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out-dir.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def beacons_cmd(model, tasks, interval, steps, batch, group, max_new_tokens, temperature, lr, beacon_lr, weight_decay,
                lr_schedule, warmup, full, lora_r, lora_alpha, reuse_token, mask, distill_on, rl_weight, rl_group,
                micro_batch, pool, device, dtype, out_dir, output, save_every, resume, seed, quiet):
    """Train beacon compression (distillation from the beacon-free model, optional GRPO) and write an HF checkpoint
    with the beacon token and kvtool.json; then `kvtool convert CKPT_DIR -o m.gguf`.

    \b
    Example (GPU):
      kvtool train beacons --model ./Qwen2.5-0.5B-Instruct --task chain_sum --interval 16 \\
        --steps 500 --batch 8 --group 4 --max-new-tokens 512 -o beacon-ckpt
      kvtool convert beacon-ckpt -o beacon.gguf
    """
    cs = parse_intervals(interval)
    _require_extras(full)
    from ..train.beacons import BeaconTrainConfig
    from ..train.beacons import train as run_train

    cfg = BeaconTrainConfig(model=model, tasks=tuple(tasks), interval=cs[0], intervals=cs, steps=steps, batch=batch, group=group,
                            max_new_tokens=max_new_tokens, temperature=temperature, lr=lr, beacon_lr=beacon_lr,
                            weight_decay=weight_decay, lr_schedule=lr_schedule, warmup=warmup, full=full,
                            lora_r=lora_r, lora_alpha=lora_alpha, reuse_token=reuse_token, mask=mask,
                            distill_on=distill_on, rl_weight=rl_weight, rl_group=rl_group,
                            micro_batch=micro_batch, pool=pool, device=device, dtype=dtype, out_dir=out_dir,
                            output=output, save_every=save_every, seed=seed, resume=resume)
    run_train(cfg, progress=not quiet)
