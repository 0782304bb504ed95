"""A generated catalogue of bad inputs (issue 16): every case must fail as kvtool promises.

For each input class (GGUF header and kvtool keys, heads.json, score TSV, CLI ranges, server bodies, Python API
misuse) the cases are generated from one valid input by systematic mutation: every key dropped or given the wrong
type, every numeric field pushed out of range, every truncation point of the header, nesting and encodings. Each CLI
case runs in a forked child (``helpers_cli.run_cli``: milliseconds, and a signal death is seen, not suffered) inside
its own directory, and must give one ``kvtool: error:`` line, a non-zero exit, no traceback, no signal death, no
output file and an untouched input (the directory is hashed before and after).

Random byte flips cannot promise an invalid file, so the seeded flip cases only require "exit 0, or one clean
error line" (never a traceback or a signal). The open-ended versions (hypothesis) are ``make fuzz``.
"""
from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest
from helpers_cli_run import REPO, assert_one_line_error, run_cli, snapshot
from helpers_fake_model import FakeModel
from helpers_gguf import alignment_kv, header, kv, model_kvs, nested_array_kv

from converters.gguf_budgets import (
    K_BEACON_INTERVAL,
    K_BEACON_TOKEN,
    K_ENABLED,
    K_HEAD_WINDOW,
    K_SINK,
    K_VERSION,
    T_ARR,
    T_BOOL,
    T_F32,
    T_I32,
    T_STR,
    T_U32,
    T_U64,
    Value,
)
from toolchain.errors import KvtoolError

N_LAYER, N_HEAD_KV = 3, 2
_SHAPE = {"n_layer": N_LAYER, "n_head_kv": N_HEAD_KV}
GOOD_TSV = REPO / "tests/data/rlkv_Llama-3.1-8B-R1.adapter_weights.tsv"


def _heads_dict() -> dict:
    from toolchain.heads import random_mask

    return random_mask(N_LAYER, N_HEAD_KV, 0.5, seed=0).to_dict()


def _budget_kvs(**over) -> list:
    """A valid set of kvtool keys for a 3 x 2 model; ``over`` replaces a key's Value (None drops it)."""
    base = {K_VERSION: Value(T_U32, 1), K_ENABLED: Value(T_BOOL, True), K_SINK: Value(T_U32, 4),
            K_HEAD_WINDOW: Value(T_ARR, [0, 64] * N_LAYER, T_I32)}
    base.update(over)
    return [kv(k, v) for k, v in base.items() if v is not None]


