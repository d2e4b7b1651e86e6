"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v (none on o), tied or untied head, and a
sliding window only when `use_sliding_window` is set (then capped like Mistral's)."""
from tailor.models.families._common import Family

FAMILY = Family(model_type="qwen2", qkv_bias=True, sliding_key="sliding_window", sliding_switch="use_sliding_window")
