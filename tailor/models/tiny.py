"""Tiny random Llama-shaped models for fast unit tests (block-aligned widths, GQA like SmolLM2)."""
from __future__ import annotations

import torch

from tailor.models.model import TailorConfig, TailorForCausalLM


def tiny_config(n_layers: int = 3, vocab: int = 320, **over) -> TailorConfig:
    kw = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
              intermediate_size=256, num_hidden_layers=n_layers, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    kw.update(over)
    return TailorConfig(**kw)


def tiny_model(seed: int = 0, **over) -> TailorForCausalLM:
    torch.manual_seed(seed)
    model = TailorForCausalLM(tiny_config(**over))
    with torch.no_grad():  # non-trivial norms so permutation tests see them
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_hf_model(family: str = "llama", seed: int = 0, vocab: int = 320, **over):
    """A tiny random transformers model of `family` ("llama", "mistral", "qwen2"): the checkpoints users
    bring, in miniature. Biases (Qwen2) and norms are randomised too, so a dropped one shows in the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2)
    kw.update(over)
    if kw.get("head_dim") is None:  # a config without head_dim: hidden / heads, as many checkpoints do
        kw.pop("head_dim", None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def save_tiny_hf_dir(path, family: str = "llama", tokenizer_dir=None, seed: int = 0, **over):
    """Write a tiny random `family` checkpoint as a Hugging Face directory (config.json, safetensors and,
    from `tokenizer_dir`, the tokenizer files; the vocabulary then follows the tokenizer's)."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(path)
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        over = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, **over}
    model = tiny_hf_model(family, seed=seed, **over)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(f, path / f.name)
    return path
