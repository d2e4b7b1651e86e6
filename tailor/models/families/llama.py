"""Llama (Llama 2/3.x, SmolLM, TinyLlama...): tied or untied head, any head_dim, plain or llama3 RoPE.
No biases (`attention_bias: true` is refused: it would bias o_proj too)."""
from tailor.models.families._common import Family

FAMILY = Family(model_type="llama")
