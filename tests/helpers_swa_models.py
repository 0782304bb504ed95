"""Tiny random sliding-window hybrids (Gemma-3, gpt-oss) for the iSWA tests; no hub access needed.

Why these shapes: llama.cpp fixes Gemma-3's layer pattern at 5 SWA layers + 1 global (``is_swa(il) = il % 6 < 5``)
and gpt-oss's at 1 + 1, so the HF ``layer_types`` below are the same pattern. The window is small (16) so that a
300-token parity sequence crosses it many times. gpt-oss's converter wants a BPE ``tokenizer.json`` whose
pre-tokenizer hash it knows; the test model has a SentencePiece one instead, so ``gptoss_converter_path`` runs the
converter with its vocabulary step pointed at SentencePiece (the tokenizer plays no part in a logits comparison).
"""
from __future__ import annotations

import os
from pathlib import Path

from helpers_models import make_tokenizer

SWA_WINDOW = 16

_SITE = '''# kvtool test hook: convert a tiny gpt-oss with a SentencePiece vocabulary (only inside the converter)
try:
    from conversion.base import TextModel
    from conversion.gpt_oss import GptOssModel
except ImportError:
    pass
else:
    GptOssModel.set_vocab = TextModel._set_vocab_sentencepiece
'''


def _jitter_and_save(model, d: Path, init_std: float, after=None) -> Path:
    import torch

    with torch.no_grad():  # norms and sinks start at constants in HF; jitter them so a wrong mapping would show
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias") or name.endswith("_bias") or name.endswith("sinks"):
                p.copy_(torch.randn_like(p) * init_std * (10 if name.endswith("sinks") else 1))
        if after is not None:
            after(model)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d


def _tiny_hybrid(dir, config: str, model: str, global_every: int, n_layer: int, n_head: int, n_head_kv: int,
                 head_dim: int, vocab: int, seed: int, init_std: float, window: int, **arch_config):
    """A random F32 ``transformers.<model>`` with the shape both hybrids share; returns (model, its folder).

    Every ``global_every``-th layer is global, the rest slide over ``window``; ``arch_config`` holds what only one
    architecture has. The SentencePiece tokenizer is written first: it fixes the vocabulary size."""
    import torch
    import transformers

    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    n_vocab = make_tokenizer(d, vocab)
    hidden = n_head * head_dim
    cfg = getattr(transformers, config)(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, head_dim=head_dim, sliding_window=window,
        max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=init_std,
        layer_types=["full_attention" if (i + 1) % global_every == 0 else "sliding_attention" for i in range(n_layer)],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=[model], **arch_config)
    torch.manual_seed(seed)
    return getattr(transformers, model)(cfg).to(torch.float32), d


def make_tiny_gemma3(dir, n_layer: int = 6, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16,
                     vocab: int = 100, seed: int = 0, init_std: float = 0.1, window: int = SWA_WINDOW,
                     mlp_scale: float = 0.05) -> Path:
    """A random ``Gemma3ForCausalLM`` (text only), F32 safetensors, SentencePiece tokenizer; layer 5 is global.

    ``mlp_scale`` is the MLP's weight in the residual stream (its post-FFN norm scale): small, so the parity test
    measures attention, not ggml's float16 GELU table."""
    import torch

    model, d = _tiny_hybrid(dir, "Gemma3TextConfig", "Gemma3ForCausalLM", 6, n_layer, n_head, n_head_kv, head_dim,
                            vocab, seed, init_std, window, query_pre_attn_scalar=head_dim, tie_word_embeddings=True)

    def quiet_mlp(model):
        # Gemma's post-FFN norm scales the MLP output by (1 + w): a small scale keeps ggml's float16 GELU table
        # (see use_ggml_cpu_gelu) from moving the logits by more than the attention tolerance
        for name, p in model.named_parameters():
            if name.endswith("post_feedforward_layernorm.weight"):
                p.copy_(torch.full_like(p, mlp_scale - 1.0) + torch.randn_like(p) * 0.1 * mlp_scale)

    return _jitter_and_save(model, d, init_std, quiet_mlp)


def make_tiny_gptoss(dir, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16,
                     vocab: int = 100, seed: int = 0, init_std: float = 0.1, window: int = SWA_WINDOW) -> Path:
    """A random ``GptOssForCausalLM`` with 4 experts (2 per token), learned sinks, default RoPE; layer 1 global."""
    import torch

    model, d = _tiny_hybrid(dir, "GptOssConfig", "GptOssForCausalLM", 2, n_layer, n_head, n_head_kv, head_dim, vocab,
                            seed, init_std, window, num_local_experts=4, num_experts_per_tok=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                            tie_word_embeddings=False)
    with torch.no_grad():  # HF leaves the expert tensors at zero until _init_weights; give them values
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn_like(p) * init_std)
    return _jitter_and_save(model, d, init_std)


def gptoss_converter_path(tmp: Path) -> str:
    """PYTHONPATH for ``hf_to_gguf`` on a tiny gpt-oss: a sitecustomize that swaps its vocabulary step."""
    site = Path(tmp) / "gptoss-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITE)
    return os.pathsep.join([str(site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


def use_ggml_cpu_gelu(model) -> None:
    """Make the HF model's GELU round as llama.cpp's CPU kernel does (input and output through float16).

    Why: ggml's CPU ``gelu`` reads a float16 table (``GGML_GELU_FP16`` in ggml-cpu/vec.h), so stock llama.cpp already
    differs from PyTorch by ~3e-3 in the logits of a Gemma-3 at position 0, before any attention is involved. The
    parity test is about attention; emulating the table in the reference keeps its 1e-3 bound meaningful.
    """
    import torch

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return gelu(x)

    def gelu(x):
        x16 = x.to(torch.float16).to(torch.float32)
        y = 0.5 * x16 * (1.0 + torch.tanh(0.7978845608028654 * x16 * (1.0 + 0.044715 * x16 * x16)))
        y = y.to(torch.float16).to(torch.float32)
        return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))

    for m in model.modules():
        if hasattr(m, "act_fn") and hasattr(m, "gate_proj"):
            m.act_fn = GgmlGelu()
