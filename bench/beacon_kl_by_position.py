"""Teacher-forced KL(teacher || student) and argmax accuracy by position inside the beacon chunk, for a `kvtool train
beacons` checkpoint: shows which tokens after an eviction the beacons fail to carry.

Usage: python bench/beacon_kl_by_position.py HF_DIR CKPT.pt TASK C N  (TASK from toolchain.train.reasoner)
"""
import sys, torch
torch.set_num_threads(1)
import toolchain.train.reasoner
from toolchain.train import beacons as tb
from toolchain.train.rlkv import load_model
from toolchain.tasks import make_dataset, encode_prompt
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
lt, ls = torch.log_softmax(t, -1), torch.log_softmax(st, -1)
kl = (lt.exp() * (lt - ls)).sum(-1)  # [B, T]
T = kl.shape[1]
by = [float(kl[:, j::c].mean()) for j in range(c)]
print("mean", float(kl.mean()), "by position in chunk:", [round(x, 3) for x in by])
acc = (st.argmax(-1) == torch.tensor(comps)).float()
print("argmax acc by position:", [round(float(acc[:, j::c].mean()), 3) for j in range(c)])
