"""Which prompt format makes SmolLM2 retrieve the passkey: raw completion vs the chat template (issue 21).

The first ``--n`` problems of ``passkey:ctx=CTX`` (seed 0), full cache, greedy: once as the task's raw prompt, once
with the question turned into a user turn of the GGUF's chat template (the template adds tokens, so the context is
``CTX + 64``). Prints one line per problem and the accuracy of each format::

    python bench/passkey_format_probe.py ~/.cache/kvtool/models/SmolLM2-135M-Instruct.Q4_1.gguf --n 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.runtime.decode import greedy  # noqa: E402
from toolchain.runtime.model import Model  # noqa: E402
from toolchain.tasks.passkey import make_problems, score_completion  # noqa: E402

ANSWER_STEM = " The pass key is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=1024)
    a = ap.parse_args()
    m = Model.load(a.model, n_ctx=a.ctx + 64, n_ubatch=128, mixed=False)
    probs = make_problems(a.n, 0, ctx=a.ctx, count_tokens=lambda t: len(m.tokenize(t)))
    for mode in ("raw", "chat"):
        ok = 0
        for p in probs:
            if mode == "raw":
                toks, stops, cap = m.tokenize(p.prompt), [], 12
            else:  # the question without the answer stem, as a user turn
                toks, stops = m.render_chat([{"role": "user", "content": p.prompt[: -len(ANSWER_STEM)]}])
                cap = 24
            t0 = time.time()
            g = greedy(m, toks, cap, stops)
            s = score_completion(g["text"], p.entry)
            ok += s
            print(mode, len(toks), round(p.info["depth"], 3), p.answer, repr(g["text"]), s,
                  f"{time.time() - t0:.1f}s", flush=True)
        print(f"{mode}: {ok:g}/{len(probs)}", flush=True)
    m.close()


if __name__ == "__main__":
    main()
