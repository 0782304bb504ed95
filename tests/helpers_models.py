"""Tiny random Hugging Face checkpoints for tests (no hub access needed).

Why a SentencePiece tokenizer: the vendored ``convert_hf_to_gguf.py`` accepts a BPE ``tokenizer.json`` only when the
hash of its pre-tokenizer output matches a known model, so a home-made fast tokenizer is rejected. A
``tokenizer.model`` goes through ``_set_vocab_sentencepiece`` for both llama and qwen2, and SentencePiece can train
one offline in milliseconds. Training is single-threaded on a fixed corpus, so the vocabulary is reproducible.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

_WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
          "word but what some we can out other were all there when up use your how said an each she which do their "
          "time if will way about many then them write would like so these her long make thing see him two has look "
          "more day could go come did number sound no most people my over know water than call first who may down "
          "side been now find think reason step answer because so therefore").split()

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM"}
_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}


def make_tokenizer(dir: Path, vocab: int = 100) -> int:
    """Train a tiny SentencePiece BPE model into ``dir/tokenizer.model``; returns its vocabulary size."""
    import sentencepiece as spm

    rng = random.Random(1234)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe", num_threads=1,
        hard_vocab_limit=False, byte_fallback=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (dir / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}, indent=2))
    (dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return sp.vocab_size()


def make_char_tokenizer(d: Path) -> None:
    """Replace ``d``'s SentencePiece tokenizer by a character-level fast one (98 ids: 3 specials + printable ASCII).

    Why for training tests: transformers reads a SentencePiece file only with protobuf installed; a
    ``tokenizer.json`` needs nothing extra, and one id per character keeps task answers easy to check."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer.model").unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 4096}))


def make_tiny_char_llama(d: Path, vocab: int = 100, seed: int = 0) -> Path:
    """The training tests' model: a 2-layer GQA llama (4 query heads, 2 KV heads of dim 16) with the character-level
    tokenizer of :func:`make_char_tokenizer`."""
    d = make_tiny_hf(d, arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=16, vocab=vocab, seed=seed)
    make_char_tokenizer(d)
    return d


def make_tiny_hf(dir, arch: str = "llama", n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
                 head_dim: int = 16, vocab: int = 100, seed: int = 0, init_std: float = 0.1,
                 max_pos: int = 4096) -> Path:
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` saved as F32 safetensors with a SentencePiece tokenizer.

    ``init_std`` is larger than HF's 0.02 so attention is far from uniform and head masks change the logits
    measurably. Returns ``dir``.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}")
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    n_vocab = make_tokenizer(d, vocab)
    hidden = n_head * head_dim
    common = dict(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, num_key_value_heads=n_head_kv, head_dim=head_dim,
                  max_position_embeddings=max_pos, rms_norm_eps=1e-6, initializer_range=init_std,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, architectures=[ARCHS[arch]])
    if arch == "mistral":
        common["sliding_window"] = None  # a full-attention Mistral; native SWA models are refused by mixed mode
    cfg = getattr(transformers, _CONFIGS[arch])(**common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 in HF; jitter them so a wrong norm mapping would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * init_std)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d
