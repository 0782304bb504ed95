"""Test helpers around the patched runtime: budgets written into a GGUF, and llama.cpp logits per position."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from converters.gguf_budgets import T_ARR, T_BOOL, T_I32, T_U32, Value, rewrite_gguf
from toolchain.gguf_keys import K_ENABLED, K_HEAD_WINDOW, K_SINK, K_VERSION

GGML_TYPE_F32 = 0


def write_windows(src: Path, dst: Path, windows: Sequence[Sequence[int]], sink: int, enabled: Optional[bool] = True,
                  extra: Optional[dict] = None) -> Path:
    """Per-head windows (any mix of values, 0 = full) straight into the GGUF, bypassing heads.json."""
    keys = {K_VERSION: Value(T_U32, 1), K_SINK: Value(T_U32, sink),
            K_HEAD_WINDOW: Value(T_ARR, [int(w) for row in windows for w in row], T_I32)}
    if enabled is not None:
        keys[K_ENABLED] = Value(T_BOOL, bool(enabled))
    keys.update(extra or {})
    return rewrite_gguf(src, dst, keys, drop=lambda k: k.startswith("kvtool."))


def load(path: Path, n_ctx: int = 1024, n_ubatch: int = 512, f32_kv: bool = True, flash_attn: bool = False,
         mixed: Optional[bool] = None, n_seq_max: int = 1, type_kv: Optional[int] = None, **kw):
    from llama_cpp import Llama

    args = dict(n_ctx=n_ctx, n_batch=max(512, n_ubatch), n_ubatch=n_ubatch, n_threads=2, logits_all=True,
                verbose=False, flash_attn=flash_attn, seed=0)
    if f32_kv:
        args.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    if type_kv is not None:
        args.update(type_k=type_kv, type_v=type_kv)
    if mixed is not None:
        args["kv_overrides"] = {K_ENABLED: bool(mixed)}
    args.update(kw)
    return Llama(str(path), **args)


def runtime_logits(llm, tokens: Sequence[int], prefill: Optional[int] = None) -> np.ndarray:
    """Logits [T, vocab] for every position. With ``prefill`` the first tokens go in one call and the rest one by one."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    toks = list(tokens)
    if prefill is None:
        llm.eval(toks)
    else:
        llm.eval(toks[:prefill])
        for t in toks[prefill:]:
            llm.eval([t])
    return np.array(llm.scores[: len(toks)], dtype=np.float32)


class LowLevel:
    """A llama_context built with the C API, for what llama_cpp.Llama cannot express (n_seq_max > 1, kv_unified,
    state blobs, sequence ops) and for batches that mix sequences."""

    def __init__(self, path: Path, n_ctx: int = 1024, n_ubatch: int = 64, n_seq_max: int = 1, unified: bool = False,
                 cache: str = "f32", flash_attn: bool = False, mixed: Optional[bool] = None):
        import ctypes

        import llama_cpp as lc

        from toolchain.gguf_keys import CACHE_TYPES

        self.lc = lc
        mp = lc.llama_model_default_params()
        self._ov = None
        if mixed is not None:
            ov = (lc.llama_model_kv_override * 2)()
            ov[0].key = K_ENABLED.encode()
            ov[0].tag = lc.LLAMA_KV_OVERRIDE_TYPE_BOOL
            ov[0].value.val_bool = bool(mixed)
            ov[1].key = b""
            mp.kv_overrides = ctypes.cast(ov, ctypes.POINTER(lc.llama_model_kv_override))
            self._ov = ov
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ValueError(f"failed to load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, max(n_ctx, n_ubatch), n_ubatch, n_seq_max
        cp.kv_unified = unified
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.type_k = cp.type_v = CACHE_TYPES[cache].ggml_id
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise ValueError("failed to create the context")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def decode(self, items: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """items = [(token, pos, seq)], all logits returned in order."""
        lc = self.lc
        batch = lc.llama_batch_init(len(items), 0, 1)
        try:
            for i, (tok, pos, seq) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, True
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(items)
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            return [np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                    for i in range(len(items))]
        finally:
            lc.llama_batch_free(batch)

    def run(self, tokens: Sequence[int], seq: int = 0, pos0: int = 0, chunk: int = 0) -> np.ndarray:
        """Decode tokens of one sequence (in chunks of ``chunk``, default all at once); logits [T, vocab]."""
        out, step = [], chunk or len(tokens)
        for i in range(0, len(tokens), step):
            out += self.decode([(t, pos0 + i + j, seq) for j, t in enumerate(tokens[i:i + step])])
        return np.stack(out)

    def state(self) -> bytes:
        import ctypes

        n = self.lc.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * n)()
        got = self.lc.llama_state_get_data(self.ctx, buf, n)
        return bytes(buf[:got])

    def set_state(self, blob: bytes) -> int:
        import ctypes

        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        return self.lc.llama_state_set_data(self.ctx, buf, len(blob))

    def seq_state(self, seq: int) -> bytes:
        import ctypes

        n = self.lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        got = self.lc.llama_state_seq_get_data(self.ctx, buf, n, seq)
        return bytes(buf[:got])

    def set_seq_state(self, blob: bytes, seq: int) -> int:
        import ctypes

        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        return self.lc.llama_state_seq_set_data(self.ctx, buf, len(blob), seq)

    def close(self):
        if self.ctx:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
