"""GPU offload on the CPU build: ``--gpu-layers/-ngl`` parsing and defaults, the one warning line, doctor's
devices, where ``kv_stats()`` says the KV buffers live, and the device split that ``inspect``/``plan`` predict.

This machine has no GPU, so what can be checked here is the CPU side of every rule: values are validated before
anything loads, the default resolves to 0, asking for GPU layers warns once and still runs, and the measured KV
buffers are all "CPU" and add up to the measured KV bytes. Real offload is tested on Vulkan (the `vulkan` marker).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_runtime import write_windows

from toolchain.cli import main
from toolchain.errors import KvtoolError
from toolchain.runtime.offload import ALL, device_layers, llama_value, parse_gpu_layers, resolve_gpu_layers

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- parsing and resolving
@pytest.mark.parametrize("value, expected", [(None, None), ("all", ALL), ("ALL", ALL), (" all ", ALL), ("0", 0),
                                             ("12", 12), (0, 0), (99, 99)])
def test_parse_accepts(value, expected):
    assert parse_gpu_layers(value) == expected


@pytest.mark.parametrize("value", ["-1", -1, "1.5", 1.5, "", "lots", "0x10", True, [3]])
def test_parse_rejects_with_one_line(value):
    with pytest.raises(KvtoolError) as e:
        parse_gpu_layers(value)
    msg = str(e.value)
    assert msg.startswith("--gpu-layers must be a non-negative integer or 'all'") and "\n" not in msg


def test_resolve_default_follows_the_runtime():
    warned = []
    assert resolve_gpu_layers(None, available=True, warn=warned.append) == ALL
    assert resolve_gpu_layers(None, available=False, warn=warned.append) == 0
    assert resolve_gpu_layers(7, available=True, warn=warned.append) == 7
    assert resolve_gpu_layers("all", available=True, warn=warned.append) == ALL
    assert resolve_gpu_layers(0, available=False, warn=warned.append) == 0
    assert warned == []


@pytest.mark.parametrize("value", ["all", 5])
def test_resolve_warns_once_without_a_gpu(value):
    warned = []
    assert resolve_gpu_layers(value, available=False, warn=warned.append) == 0
    assert len(warned) == 1 and "running on the CPU" in warned[0] and "\n" not in warned[0]
    # the resolved value passed on (what every command does) never warns again
    assert resolve_gpu_layers(0, available=False, warn=warned.append) == 0
    assert len(warned) == 1


def test_llama_value_and_device_layers():
    assert llama_value(ALL) == -1 and llama_value(0) == 0 and llama_value(9) == 9
    # llama.cpp offloads the last layers first and counts the output layer: N = n_layer leaves layer 0 on the CPU
    assert [device_layers(n, 30) for n in (0, 1, 2, 30, 31, 500)] == [0, 0, 1, 29, 30, 30]
    assert device_layers(ALL, 30) == 30


# --------------------------------------------------------------------------------------- the CLI, bad values
ARGS = {
    "chat": ["m.gguf"], "generate": ["m.gguf", "-p", "x"], "serve": ["m.gguf"], "bench": ["m.gguf"],
    "eval": ["m.gguf", "--task", "chain_sum"], "inspect": ["m.gguf"], "plan": ["m.gguf", "--mem", "1GiB"],
}


@pytest.mark.parametrize("verb", sorted(ARGS))
@pytest.mark.parametrize("flag, value", [("--gpu-layers", "-1"), ("-ngl", "2.5"), ("-ngl", "many")])
def test_every_command_rejects_bad_values(verb, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, *ARGS[verb], flag, value])
    assert e.value.code != 0
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtool: error: --gpu-layers must be"), out.err
    assert out.out == ""


@pytest.mark.parametrize("verb", sorted(ARGS))
def test_every_command_has_the_option(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = capsys.readouterr().out
    assert "--gpu-layers" in text and "-ngl" in text


# ---------------------------------------------------------------------------------------- on the CPU build
@pytest.fixture(scope="module")
def mixed_tiny(tiny_gguf, tmp_path_factory):
    # head 0 of every layer windowed (W=16), head 1 full: both cache groups exist
    return write_windows(tiny_gguf, tmp_path_factory.mktemp("ngl") / "mixed.gguf", [[16, 0]] * 3, 4)


def test_this_build_has_no_gpu(patched_runtime):
    from toolchain.runtime.library import gpu_offload_available

    assert patched_runtime["backend"] == "cpu"
    assert gpu_offload_available() is False
    assert resolve_gpu_layers(None) == 0


def test_model_default_is_cpu_and_silent(patched_runtime, tiny_gguf, capfd):
    from toolchain import Model

    with Model.load(tiny_gguf, n_ctx=256, n_threads=1) as m:
        assert m.n_gpu_layers == 0
        kv = m.kv_stats()
    assert kv["gpu_layers"] == 0
    assert "warning" not in capfd.readouterr().err


def test_model_asking_for_gpu_layers_warns_once_and_runs(patched_runtime, tiny_gguf, capfd, monkeypatch):
    from toolchain import Model
    from toolchain.runtime import offload

    monkeypatch.setattr(offload, "_warned", set())
    for _ in range(2):  # a second load in the same process does not repeat the warning
        with Model.load(tiny_gguf, n_ctx=256, n_threads=1, n_gpu_layers="all") as m:
            assert m.n_gpu_layers == 0
            out = m.generate("a b c", max_tokens=3)
            assert isinstance(out, str) and m.last_stats.generated_tokens >= 1
            assert {b["device"] for b in m.kv_stats()["buffers"]} == {"CPU"}
    err = capfd.readouterr().err
    warnings = [x for x in err.splitlines() if x.startswith("kvtool: warning:")]
    assert len(warnings) == 1 and "GPU layers requested (all)" in warnings[0] and "running on the CPU" in warnings[0], err


def test_model_rejects_bad_values_before_loading(patched_runtime, tiny_gguf):
    from toolchain import Model

    for bad in (-1, "-3", 2.0, "half"):
        with pytest.raises(KvtoolError, match="n_gpu_layers must be a non-negative integer or 'all'"):
            Model.load(tiny_gguf, n_ctx=256, n_gpu_layers=bad)


def test_kv_buffers_of_a_stock_cache(patched_runtime, tiny_gguf):
    from toolchain import Model

    with Model.load(tiny_gguf, n_ctx=512, n_threads=1) as m:
        kv = m.kv_stats()
    assert not kv["mixed"]
    assert kv["buffers"] == [{"group": "full", "device": "CPU", "bytes": kv["allocated_bytes"]}]
    assert kv["allocated_bytes"] == kv["predicted_bytes"] > 0


@pytest.mark.parametrize("windows, groups", [([[16, 0]] * 3, {"full", "ring"}),
                                             ([[16, 32]] * 3, {"ring"}),  # two ring groups: one entry per device
                                             ([[16, 0], [0, 0], [0, 16]], {"full", "ring"})])
def test_kv_buffers_of_a_mixed_cache(patched_runtime, tiny_gguf, tmp_path, windows, groups):
    from toolchain import Model

    path = write_windows(tiny_gguf, tmp_path / "m.gguf", windows, 4)
    with Model.load(path, n_ctx=1024, n_ubatch=32, n_threads=1) as m:
        kv = m.kv_stats()
    assert kv["mixed"]
    bufs = kv["buffers"]
    assert {b["group"] for b in bufs} == groups and {b["device"] for b in bufs} == {"CPU"}
    assert len(bufs) == len(groups)  # aggregated per (group, device)
    assert sum(b["bytes"] for b in bufs if b["group"] == "full") == kv["full_bytes"]
    assert sum(b["bytes"] for b in bufs if b["group"] == "ring") == kv["ring_bytes"] > 0
    assert sum(b["bytes"] for b in bufs) == kv["allocated_bytes"] == kv["predicted_bytes"]


def test_status_line_names_the_device(patched_runtime, mixed_tiny):
    from toolchain import Model
    from toolchain.commands.generate import kv_summary

    with Model.load(mixed_tiny, n_ctx=512, n_ubatch=32, n_threads=1) as m:
        s = kv_summary(m.kv_stats())
    assert "allocated (mixed) on CPU vs" in s
    split = {"allocated_bytes": 3 << 20, "mixed": False, "stock_bytes": 3 << 20,
             "buffers": [{"group": "full", "device": "CPU", "bytes": 1 << 20},
                         {"group": "full", "device": "Vulkan0", "bytes": 2 << 20}]}
    assert "on Vulkan0 2.0 MiB + CPU 1.0 MiB" in kv_summary(split)


def test_chat_stats_lists_the_buffers(patched_runtime, mixed_tiny):
    import io

    from toolchain import Model
    from toolchain.commands.chat import ChatSession

    with Model.load(mixed_tiny, n_ctx=512, n_ubatch=32, n_threads=1) as m:
        text = ChatSession(m, None, {}, False, False, out=io.StringIO()).stats_text()
        kv = m.kv_stats()
    full, ring = (next(b["bytes"] for b in kv["buffers"] if b["group"] == g) for g in ("full", "ring"))
    from toolchain.commands.generate import fmt_bytes

    line = next(x for x in text.splitlines() if x.startswith("kv buffers"))
    assert line == f"kv buffers   full CPU {fmt_bytes(full)}, ring CPU {fmt_bytes(ring)}; gpu layers 0"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "toolchain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=str(REPO), timeout=timeout, env=dict(os.environ))


def test_bench_warns_once_for_all_variants(patched_runtime, mixed_tiny):
    res = _cli("bench", mixed_tiny, "--ctx", "512", "--prompt", "32", "--decode", "2", "--repeats", "1",
               "--variants", "stock,mixed", "--ubatch", "32", "--threads", "1", "-ngl", "all", "--json")
    assert res.returncode == 0, res.stderr
    warnings = [x for x in res.stderr.splitlines() if x.startswith("kvtool: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("kvtool: warning: GPU layers requested (all), but")
    rows = {r["variant"]: r for r in json.loads(res.stdout)}
    for r in rows.values():
        assert r["gpu_layers"] == 0
        assert {b["device"] for b in r["kv_buffers"]} == {"CPU"}
        assert sum(b["bytes"] for b in r["kv_buffers"]) == r["kv_bytes"]


def test_generate_warns_once_and_runs(patched_runtime, smollm2):
    res = subprocess.run([sys.executable, "-m", "toolchain.commands.generate", str(smollm2), "-p", "Hello",
                          "-n", "2", "-t", "1", "--n-ctx", "256", "-ngl", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 2, res.stderr  # the warning, then the status line
    assert lines[0].startswith("kvtool: warning: GPU layers requested (8), but") and "CPU" in lines[0]
    assert "allocated (full cache) on CPU" in lines[1]


# ------------------------------------------------------------------------------------------------- doctor
def test_doctor_lists_the_devices(patched_runtime):
    from toolchain.commands.doctor import collect

    info = collect()
    devs = info["devices"]
    assert isinstance(devs, list) and devs
    cpu = [d for d in devs if d["type"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["name"] == "CPU"
    assert 0 < cpu[0]["free_bytes"] <= cpu[0]["total_bytes"]
    assert not any(d["type"] in ("gpu", "igpu") for d in devs)
    assert info["gpu_offload"] is False and info["default_gpu_layers"] == 0


def test_doctor_text_shows_devices(patched_runtime):
    res = _cli("doctor")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("devices "))
    assert int(lines[i].split()[1]) >= 1
    assert lines[i + 1].split()[:2] == ["CPU", "cpu"] and "MiB free /" in lines[i + 1]
    assert any(x.startswith("default_gpu_layers") and x.split()[1] == "0" for x in lines)


# ------------------------------------------------------------------------------ inspect/plan: the device split
def _weights(path, skip_embd: bool) -> int:
    from converters.gguf_budgets import tensor_spans

    return sum(n for name, _, n in tensor_spans(path) if not (skip_embd and name == "token_embd.weight"))


def test_inspect_all_layers_puts_every_kv_byte_on_the_device(mixed_tiny):
    from toolchain.commands.inspect import inspect_report

    r = inspect_report(str(mixed_tiny), 1024, 32, 1, "f16", True, "all", None)
    o = r["offload"]
    assert o["device_layers"] == 3 and o["kv_device_bytes"] == r["mixed_bytes"] and o["kv_host_bytes"] == 0
    # the tiny model has its own output.weight: everything but token_embd goes to the device
    assert o["weights_device_bytes"] == _weights(mixed_tiny, skip_embd=True) > 0
    assert o["device_bytes"] == o["weights_device_bytes"] + o["kv_device_bytes"] and o["fits"] is None


def test_inspect_partial_offload_and_fit(mixed_tiny):
    from converters.gguf_budgets import read_budgets
    from toolchain.commands.inspect import inspect_report
    from toolchain.runtime.memory import dims_from_gguf, predict

    dims, b = dims_from_gguf(mixed_tiny), read_budgets(mixed_tiny)
    plan = predict(dims, b.head_window, b.sink, 1024, 32, 1, "f16", "f16", True)
    per_layer = list(plan.layer_bytes)
    assert sum(per_layer) == plan.mixed_bytes and len(per_layer) == 3
    r = inspect_report(str(mixed_tiny), 1024, 32, 1, "f16", True, 2, None)  # -ngl 2: layer 2 + output
    o = r["offload"]
    assert o["device_layers"] == 1 and o["kv_device_bytes"] == per_layer[2]
    assert o["kv_host_bytes"] == per_layer[0] + per_layer[1]
    need = o["device_bytes"]
    assert inspect_report(str(mixed_tiny), 1024, 32, 1, "f16", True, 2, need)["offload"]["fits"] is True
    assert inspect_report(str(mixed_tiny), 1024, 32, 1, "f16", True, 2, need - 1)["offload"]["fits"] is False
    # without --gpu-layers, --mem is a KV budget
    r0 = inspect_report(str(mixed_tiny), 1024, 32, 1, "f16", True, None, plan.mixed_bytes)
    assert r0["offload"] is None and r0["kv_fits"] is True


def test_inspect_cli_text(mixed_tiny):
    res = _cli("inspect", mixed_tiny, "--ctx", "1024", "--ubatch", "32", "-ngl", "all", "--mem", "1KiB")
    assert res.returncode == 0, res.stderr
    assert "offload     --gpu-layers all: 3/3 layers' KV on the device" in res.stdout
    assert "does NOT fit in 0.0 MiB of device memory" in res.stdout


def test_plan_with_device_memory(smollm2, tmp_path):
    from converters.gguf_budgets import read_budgets, tensor_spans
    from toolchain.commands.inspect import plan_report
    from toolchain.runtime.memory import dims_from_gguf, predict

    path = write_windows(smollm2, tmp_path / "smol-w64.gguf", [[0, 64, 64]] * 30, 16)
    dims, b = dims_from_gguf(path), read_budgets(path)
    names = {name for name, _, _ in tensor_spans(path)}
    assert "output.weight" not in names  # tied embeddings: llama.cpp copies token_embd to the output's device
    weights = _weights(path, skip_embd=False)
    budget = weights + (8 << 20)
    r = plan_report(str(path), budget, 32, None, "all")
    assert r["offload"] == {"gpu_layers": "all", "device_layers": 30, "weights_device_bytes": weights}
    for name, wins, cache in (("full", None, "f16"), ("mixed", b.head_window, "f16"), ("mixed+q8_0", b.head_window, "q8_0")):
        c = r["plans"][name]["max_ctx"]
        assert c > 0
        def dev(n, wins=wins, cache=cache):
            return predict(dims, wins, b.sink, n, 32, 1, cache, cache, True, mixed=wins is not None).device_bytes(30)
        assert weights + dev(c) <= budget < weights + dev(c + 256), name
        assert r["plans"][name]["kv_device_bytes"] == dev(c)
    assert r["plans"]["mixed"]["max_ctx"] > r["plans"]["full"]["max_ctx"]
    # the weights alone over the budget: nothing fits
    small = plan_report(str(path), weights - 1, 32, None, "all")
    assert all(p["max_ctx"] == 0 for p in small["plans"].values())
    # -ngl 0 plans for the CPU: --mem is the KV budget, as without the flag
    assert plan_report(str(path), 8 << 20, 32, None, 0) == plan_report(str(path), 8 << 20, 32, None)
    # -ngl 16: layers 15..29 hold device KV, so the same budget reaches further than with every layer
    part = plan_report(str(path), budget, 32, None, 16)
    assert part["offload"]["device_layers"] == 15
    assert part["plans"]["full"]["max_ctx"] > r["plans"]["full"]["max_ctx"]


def test_eval_bad_input_after_the_flag_is_still_one_line(patched_runtime, mixed_tiny, tmp_path):
    res = _cli("eval", mixed_tiny, "--ppl", tmp_path / "missing.txt", "-ngl", "all")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"kvtool: error: {tmp_path / 'missing.txt'}: no such text file"], res.stderr


def test_eval_ppl_warns_once_for_both_loads(patched_runtime, mixed_tiny, tmp_path):
    from toolchain import Model

    with Model.load(mixed_tiny, n_ctx=256, n_threads=1) as m:  # a text the tiny vocabulary can encode
        words = m.detokenize(list(range(10, 90)))
    text = tmp_path / "t.txt"
    text.write_text(words * 4)
    res = _cli("eval", mixed_tiny, "--ppl", text, "--n-ctx", "32", "--ubatch", "32", "--threads", "1", "-q",
               "--json", "-ngl", "3")
    assert res.returncode == 0, res.stderr
    warnings = [x for x in res.stderr.splitlines() if x.startswith("kvtool: warning:")]
    assert len(warnings) == 1 and "GPU layers requested (3)" in warnings[0], res.stderr
    r = json.loads(res.stdout)[0]
    assert r["ppl_full"] > 0 and r["ppl_mixed"] > 0  # both loads ran (full, then mixed)


def test_c_api_bounds(patched_runtime, tiny_gguf):
    """The contract the Vulkan tests build on: an index past the end is -1, and a NULL context has no buffers."""
    import ctypes

    from toolchain import Model
    from toolchain.runtime.library import _fn

    n = _fn("kvtool_kv_n_buffers", ctypes.c_int, [ctypes.c_void_p])
    info = _fn("kvtool_kv_buffer_info", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                       ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)])
    dev = _fn("kvtool_device_info", ctypes.c_int, [ctypes.c_int] + [ctypes.POINTER(ctypes.c_char_p)] * 3
              + [ctypes.POINTER(ctypes.c_size_t)] * 2)
    n_dev = _fn("kvtool_n_devices", ctypes.c_int, [])
    assert n(None) == 0
    with Model.load(tiny_gguf, n_ctx=256, n_threads=1) as m:
        ctx = m.llama._ctx.ctx
        k = n(ctx)
        assert k == 1
        g, name, size = ctypes.c_int(7), ctypes.c_char_p(), ctypes.c_size_t(0)
        assert info(ctx, 0, ctypes.byref(g), ctypes.byref(name), ctypes.byref(size)) == 0
        assert (g.value, name.value, size.value) == (0, b"CPU", m.kv_stats()["allocated_bytes"])
        assert info(ctx, k, None, None, None) == -1 and info(ctx, -1, None, None, None) == -1
    assert dev(n_dev(), None, None, None, None, None) == -1 and dev(-1, None, None, None, None, None) == -1
