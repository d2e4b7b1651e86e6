"""Tiny random Llama-shaped models for fast unit tests (block-aligned widths, GQA like SmolLM2)."""
from __future__ import annotations

import torch

from tailor.models.llama import TailorConfig, TailorForCausalLM


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
