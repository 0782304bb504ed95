#!/usr/bin/env python3
"""How often a greedy answer differs between a lone request and eight concurrent ones (issue 18, docs/running.md).

Straight on the patched llama-server (``kvtool tools``), kvtool's settings (8 slots of 512 tokens, f16 cache, flash
attention, ubatch 64, one thread), stock (``--override-kv kvtool.kv.enabled=bool:false``) or mixed, with prompt
reuse off (``cache_prompt: false``, ``--cache-ram 0``) so that every request prefills its whole prompt. Each round:
the prompts one at a time (with llama-server's top-2 logprobs, whose gap is the greedy pick's logit margin), then
all eight at once, each client starting after a random delay of up to ``--stagger`` seconds. Prints the differing answers per round and each prompt's smallest margin.

Usage: bench/greedy_flips.py MODEL [--stock] [--rounds 15] [--stagger 0.05] [--prompts old|clear] [--tokens 48]
"""
from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.runtime.tools import tool_path  # noqa: E402

WORDS = {"old": ("side", "number", "sound", "time", "way", "day", "word", "people"),  # the test's earlier prompts
         "clear": ("point", "place", "part", "river", "group", "number", "time", "work")}  # tests' CLEAR_PROMPTS


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--stock", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--stagger", type=float, default=0.05)
    ap.add_argument("--prompts", choices=sorted(WORDS), default="old")
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    prompts = [f"the {w} of water is" for w in WORDS[a.prompts]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(tool_path("llama-server")), "-m", a.model, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", "8", "--ctx-size", str(512 * 8), "--no-kv-unified", "--cont-batching", "--flash-attn", "on",
            "--ubatch-size", "64", "--batch-size", "2048", "-ctk", "f16", "-ctv", "f16", "-ngl", "0", "--seed", "0",
            "--no-webui", "--fit", "off", "--no-warmup", "--threads", "1", "--threads-batch", "1", "--cache-ram", "0"]
    if a.stock:
        args += ["--override-kv", "kvtool.kv.enabled=bool:false"]
    log = tempfile.NamedTemporaryFile(prefix="greedy-flips-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        def req(p: str, probs: bool = False) -> dict:
            body = {"prompt": p, "max_tokens": a.tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
            if probs:
                body["n_probs"] = 2
            return httpx.post(base + "/v1/completions", json=body, timeout=300).json()["choices"][0]

        total, gaps = 0, []
        for rnd in range(a.rounds):
            alone, gaps = [], []
            for p in prompts:
                c = req(p, True)
                alone.append(c["text"])
                gaps.append(min(t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"]
                                for t in c["logprobs"]["content"]))
            got, bar = {}, threading.Barrier(len(prompts))

            def run(i: int, got: dict = got, bar: threading.Barrier = bar) -> None:
                bar.wait(30)
                time.sleep(random.random() * a.stagger)
                try:
                    got[i] = req(prompts[i])["text"]
                except Exception as e:  # a dead server shows as differing answers, with the reason
                    got[i] = repr(e)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            bad = [i for i in range(len(prompts)) if got[i] != alone[i]]
            total += len(bad)
            print(f"round {rnd}: differing {bad}" + (f" (their smallest lone margins {[round(gaps[i], 5) for i in bad]})"
                                                     if bad else ""), flush=True)
        print(f"{'stock' if a.stock else 'mixed'}, {a.prompts} prompts: {total} of {len(prompts) * a.rounds} answers "
              f"differ; smallest lone margin per prompt {[round(g, 5) for g in gaps]}")
    finally:
        proc.terminate()
        proc.wait()
        log.close()
        Path(log.name).unlink()


if __name__ == "__main__":
    main()