# --- cases ------------------------------------------------------------------------------------------------------
def gguf_cases() -> list:
    """(id, file bytes): each must be refused by inspect, plan and heads random."""
    good = header(model_kvs(n_layer=N_LAYER, n_head_kv=N_HEAD_KV) + _budget_kvs())
    cases = [("empty", b""), ("magic", b"GGUF"[:3] + b"X" + good[4:]), ("version-1", good[:4] + struct.pack("<I", 1) + good[8:]),
             ("version-9", good[:4] + struct.pack("<I", 9) + good[8:]),
             ("n_kv-huge", good[:16] + struct.pack("<Q", 2**63) + good[24:]),
             ("n_tensors-huge", good[:8] + struct.pack("<Q", 2**40) + good[16:])]
    # every truncation point inside the header (a sample of offsets, all of the first 40 bytes)
    cut = sorted(set(list(range(0, 40)) + list(range(40, len(good) - 1, max(1, len(good) // 40)))))
    cases += [(f"truncated-{n}", good[:n]) for n in cut]
    typed = {"string": Value(T_STR, "2"), "float": Value(T_F32, 2.0), "array": Value(T_ARR, [2, 2], T_U32),
             "u64-huge": Value(T_U64, 2**40), "zero": Value(T_U32, 0)}
    for field in ("block_count", "head_count_kv", "head_count", "embedding_length"):
        for tname, v in typed.items():
            if tname == "array" and field in ("head_count_kv", "head_count"):
                continue  # a per-layer array of the wrong length is covered below
            kw = {"block_count": "n_layer", "head_count_kv": "n_head_kv", "head_count": "n_head",
                  "embedding_length": "n_embd"}[field]
            cases.append((f"{field}-{tname}", header(model_kvs(**{**_SHAPE, kw: v}) + _budget_kvs())))
        kw = {"block_count": "n_layer", "head_count_kv": "n_head_kv", "head_count": "n_head",
              "embedding_length": "n_embd"}[field]
        cases.append((f"{field}-missing", header(model_kvs(**{**_SHAPE, kw: None}) + _budget_kvs())))
    cases.append(("head_count_kv-ragged", header(model_kvs(n_layer=N_LAYER, n_head_kv=Value(T_ARR, [2, 2], T_U32)))))
    cases += [("arch-missing", header(model_kvs(arch=None))), ("arch-unknown", header(model_kvs(arch="zzz")[:1])),
              ("arch-int", header([kv("general.architecture", Value(T_U32, 7))])),
              # found by make fuzz: a string value that is not UTF-8 (values are decoded on demand)
              ("arch-bad-utf8", header([b"\x14" + b"\0" * 7 + b"general.architecture" + struct.pack("<IQ", T_STR, 1)
                                        + b"\x80"])),
              ("arch-long", header([kv("general.architecture", Value(T_STR, "x" * 500))]))]
    for depth in (3, 50, 5000):
        cases.append((f"nested-{depth}", header(model_kvs() + [nested_array_kv("x.deep", depth)])))
    for a in (0, 3, 48, 2**32, 2**40):
        cases.append((f"alignment-{a}", header(model_kvs(n_layer=N_LAYER) + [alignment_kv(a)])))
    cases.append(("alignment-string", header(model_kvs() + [kv("general.alignment", Value(T_STR, "32"))])))
    cases.append(("duplicate-key", header(model_kvs() + model_kvs()[:1])))
    cases.append(("bad-utf8-key", good[:24] + struct.pack("<Q", 2) + b"\xff\xfe" + good[24 + 8 + len("general.architecture"):]))
    cases.append(("bad-value-type", header([struct.pack("<Q", 1) + b"x" + struct.pack("<I", 99)])))
    # kvtool keys: each one wrong
    bad = {"window-negative": {K_HEAD_WINDOW: Value(T_ARR, [0, -1] * N_LAYER, T_I32)},
           "window-u32-2^31": {K_HEAD_WINDOW: Value(T_ARR, [0, 2**31] * N_LAYER, T_U32)},
           "window-short": {K_HEAD_WINDOW: Value(T_ARR, [0, 64], T_I32)},
           "window-long": {K_HEAD_WINDOW: Value(T_ARR, [0, 64] * (N_LAYER + 1), T_I32)},
           "window-float": {K_HEAD_WINDOW: Value(T_ARR, [0.0, 64.0] * N_LAYER, T_F32)},
           "window-scalar": {K_HEAD_WINDOW: Value(T_U32, 64)},
           "window-missing-enabled": {K_HEAD_WINDOW: None},
           "sink-string": {K_SINK: Value(T_STR, "4")}, "sink-huge": {K_SINK: Value(T_U64, 2**40)},
           "enabled-int": {K_ENABLED: Value(T_U32, 1)}, "version-2": {K_VERSION: Value(T_U32, 2)},
           "version-string": {K_VERSION: Value(T_STR, "1")},
           "beacon-interval-0": {K_BEACON_TOKEN: Value(T_U32, 1), K_BEACON_INTERVAL: Value(T_U32, 0)},
           "beacon-token-only": {K_BEACON_TOKEN: Value(T_U32, 1)},
           "beacon-interval-only": {K_BEACON_INTERVAL: Value(T_U32, 8)},
           "beacon-token-string": {K_BEACON_TOKEN: Value(T_STR, "1"), K_BEACON_INTERVAL: Value(T_U32, 8)}}
    for name, over in bad.items():
        cases.append((f"kvtool-{name}", header(model_kvs(n_layer=N_LAYER, n_head_kv=N_HEAD_KV) + _budget_kvs(**over))))
    # beacon id outside the vocabulary (the file's tokenizer has 3 tokens)
    vocab = kv("tokenizer.ggml.tokens", Value(T_ARR, ["a", "b", "c"], T_STR))
    cases.append(("kvtool-beacon-out-of-vocab", header(model_kvs(n_layer=N_LAYER, n_head_kv=N_HEAD_KV) + [vocab]
                                                       + _budget_kvs(**{K_BEACON_TOKEN: Value(T_U32, 3),
                                                                        K_BEACON_INTERVAL: Value(T_U32, 8)}))))
    return cases


def heads_cases() -> list:
    """(id, heads.json bytes): each refused by heads show and by convert --mask."""
    good = _heads_dict()
    cases = [("empty", b""), ("spaces", b"   \n"), ("not-json", b"{nope"), ("list", b"[]"), ("number", b"3"),
             ("deep-100000", b"[" * 100_000), ("deep-object", b'{"a":' * 50_000), ("bad-utf8", b'{"format": "\xff"}'),
             ("nan", json.dumps({**good, "sparsity": "NaN"}).replace('"NaN"', "NaN").encode()),
             ("infinity", json.dumps({**good, "window": "Infinity"}).replace('"Infinity"', "Infinity").encode()),
             ("unknown-key", json.dumps({**good, "bogus": 1}).encode())]
    for k in ("format", "method", "n_layer", "n_head_kv", "full", "sink", "window", "sparsity"):
        cases.append((f"missing-{k}", json.dumps({x: v for x, v in good.items() if x != k}).encode()))
    wrong = {"format": [1, "kvtool.heads/2"], "method": [1, "magic"], "n_layer": ["3", 0, -1, 2.5, True],
             "n_head_kv": ["2", 0, 7], "sink": [-1, 2**31, 2**40, "4", 1.5, None],
             "window": [0, -5, 2**31, 2**40, "64", 1.5, None], "sparsity": [-0.1, 1.1, "0.5", None],
             "full": [[], [[True, False]], [[1, 0]] * N_LAYER, "x", [[True, "no"]] * N_LAYER],
             "scores": [[[0.1]] * N_LAYER, [["a", "b"]] * N_LAYER, "x"], "per_layer": ["yes", 1],
             "model": ["m", {"arch": 1}, {"other": "x"}], "extra": ["x", [1]]}
    for k, vals in wrong.items():
        for i, v in enumerate(vals):
            cases.append((f"{k}-{i}", json.dumps({**good, k: v}).encode()))
    return cases


def tsv_cases() -> list:
    """(id, TSV bytes): each refused by heads import."""
    return [("empty", b""), ("blank-lines", b"\n\n"), ("underscore", b"0.5\t1_0\n0.1\t0.2\n"), ("hex", b"0x10\t1\n"),
            ("nan", b"nan\t1\n"), ("inf", b"inf\t1\n"), ("overflow", b"1e999\t1\n"), ("word", b"0.5\tabc\n"),
            ("ragged", b"0.1\t0.2\n0.3\n"), ("bad-utf8", b"0.1\t\xff\n"), ("inner-blank", b"0.1\t0.2\n\n0.3\t0.4\n"),
            ("comma", b"0,5\t1\n"), ("unicode-digit", "\u0661\t1\n".encode())]


def cli_range_cases(tiny: str, heads: str) -> list:
    """(id, argv): numeric options outside what the command (or the C type under it) accepts."""
    tsv = str(GOOD_TSV)
    cases = []
    for opt, vals in (("--sparsity", ["nan", "-0.1", "1.5", "inf"]), ("--sink", ["-1", str(2**31), str(2**64)]),
                      ("--window", ["0", "-3", str(2**31), str(2**32)])):
        cases += [(f"import{opt}={v}", ["heads", "import", "rlkv", tsv, "-s", "0.5", opt, v]) for v in vals
                  if opt != "--sparsity"]
        if opt == "--sparsity":
            cases += [(f"import-s={v}", ["heads", "import", "rlkv", tsv, "-s", v]) for v in vals]
    cases += [(f"random-seed={v}", ["heads", "random", "--model", tiny, "-s", "0.5", "--seed", v]) for v in ("-1", "x")]
    gen = ["generate", tiny, "-p", "hello"]
    for opt, vals in (("--n-ctx", ["0", "-1", str(2**31 - 1), str(2**32)]), ("--n-ubatch", ["0", "-1", str(2**32)]),
                      ("--threads", ["0", "-1"]), ("--seed", ["-1", str(2**40)]), ("--temp", ["nan", "-1", "inf"]),
                      ("--top-p", ["nan", "1.5", "-0.5"]), ("--top-k", ["-1", str(2**40)]),
                      ("--max-tokens", ["-1", str(2**40)]), ("--cache-type", ["q9_9"])):
        cases += [(f"generate{opt}={v}", gen + [opt, v]) for v in vals]
    cases += [("chat--temp=nan", ["chat", tiny, "--temp", "nan"]), ("chat--n-ctx=0", ["chat", tiny, "--n-ctx", "0"]),
              ("inspect--ctx=0", ["inspect", tiny, "--ctx", "0"]), ("inspect--cache=zz", ["inspect", tiny, "--cache-type", "zz"]),
              ("plan--mem=lots", ["plan", tiny, "--mem", "lots"]), ("plan--sparsity=2", ["plan", tiny, "--mem", "1GiB", "--sparsity", "2"]),
              ("convert--sparsity=nan", ["convert", tiny, "--mask", heads, "--sparsity", "nan", "-o", "o.gguf"]),
              ("convert--window=2^31", ["convert", tiny, "--mask", heads, "--window", str(2**31), "-o", "o.gguf"]),
              ("convert--beacon-interval=0", ["convert", tiny, "--mask", heads, "--beacon-token", "1",
                                              "--beacon-interval", "0", "-o", "o.gguf"]),
              ("convert--beacon-token=2^40", ["convert", tiny, "--mask", heads, "--beacon-token", str(2**40),
                                              "--beacon-interval", "8", "-o", "o.gguf"]),
              ("convert-o=input", ["convert", tiny, "--mask", heads, "-o", heads]),
              ("convert-o=dir", ["convert", tiny, "--mask", heads, "-o", "."])]
    return cases


# --- fixtures and runners -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    """A header-only GGUF of a 3 x 2 llama: enough for every check that runs before the runtime loads."""
    p = tmp_path_factory.mktemp("fuzz-model") / "m.gguf"
    p.write_bytes(header(model_kvs(n_layer=N_LAYER, n_head_kv=N_HEAD_KV) + [
        kv("tokenizer.ggml.tokens", Value(T_ARR, [f"t{i}" for i in range(16)], T_STR))]))
    return p


def check_case(d: Path, argv: list, match=None, what="") -> None:
    before = snapshot(d)
    res = run_cli(argv, cwd=d)
    assert_one_line_error(res, match, what=what)
    assert snapshot(d) == before, f"{what}: files changed"


def _dir_with(tmp_path: Path, name: str, data: bytes) -> tuple[Path, Path]:
    d = tmp_path / "case"
    d.mkdir()
    f = d / name
    f.write_bytes(data)
    return d, f


@pytest.mark.parametrize("cid,data", gguf_cases(), ids=[c[0] for c in gguf_cases()])
def test_gguf_header(tmp_path, cid, data):
    from toolchain.heads import random_mask

    d, f = _dir_with(tmp_path, "bad.gguf", data)
    heads = tmp_path / "h.json"
    random_mask(N_LAYER, N_HEAD_KV, 0.5, seed=0).save(heads)
    check_case(d, ["inspect", f], what=f"inspect {cid}")
    # heads random reads only the shape (block_count x head_count_kv), not head sizes or kvtool keys
    if not cid.startswith(("kvtool-", "head_count-", "embedding_length-", "head_count_kv-missing")):
        check_case(d, ["heads", "random", "--model", f, "-s", "0.5", "--seed", "1", "-o", d / "o.json"],
                   what=f"heads random {cid}")
    # convert replaces a file's budget keys (so bad old ones are fine) but carries its beacon keys over
    if not cid.startswith("kvtool-") or cid.startswith("kvtool-beacon"):
        check_case(d, ["convert", f, "--mask", heads, "-o", d / "o.gguf"], what=f"convert {cid}")
    check_case(d, ["generate", f, "-p", "x"], what=f"generate {cid}")


@pytest.mark.parametrize("seed", range(24))
def test_gguf_random_flips_never_crash(tmp_path, seed):
    good = header(model_kvs(n_layer=N_LAYER, n_head_kv=N_HEAD_KV) + _budget_kvs())
    rng = random.Random(seed)
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    d, f = _dir_with(tmp_path, "flip.gguf", bytes(data))
    before = snapshot(d)
    res = run_cli(["inspect", f], cwd=d)
    assert res.signal is None and "Traceback" not in res.err, res.err
    if res.rc != 0:
        assert_one_line_error(res, what=f"flip seed {seed}")
    assert snapshot(d) == before


@pytest.mark.parametrize("cid,data", heads_cases(), ids=[c[0] for c in heads_cases()])
def test_heads_json(tmp_path, tiny_model_file, cid, data):
    d, f = _dir_with(tmp_path, "h.json", data)
    check_case(d, ["heads", "show", f], what=f"show {cid}")
    check_case(d, ["convert", tiny_model_file, "--mask", f, "-o", d / "o.gguf"], what=f"convert {cid}")


@pytest.mark.parametrize("cid,data", tsv_cases(), ids=[c[0] for c in tsv_cases()])
def test_score_tsv(tmp_path, cid, data):
    d, f = _dir_with(tmp_path, "s.tsv", data)
    check_case(d, ["heads", "import", "rlkv", f, "-s", "0.5", "-o", d / "h.json"], what=cid)
    check_case(d, ["heads", "import", "duo", f, "-s", "0.5"], what=cid)


def test_cli_ranges(tmp_path, tiny_model_file):
    from toolchain.heads import random_mask

    d = tmp_path / "case"
    d.mkdir()
    heads = d / "h.json"
    random_mask(N_LAYER, N_HEAD_KV, 0.5, seed=0).save(heads)
    model = d / "m.gguf"
    model.write_bytes(tiny_model_file.read_bytes())
    failures = []
    for cid, argv in cli_range_cases(str(model), str(heads)):
        try:
            check_case(d, argv, what=cid)
        except AssertionError as e:
            failures.append(f"{cid}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)


# --- server bodies --------------------------------------------------------------------------------------------
_BAD_VALUES = [float("nan"), float("inf"), float("-inf"), "1", [1], {"a": 1}, True, -1, 2**40, -(2**40)]
_FIELDS = {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens", "n", "stream",
           "stream_options", "stop", "max_completion_tokens"}


def server_cases() -> list:
    """(id, body fields): every sampling/stream field with every bad value (a string stop and stream=true are the
    only valid pairs, so they are left out)."""
    out = []
    for field in sorted(_FIELDS):
        for i, v in enumerate(_BAD_VALUES):
            if (field == "stop" and isinstance(v, str)) or (field == "stream" and v is True):
                continue
            out.append((f"{field}-{i}", {field: v}))
    out += [("messages-missing", {"messages": None}), ("messages-empty", {"messages": []}),
            ("messages-str", {"messages": "hi"}), ("prompt-int", {"prompt": 3}), ("prompt-list", {"prompt": [1, 2]})]
    return out


def test_server_bodies():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from toolchain.commands.serve import make_app

    client = TestClient(make_app(FakeModel()))
    bad = []
    for cid, over in server_cases():
        for path, base in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            if ("prompt" in over and path != "/v1/completions") or ("messages" in over and path == "/v1/completions"):
                continue
            body = {**base, **over}
            if over.get("stream_options") is not None:
                body["stream"] = True
            r = client.post(path, content=json.dumps(body))
            if r.status_code != 400 or "error" not in r.json():
                bad.append(f"{cid} {path}: {r.status_code} {r.text[:200]}")
    assert not bad, "\n".join(bad)
    for body in ("[" * 50_000, "{bad", ""):
        r = client.post("/v1/completions", content=body)
        assert r.status_code == 400, (body[:10], r.status_code)


# --- Python API misuse ----------------------------------------------------------------------------------------
# Prompts use words of the tiny model's vocabulary: its SentencePiece vocabulary has no byte tokens, and stock
# llama.cpp aborts (std::out_of_range in byte_to_token) on a character it cannot spell.
def test_api_misuse(tiny_gguf, tmp_path, patched_runtime):
    from toolchain.runtime.model import Model

    for kw, p in (({}, tmp_path), ({}, tmp_path / "missing.gguf"), ({"n_ctx": "big"}, tiny_gguf),
                  ({"n_ctx": 1.5}, tiny_gguf), ({"cache_type": "q9"}, tiny_gguf), ({"n_ubatch": -4}, tiny_gguf),
                  ({"seed": 2**33}, tiny_gguf), ({"n_threads": True}, tiny_gguf), ({"mixed": True}, tiny_gguf),
                  ({"beacons": True}, tiny_gguf)):
        with pytest.raises(KvtoolError):
            Model.load(p, **kw)
    m = Model.load(tiny_gguf, n_ctx=256, n_threads=1)
    try:
        calls = [lambda: m.generate(123), lambda: m.generate("the word", temperature=math.nan),
                 lambda: m.generate("the word", temperature="hot"), lambda: m.generate("the word", top_p=2),
                 lambda: m.generate("the word", top_k=2**40), lambda: m.generate("the word", seed=-1),
                 lambda: m.generate("the word", max_tokens="many"), lambda: m.generate("the word", min_p=math.inf),
                 lambda: m.generate("the word", repeat_penalty=-1), lambda: m.chat("hi"), lambda: m.chat([]),
                 lambda: m.chat([{}]), lambda: m.chat([{"role": 1, "content": "the word"}]),
                 lambda: m.chat([{"role": "user", "content": [{"type": "image"}]}]),
                 lambda: m.generate(" ".join(["the word"] * 400))]
        for call in calls:
            with pytest.raises(KvtoolError):
                call()
        assert isinstance(m.generate("the word", max_tokens=2), str)  # still usable after every refusal
    finally:
        m.close()
    with pytest.raises(KvtoolError, match="model is closed"):
        m.generate("the word")
