"""SmolLM2-135M at equal KV memory: trained (Duo) head masks vs random masks vs stock KV quantization (issue 21).

Rows: full f16; stock+q8_0; stock+q4_0; mixed with the trained mask at s = 0.25, 0.5, 0.75; three random masks
(seeds 0, 1, 2) at each s; every head compressed (s = 1.0, StreamingLLM-style sink + window); mixed+q8_0 with the
trained mask at s = 0.5. Per row: passkey accuracy per context (``kvtool eval --task passkey:ctx=N``, Wilson 95%
CI), the KV bytes the runtime allocated (``kvtool_kv_bytes`` through ``Model.kv_stats``, measured at each context),
and ppl / mean KL / top-1 agreement against the full f16 load on Verne (``kvtool eval --ppl verne``).

Steps, each resumable (eval's .jsonl records, one ppl JSON per file), so a run can stop and go on under the
shared CPU lock::

    python bench/smollm2_equal_memory.py prepare --heads heads.json   # masks + GGUFs into --work
    python bench/smollm2_equal_memory.py passkey --ctx 1024 --n 50 [--rows full,trained_s0.5,...]
    python bench/smollm2_equal_memory.py ppl [--rows ...]
    python bench/smollm2_equal_memory.py report                       # docs/benchmarks_smollm2/

Why ``--ubatch 128``: a compressed head's ring is pad256(W + S + ubatch) cells; with W = 64, S = 16 any ubatch up
to 176 gives 256 cells, so 128 keeps rings at their floor. The work folder (GGUFs, raw eval logs with machine
paths) stays out of git; ``report`` writes only file names and relative paths into ``docs/``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolchain.errors import KvtoolError  # noqa: E402

SPARSITIES = (0.25, 0.5, 0.75)
SEEDS = (0, 1, 2)
UBATCH = 128
MAX_TOKENS = 8
PPL_TOKENS, PPL_CTX = 4096, 1024
DOCS = ROOT / "docs" / "benchmarks_smollm2"
MODEL = Path("~/.cache/kvtool/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()


def _s(s: float) -> str:
    return f"{s:g}"


def rows() -> list[dict]:
    """The table: name, the GGUF it runs on (a stem in --work), the eval variant, and what it is."""
    t50 = "trained_s0.5"
    # full and stock rows: any file with budgets, loaded with kvtool.kv.enabled=false (same weights, every head full,
    # flash attention on as in the mixed rows); this one exists before the trained mask does
    ref = "random_s0.5_seed0"
    out = [{"name": "full", "file": ref, "variant": "full", "kind": "full", "s": 0.0},
           {"name": "stock+q8_0", "file": ref, "variant": "stock+q8_0", "kind": "quant", "s": 0.0},
           {"name": "stock+q4_0", "file": ref, "variant": "stock+q4_0", "kind": "quant", "s": 0.0}]
    for s in SPARSITIES:
        out.append({"name": f"trained_s{_s(s)}", "file": f"trained_s{_s(s)}", "variant": "mixed", "kind": "trained",
                    "s": s})
    for s in SPARSITIES:
        for seed in SEEDS:
            out.append({"name": f"random_s{_s(s)}_seed{seed}", "file": f"random_s{_s(s)}_seed{seed}",
                        "variant": "mixed", "kind": "random", "s": s, "seed": seed})
    out.append({"name": "all_compressed", "file": "all_compressed", "variant": "mixed", "kind": "streaming", "s": 1.0})
    out.append({"name": "trained_s0.5+q8_0", "file": t50, "variant": "mixed+q8_0", "kind": "trained+q8_0", "s": 0.5})
    return out


def pick(names: str | None) -> list[dict]:
    all_rows = rows()
    if not names:
        return all_rows
    want = [x.strip() for x in names.split(",") if x.strip()]
    known = {r["name"] for r in all_rows}
    bad = [w for w in want if w not in known]
    if bad:
        raise KvtoolError(f"unknown row {bad[0]!r} (rows: {', '.join(r['name'] for r in all_rows)})")
    return [r for r in all_rows if r["name"] in want]


def kvtool(*args: str) -> None:
    """One ``kvtool`` command, echoed, so the log holds the exact commands."""
    cmd = [sys.executable, "-m", "toolchain.cli", *args]
    print("$ kvtool " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# --- prepare --------------------------------------------------------------------------------------------------
def prepare(work: Path, heads: Path | None, model: Path) -> None:
    """Masks and GGUFs (streaming copies with kvtool.* keys; tensors untouched). Without ``heads`` the trained
    files are left for a later call."""
    work.mkdir(parents=True, exist_ok=True)
    for s in SPARSITIES:
        out = work / f"trained_s{_s(s)}.gguf"
        if heads is not None and not out.exists():
            kvtool("convert", str(model), "--mask", str(heads), "-s", _s(s), "-o", str(out))
        for seed in SEEDS:
            mask = work / f"random_s{_s(s)}_seed{seed}.json"
            out = work / f"random_s{_s(s)}_seed{seed}.gguf"
            if not mask.exists():
                kvtool("heads", "random", "--model", str(model), "-s", _s(s), "--seed", str(seed), "-o", str(mask))
            if not out.exists():
                kvtool("convert", str(model), "--mask", str(mask), "-o", str(out))
    mask, out = work / "all_compressed.json", work / "all_compressed.gguf"
    if not mask.exists():
        kvtool("heads", "random", "--model", str(model), "-s", "1.0", "--seed", "0", "-o", str(mask))
    if not out.exists():
        kvtool("convert", str(model), "--mask", str(mask), "-o", str(out))


# --- measurements ---------------------------------------------------------------------------------------------
def _groups(sel: list[dict]) -> dict[str, list[str]]:
    """file stem -> its variants among the selected rows (one eval or ppl run per file)."""
    g: dict[str, list[str]] = {}
    for r in sel:
        g.setdefault(r["file"], []).append(r["variant"])
    return g


def passkey(work: Path, sel: list[dict], ctx: int, n: int, threads: int) -> None:
    from toolchain.eval import run_eval

    (work / "eval").mkdir(exist_ok=True)
    for stem, variants in _groups(sel).items():
        out = work / "eval" / f"passkey_ctx{ctx}_{stem}.json"
        print(f"$ kvtool eval {stem}.gguf --task passkey:ctx={ctx} --n {n} --seed 0 --variants {','.join(variants)} "
              f"--max-tokens {MAX_TOKENS} --n-ctx {ctx} --ubatch {UBATCH} --threads {threads} --out {out.name}",
              flush=True)
        run_eval([work / f"{stem}.gguf"], f"passkey:ctx={ctx}", n=n, seed=0, variants=variants,
                 max_tokens=MAX_TOKENS, n_ctx=ctx, n_ubatch=UBATCH, cache_type="f16", threads=threads, out=out,
                 progress=True, echo=print)


def ppl(work: Path, sel: list[dict], threads: int) -> None:
    from toolchain.eval import run_ppl
    from toolchain.heads import write_atomic

    (work / "ppl").mkdir(exist_ok=True)
    for stem, variants in _groups(sel).items():
        out = work / "ppl" / f"{stem}.json"
        if out.exists():
            print(f"[skip] {out.name} exists", flush=True)
            continue
        quant = [v for v in variants if "+" in v]
        mixed = "mixed" in variants
        vs = ",".join((["mixed"] if mixed else ["full"]) + quant)
        print(f"$ kvtool eval {stem}.gguf --ppl verne --ppl-tokens {PPL_TOKENS} --n-ctx {PPL_CTX} --ubatch {UBATCH} "
              f"--cache-type f16 --variants {vs} --threads {threads} --out {out.name}", flush=True)
        res = run_ppl(work / f"{stem}.gguf", "verne", n_ctx=PPL_CTX, max_tokens=PPL_TOKENS, n_ubatch=UBATCH,
                      cache_type="f16", threads=threads, mixed=mixed, progress=True, echo=print, kv_variants=quant)
        write_atomic(out, (json.dumps(res, indent=1) + "\n").encode())


# --- report ---------------------------------------------------------------------------------------------------
def _eval_rows(work: Path, recs: list[dict]) -> dict[tuple[int, str, str], dict]:
    """(ctx, file stem, variant) -> a summary made from the per-problem records (not the eval JSON: a run stopped
    and resumed with fewer variants rewrites that JSON with only its own rows; the records keep everything)."""
    from converters.gguf_budgets import read_budgets

    groups: dict[tuple[int, str, str], dict[int, dict]] = {}
    for x in recs:  # a later record of the same problem replaces an earlier one
        groups.setdefault((x["ctx"], x["file"], x["variant"]), {})[int(x["index"])] = x
    found = {}
    for (ctx, stem, variant), by_index in groups.items():
        mine = list(by_index.values())
        keys = {x["key"] for x in mine}
        if len(keys) > 1:
            raise KvtoolError(f"{stem} {variant} at ctx {ctx}: records of {len(keys)} different run settings")
        b = read_budgets(work / f"{stem}.gguf")
        flat = [w for r in b.head_window for w in r] if b is not None and b.head_window else []
        mixed = bool(mine[-1]["mixed_active"])
        pre_t, pre_s = sum(x["prompt_tokens"] for x in mine), sum(x["prefill_s"] for x in mine)
        found[(ctx, stem, variant)] = {
            "n": len(mine), "correct": sum(1 for x in mine if x["reward"] >= 1.0),
            "allocated_kv_bytes": mine[-1]["allocated_kv_bytes"], "stock_kv_bytes": mine[-1]["stock_kv_bytes"],
            "mixed_active": mixed, "compressed_heads": sum(1 for w in flat if w > 0) if mixed else 0,
            "kv_heads": len(flat) or None, "cache_type": mine[-1]["cache_type"],
            "prefill_tok_s": pre_t / pre_s if pre_s > 0 else None, "records": mine}
    return found


def _records(work: Path) -> list[dict]:
    out = []
    for p in sorted((work / "eval").glob("passkey_ctx*_*.jsonl")):
        ctx = int(p.name.split("_")[1][3:])
        stem = p.stem.split("_", 2)[2]
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            out.append({"ctx": ctx, "file": stem, **r})
    return out


def report(work: Path) -> None:
    from toolchain.eval import wilson
    from toolchain.heads import write_atomic

    DOCS.mkdir(parents=True, exist_ok=True)
    recs = _records(work)
    evals = _eval_rows(work, recs)
    table = []
    for row in rows():
        entry = {k: row[k] for k in ("name", "kind", "s", "variant") if k in row}
        if "seed" in row:
            entry["seed"] = row["seed"]
        entry["gguf"] = f"{row['file']}.gguf"
        pk = {}
        for (ctx, stem, variant), r in sorted(evals.items()):
            if stem != row["file"] or variant != row["variant"]:
                continue
            mine = r["records"]
            acc = r["correct"] / r["n"]
            pk[str(ctx)] = {"n": r["n"], "correct": r["correct"], "accuracy": acc,
                            "ci95": list(wilson(r["correct"], r["n"])),
                            "allocated_kv_bytes": r["allocated_kv_bytes"], "stock_kv_bytes": r["stock_kv_bytes"],
                            "compressed_heads": r["compressed_heads"], "kv_heads": r["kv_heads"],
                            "cache_type": r["cache_type"],
                            "prompt_tokens": [min(x["prompt_tokens"] for x in mine), max(x["prompt_tokens"] for x in mine)],
                            "prefill_tok_s": r["prefill_tok_s"],
                            # [correct, n] for needle depth in [0, .25), [.25, .5), [.5, .75), [.75, 1)
                            "by_depth_quarter": [[sum(1 for x in mine if q <= 4 * x["problem"]["depth"] < q + 1
                                                      and x["reward"] >= 1.0),
                                                  sum(1 for x in mine if q <= 4 * x["problem"]["depth"] < q + 1)]
                                                 for q in range(4)]}
        entry["passkey"] = pk
        pp = work / "ppl" / f"{row['file']}.json"
        if pp.exists():
            res = json.loads(pp.read_text())
            want = {"full": "full", "mixed": "mixed"}.get(row["variant"], row["variant"])
            if "variants" in res:
                v = next((x for x in res["variants"] if x["variant"] == want), None)
            elif want == "mixed":
                v = {"ppl": res["ppl_mixed"], "kl_mean": res["kl_full_mixed_mean"], "kl_max": res["kl_full_mixed_max"],
                     "top1_agreement": res["top1_agreement"], "allocated_kv_bytes": res["allocated_kv_bytes_mixed"]}
            elif want == "full":
                v = {"ppl": res["ppl_full"], "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0}
            else:
                v = None
            if v is not None:
                entry["ppl"] = {"ppl": v["ppl"], "ppl_full": res["ppl_full"], "kl_mean": v["kl_mean"],
                                "kl_max": v["kl_max"], "top1_agreement": v["top1_agreement"],
                                "allocated_kv_bytes": v.get("allocated_kv_bytes"), "n_ctx": res["n_ctx"],
                                "tokens_scored": res["tokens_scored"], "windows": res["windows"],
                                "text": Path(res["text"]).name, "text_sha256": res["text_sha256"]}
        table.append(entry)
    # per-problem records, machine paths dropped
    keep = ("index", "reward", "prompt_tokens", "gen_tokens", "completion", "allocated_kv_bytes", "cache_type")
    by_row = {(r["file"], r["variant"]): r["name"] for r in rows()}
    slim = {}
    for x in recs:  # a rerun's record of the same problem replaces the older one
        name = by_row.get((x["file"], x["variant"]))
        if name is not None:
            slim[(x["ctx"], name, x["index"])] = {"row": name, "ctx": x["ctx"], **{k: x[k] for k in keep},
                                                  **(x.get("problem") or {})}
    out = {"kvtool_bench": "smollm2_equal_memory", "model": MODEL.name, "heads": "duo/heads.json",
           "settings": {"task": "passkey:ctx=N", "seed": 0, "max_tokens": MAX_TOKENS, "n_ubatch": UBATCH,
                        "cache_type": "f16 (quant rows: their own)", "sink": 16, "window": 64,
                        "ppl": {"text": "verne", "tokens": PPL_TOKENS, "n_ctx": PPL_CTX, "cache_type": "f16"}},
           "rows": table}
    text = json.dumps(out, indent=1) + "\n"
    for bad in ("/root", "/work", "/home", "/tmp"):
        if bad in text:
            raise KvtoolError(f"a machine path ({bad}) would go into results.json")
    write_atomic(DOCS / "results.json", text.encode())
    lines = "".join(json.dumps(s, sort_keys=True) + "\n" for _, s in sorted(slim.items()))
    for bad in ("/root", "/work", "/home", "/tmp"):
        if bad in lines:
            raise KvtoolError(f"a machine path ({bad}) would go into records.jsonl")
    write_atomic(DOCS / "passkey_records.jsonl", lines.encode())
    from smollm2_pareto import plot  # bench/ is on sys.path when this file runs as a script

    plot(table, DOCS / "pareto_passkey.png")
    print(markdown(table))


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def markdown(table: list[dict]) -> str:
    """The docs table: measured rows only (the rest are listed as not measured in the text)."""
    ctxs = sorted({int(c) for r in table for c in r["passkey"]})
    head = (["row", "compressed heads"] + [f"KV MiB @{c} (vs full f16)" for c in ctxs]
            + [f"passkey @{c}: correct/n = acc [95% CI]" for c in ctxs] + ["ppl", "KL mean", "top-1 agree"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = next(r["passkey"] for r in table if r["name"] == "full")
    for r in table:
        pk, p = r["passkey"], r.get("ppl")
        if not pk and p is None:
            continue
        comp = next((f"{v['compressed_heads']}/{v['kv_heads']}" for v in pk.values() if v.get("kv_heads")), "-")
        cells = [r["name"], comp]
        for c in ctxs:
            v = pk.get(str(c))
            cells.append("-" if v is None else
                         f"{_mib(v['allocated_kv_bytes'])} ({v['allocated_kv_bytes'] / full[str(c)]['allocated_kv_bytes']:.3f}x)"
                         if str(c) in full else _mib(v["allocated_kv_bytes"]))
        for c in ctxs:
            v = pk.get(str(c))
            cells.append("not measured" if v is None else
                         f"{v['correct']}/{v['n']} = {v['accuracy']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]")
        cells += ["-", "-", "-"] if p is None else [f"{p['ppl']:.2f}", f"{p['kl_mean']:.3f}",
                                                    f"{p['top1_agreement']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["prepare", "passkey", "ppl", "report", "rows"])
    ap.add_argument("--work", type=Path, default=Path("~/.cache/kvtool/bench/smollm2_equal_memory").expanduser(),
                    help="where GGUFs and raw logs go (not committed)")
    ap.add_argument("--heads", type=Path, help="prepare: the trained heads.json (its scores give each s)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    try:
        if a.step == "rows":
            print("\n".join(r["name"] for r in rows()))
        elif a.step == "prepare":
            prepare(a.work, a.heads, a.model)
        elif a.step == "passkey":
            passkey(a.work, pick(a.rows), a.ctx, a.n, a.threads)
        elif a.step == "ppl":
            ppl(a.work, pick(a.rows), a.threads)
        else:
            report(a.work)
    except KvtoolError as e:
        print(f"kvtool: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
