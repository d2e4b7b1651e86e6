"""Tailor's Llama: one readable file, per-layer widths, elastic slicing and fake quantization.

The same module serves three roles:
- the dense model (every layer at full width, 16 bits) — numerically the Hugging Face Llama;
- the supernet (full-size weights, `set_active(cfg)` slices them in forward, OFA style);
- the standalone compressed model (physically smaller tensors, per-layer head counts and FFN widths,
  weights fake-quantized on the export grid), saved and loaded with `from_pretrained`.
Parameter names follow Hugging Face Llama so its state dicts load as they are.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tailor.quant.fake import CLIP_SLOTS, FMT_INDEX, clipped, fake_quant, runtime_linear, runtime_weight


class TailorConfig(PretrainedConfig):
    model_type = "tailor_llama"

    def __init__(self, vocab_size: int = 49152, hidden_size: int = 576, num_attention_heads: int = 9,
                 num_key_value_heads: int = 3, head_dim: int = 64, intermediate_size: int = 1536,
                 num_hidden_layers: int = 30, rms_norm_eps: float = 1e-5, rope_theta: float = 100000.0,
                 max_position_embeddings: int = 8192, layer_kv_heads: list[int] | None = None,
                 layer_ffn: list[int] | None = None, layer_bits: list[dict[str, int]] | None = None,
                 embed_bits: int = 16, quant_format: str = "gguf", subnet: dict | None = None,
                 runtime_emulation: bool = False,
                 tie_word_embeddings: bool = True, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs: Any):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        # Per kept layer; None = every layer at the base width / 16 bits.
        self.layer_kv_heads = layer_kv_heads or [num_key_value_heads] * num_hidden_layers
        self.layer_ffn = layer_ffn or [intermediate_size] * num_hidden_layers
        self.layer_bits = layer_bits or [{} for _ in range(num_hidden_layers)]
        self.embed_bits = embed_bits
        self.quant_format = quant_format
        self.subnet = subnet  # the SubnetConfig (as a dict) this model was extracted from, if any
        self.runtime_emulation = runtime_emulation  # inference mimics the device runtime's arithmetic
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_llama(cls, cfg: Any) -> "TailorConfig":
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                   rms_norm_eps=cfg.rms_norm_eps, rope_theta=_rope_theta(cfg),
                   max_position_embeddings=cfg.max_position_embeddings,
                   bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                   pad_token_id=getattr(cfg, "pad_token_id", None))


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


class QLinear(nn.Linear):
    """Linear whose weight is sliced to an active prefix and fake-quantized on the export grid."""

    def __init__(self, in_features: int, out_features: int, bits: int = 16, fmt: str = "gguf"):
        super().__init__(in_features, out_features, bias=False)
        self.bits, self.fmt = bits, fmt
        self.active_out, self.active_in = out_features, in_features
        # Learned clipping range per (format, bit-width), a factor on each block's range (1 = none).
        self.qclip = nn.Parameter(torch.ones(len(FMT_INDEX), CLIP_SLOTS))
        # Inference computes as the device runtime does (llama.cpp also rounds activations), so what
        # evaluate measures is what the exported file scores. Training always uses plain fake quant.
        self.runtime_emulation = False
        self._cache: tuple | None = None
        self._rt_cache: tuple | None = None

    def gamma(self) -> torch.Tensor | None:
        """The learned clipping factor of the current format and bit-width (None at 16 bits)."""
        return None if self.bits >= 16 else self.qclip[FMT_INDEX[self.fmt], self.bits]

    def _key(self, w: torch.Tensor) -> tuple:
        return (self.weight._version, self.qclip._version, self.active_out, self.active_in, self.bits, self.fmt,
                w.device, w.dtype)

    def active_weight(self) -> torch.Tensor:
        w = self.weight[: self.active_out, : self.active_in]
        if self.bits >= 16:
            return w
        if torch.is_grad_enabled() and (w.requires_grad or self.qclip.requires_grad):
            return fake_quant(w, self.bits, self.fmt, self.gamma())
        # Inference: quantizing every call is wasted work, so cache until weight, clip or slice changes.
        key = self._key(w)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, fake_quant(w.detach(), self.bits, self.fmt, self.gamma().detach()))
        return self._cache[1]

    def clipped_weight(self) -> torch.Tensor:
        """The active weight clamped to its learned range: the float values export quantizes."""
        w = self.weight[: self.active_out, : self.active_in].detach()
        return w if self.bits >= 16 else clipped(w, self.gamma(), self.fmt, self.bits)

    @torch.no_grad()
    def bake_clip_(self) -> None:
        """Write the learned clipping into the weight and reset it: same quantized values, no state."""
        if self.bits < 16:
            self.weight[: self.active_out, : self.active_in] = self.clipped_weight()
        self.qclip.fill_(1.0)

    def emulating(self) -> bool:
        return self.runtime_emulation and not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., : self.active_in]
        if self.emulating():
            w = self.weight[: self.active_out, : self.active_in]
            key = self._key(w)
            if self._rt_cache is None or self._rt_cache[0] != key:
                self._rt_cache = (key, runtime_weight(self.clipped_weight(), self.bits, self.fmt))
            return runtime_linear(x, self._rt_cache[1], self.bits, self.fmt)
        return F.linear(x, self.active_weight())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor, dtype: torch.dtype):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv[None, :]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TailorConfig, kv_heads: int, bits: dict[str, int]):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
        self.kv_heads = kv_heads  # active KV groups; query heads follow their group
        h, q, kv, f = cfg.hidden_size, kv_heads * self.q_per_kv * cfg.head_dim, kv_heads * cfg.head_dim, cfg.quant_format
        self.q_proj = QLinear(h, q, bits.get("q", 16), f)
        self.k_proj = QLinear(h, kv, bits.get("k", 16), f)
        self.v_proj = QLinear(h, kv, bits.get("v", 16), f)
        self.o_proj = QLinear(q, h, bits.get("o", 16), f)

    def set_kv(self, kv: int) -> None:
        self.kv_heads = kv
        q = kv * self.q_per_kv * self.head_dim
        self.q_proj.active_out = self.o_proj.active_in = q
        self.k_proj.active_out = self.v_proj.active_out = kv * self.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nq, nkv, hd = self.kv_heads * self.q_per_kv, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, nq, hd).transpose(1, 2)  # (B, nq, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nq, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nq * hd))


class MLP(nn.Module):
    def __init__(self, cfg: TailorConfig, ffn: int, bits: dict[str, int]):
        super().__init__()
        h, f = cfg.hidden_size, cfg.quant_format
        self.gate_proj = QLinear(h, ffn, bits.get("gate", 16), f)
        self.up_proj = QLinear(h, ffn, bits.get("up", 16), f)
        self.down_proj = QLinear(ffn, h, bits.get("down", 16), f)

    def set_ffn(self, ffn: int) -> None:
        self.gate_proj.active_out = self.up_proj.active_out = self.down_proj.active_in = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TailorConfig, i: int):
        super().__init__()
        bits = cfg.layer_bits[i] or {}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.layer_kv_heads[i], bits)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, cfg.layer_ffn[i], bits)
        self.active = True  # elastic depth: an inactive block is the identity

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TailorModel(nn.Module):
    def __init__(self, cfg: TailorConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TailorForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TailorConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = False

    def __init__(self, config: TailorConfig):
        super().__init__(config)
        self.model = TailorModel(config)
        self.lm_head = QLinear(config.hidden_size, config.vocab_size, config.embed_bits, config.quant_format)
        self.post_init()
        set_runtime_emulation(self, getattr(config, "runtime_emulation", False))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def hidden_states(self, input_ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids) if table is None else F.embedding(input_ids, table)  # (B, T, h)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_tables(self.config.head_dim, self.config.rope_theta, pos, x.dtype)
        # Activation checkpointing (`activation_checkpointing = True`): keep each block's input only and
        # recompute the block in backward (torch.utils.checkpoint; ~1/3 more compute, activations / L).
        ckpt = getattr(self, "activation_checkpointing", False) and torch.is_grad_enabled()
        for block in self.model.layers:
            if block.active:
                x = checkpoint(block, x, cos, sin, use_reentrant=False) if ckpt else block(x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        # Causal attention over right-padded batches: padding only affects positions after the text,
        # whose logits callers ignore, so attention_mask needs no further handling here.
        # The tied table is quantized once per forward for both uses, as the exported file stores it once.
        table = self.lm_head.active_weight()
        h = self.hidden_states(input_ids, table if self.lm_head.bits < 16 else None)
        logits = (self.lm_head(h) if self.lm_head.emulating() else F.linear(h, table)).float()  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict:
        return {"input_ids": input_ids}  # no KV cache: every step recomputes the prefix


def set_runtime_emulation(model: nn.Module, on: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, QLinear):
            mod.runtime_emulation = on


AutoConfig.register("tailor_llama", TailorConfig, exist_ok=True)
AutoModelForCausalLM.register(TailorConfig, TailorForCausalLM, exist_ok=True)
