"""What the Llama-layout families share: reading a Hugging Face config into `TailorConfig` arguments,
refusing by name every key Tailor's decoder does not compute, and the tensor names.

Llama, Mistral and Qwen2 checkpoints use the same parameter names (`model.layers.N.self_attn.q_proj...`),
the same rotate-half RoPE and the same pre-norm SiLU-gated blocks; they differ in biases, RoPE scaling and
sliding-window attention. A family module states its differences; the reading is here, once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """A model input that cannot be used: the message names the file (or directory) and the problem."""


# Keys that, when present and set, mean a feature Tailor's decoder would compute wrong: refused by name.
_MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclass(frozen=True)
class Family:
    """One model family behind the seam.

    model_type: the Hugging Face `model_type` it reads; qkv_bias: q/k/v projections always carry biases
    (Qwen2); bias_key: the config key that switches q/k/v biases on (Llama's `attention_bias` would also
    put one on o_proj, which Tailor refuses); sliding_key: the key naming the sliding window, and
    sliding_switch the key that turns it on (Qwen2's `use_sliding_window`; None = on whenever set)."""

    model_type: str
    qkv_bias: bool = False
    sliding_key: str | None = None
    sliding_switch: str | None = None

    def config_kwargs(self, hf: dict[str, Any], where: Path | str) -> dict[str, Any]:
        """`TailorConfig` arguments for config dict `hf` (what `config.json` holds); ModelFileError
        naming `where` and the key for anything Tailor cannot compute exactly."""
        def need(key: str) -> Any:
            if hf.get(key) is None:
                raise ModelFileError(f"{where}: config.json lacks {key!r}")
            return hf[key]

        for key in _MOE_KEYS:
            if hf.get(key):
                raise ModelFileError(f"{where}: {key}={hf[key]!r}: mixture-of-experts models are not supported")
        if hf.get("quantization_config"):
            method = (hf["quantization_config"] or {}).get("quant_method", "?")
            raise ModelFileError(f"{where}: quantization_config ({method}): give the float (bf16/fp16/fp32) "
                                 "checkpoint, Tailor quantizes it itself")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFileError(f"{where}: hidden_act={act!r} is not supported (SiLU-gated MLPs only)")
        if hf.get("mlp_bias"):
            raise ModelFileError(f"{where}: mlp_bias=true is not supported (MLP projections without bias only)")
        if not self.qkv_bias and hf.get("attention_bias"):
            raise ModelFileError(f"{where}: attention_bias=true is not supported for {self.model_type} "
                                 "(it biases o_proj too; Tailor supports q/k/v biases only, as in Qwen2)")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv = int(hf.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ModelFileError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head_dim = hf.get("head_dim") or hidden // heads
        if hf.get("head_dim") is None and hidden % heads:
            raise ModelFileError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                 "and config.json has no head_dim")
        theta, scaling = _rope(hf, where)
        max_pos = int(need("max_position_embeddings"))
        window = self._window(hf)
        if window is not None and window < max_pos:
            # Sliding-window attention equals full attention on sequences no longer than the window, so
            # the model is exact when its context is capped there (llama.cpp's deci graph has no SWA).
            log.warning("%s: %s=%d < max_position_embeddings=%d: the context is capped at the window, "
                        "where sliding-window attention is full attention", where, self.sliding_key, window, max_pos)
            max_pos = window
        tie = hf.get("tie_word_embeddings")
        return dict(
            vocab_size=int(need("vocab_size")), hidden_size=hidden, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=int(head_dim), intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")), rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=theta, rope_freq_scaling=scaling, max_position_embeddings=max_pos,
            tie_word_embeddings=True if tie is None else bool(tie),  # transformers' default is tied
            attention_bias=self.qkv_bias, family=self.model_type,
            bos_token_id=_one_id(hf.get("bos_token_id")), eos_token_id=_one_id(hf.get("eos_token_id")),
            pad_token_id=_one_id(hf.get("pad_token_id")))

    def hf_config(self, c: Any) -> Any:
        """The transformers config of this family for a dense `TailorConfig` `c` (the inverse of
        `config_kwargs`): Tailor's weights load into that model class under the same names."""
        from transformers import AutoConfig

        rope = {"rope_type": "default", "rope_theta": float(c.rope_theta), **(c.rope_freq_scaling or {})}
        kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                  rope_parameters=rope, max_position_embeddings=c.max_position_embeddings,
                  tie_word_embeddings=bool(c.tie_word_embeddings), bos_token_id=c.bos_token_id,
                  eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
        if self.model_type == "llama":
            kw.update(attention_bias=False, mlp_bias=False)
        if self.sliding_key is not None:
            kw[self.sliding_key] = None
        return AutoConfig.for_model(self.model_type, **kw)

    def _window(self, hf: dict[str, Any]) -> int | None:
        if self.sliding_key is None or hf.get(self.sliding_key) is None:
            return None
        if self.sliding_switch is not None and not hf.get(self.sliding_switch):
            return None
        return int(hf[self.sliding_key])

    def state_dict_keys(self, n_layers: int, tied: bool) -> set[str]:
        """The parameter names a checkpoint of this family holds (Hugging Face names = Tailor's)."""
        keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
        for i in range(n_layers):
            p = f"model.layers.{i}"
            keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
            keys |= {f"{p}.self_attn.{m}_proj.weight" for m in "qkvo"}
            keys |= {f"{p}.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
            if self.qkv_bias:
                keys |= {f"{p}.self_attn.{m}_proj.bias" for m in "qkv"}
        return keys


def _one_id(v: Any) -> int | None:
    """Special-token ids: Llama 3 lists several eos ids; the first is the one generation stops at."""
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _rope(hf: dict[str, Any], where: Path | str) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling`; refuses scaling types other than llama3 and partial rotary embeddings."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ModelFileError(f"{where}: config.json has no rope_theta (nor rope_parameters.rope_theta)")
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ModelFileError(f"{where}: partial_rotary_factor != 1 is not supported")
    spec = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        key = "rope_parameters.rope_type" if "rope_type" in params else "rope_scaling.rope_type"
        raise ModelFileError(f"{where}: {key}={kind!r} is not supported (default or llama3)")
    try:
        out = {"rope_type": "llama3", "factor": float(spec["factor"]), "low_freq_factor": float(spec["low_freq_factor"]),
               "high_freq_factor": float(spec["high_freq_factor"]),
               "original_max_position_embeddings": int(spec["original_max_position_embeddings"])}
    except KeyError as e:
        raise ModelFileError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None
    return float(theta), out
