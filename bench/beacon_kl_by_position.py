"""Teacher-forced KL(teacher || student) and argmax accuracy by position inside the beacon chunk, for a `kvtool train
beacons` checkpoint: shows which tokens after an eviction the beacons fail to carry.

Usage: python bench/beacon_kl_by_position.py HF_DIR CKPT.pt TASK C N  (TASK from toolchain.tasks)
"""
import sys

import torch

from toolchain.tasks import encode_prompt, make_dataset
from toolchain.train import beacons as tb
from toolchain.train.common import load_model


def main() -> None:
    torch.set_num_threads(1)
    hf, ckpt, task, c, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    cfg = tb.BeaconTrainConfig(model=hf, tasks=(task,), interval=c, full=True, reuse_token=3)
    model, tok = load_model(hf)
    s = tb.prepare(model, tok, cfg)
    tb.restore(s, tb.make_optimizer(s, cfg), tb.load_checkpoint(ckpt))
    probs = make_dataset(task, n, 5)
    prompts = [encode_prompt(p, tok) for p in probs]
    comps = [tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in probs]
    with torch.no_grad():
        t = tb.teacher_logits(s, prompts, comps)
        st = tb.student_logits(s, tb.student_batch(prompts, comps, c, s.beacon_id, tok.pad_token_id))
    kl = tb.per_token_kl(t, st)  # [B, T]; the reasoner's chains have one length, so no padding to mask
    acc = (st.argmax(-1) == torch.tensor(comps)).float()
    print("mean", float(kl.mean()), "by position in chunk:", [round(float(kl[:, j::c].mean()), 3) for j in range(c)])
    print("argmax acc by position:", [round(float(acc[:, j::c].mean()), 3) for j in range(c)])


if __name__ == "__main__":
    main()
