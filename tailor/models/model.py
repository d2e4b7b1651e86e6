"""Tailor's decoder: one readable file, per-layer widths, elastic slicing and fake quantization.

It computes every family behind the model seam (`tailor.models.families`: Llama, Mistral, Qwen2):
pre-norm RMSNorm blocks, GQA attention with rotate-half RoPE (plain, or llama3-scaled frequencies),
optional q/k/v biases (Qwen2), a SiLU-gated MLP and a tied or untied LM head. The same module serves
three roles:
- the dense model (every layer at full width, 16 bits) — numerically the Hugging Face Llama;
- the supernet (full-size weights, `set_active(cfg)` slices them in forward, OFA style);
- the standalone compressed model (physically smaller tensors, per-layer head counts and FFN widths,
  weights fake-quantized on the export grid), saved and loaded with `from_pretrained`.
Parameter names follow Hugging Face Llama / Mistral / Qwen2 (identical there), so their state dicts
load as they are.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tailor.quant.fake import (CLIP_SLOTS, FMT_INDEX, clip_slot, clipped, fake_quant, fake_quant_group, learns_clip,
                               runtime_linear, runtime_weight)


class TailorConfig(PretrainedConfig):
    model_type = "tailor_llama"

    def __init__(self, vocab_size: int = 49152, hidden_size: int = 576, num_attention_heads: int = 9,
                 num_key_value_heads: int = 3, head_dim: int = 64, intermediate_size: int = 1536,
                 num_hidden_layers: int = 30, rms_norm_eps: float = 1e-5, rope_theta: float = 100000.0,
                 max_position_embeddings: int = 8192, layer_kv_heads: list[int] | None = None,
                 layer_ffn: list[int] | None = None, layer_bits: list[dict[str, int]] | None = None,
                 embed_bits: int = 16, quant_format: str = "gguf", subnet: dict | None = None,
                 runtime_emulation: bool = False, family: str = "llama", attention_bias: bool = False,
                 rope_freq_scaling: dict | None = None, source: dict | None = None,
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
        self.family = family  # the model seam's family this model came from (tailor.models.families)
        self.attention_bias = attention_bias  # q/k/v projections carry biases (Qwen2); o never does
        # None = plain RoPE; {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
        # "original_max_position_embeddings"} = Llama 3.1's frequency scaling
        self.rope_freq_scaling = rope_freq_scaling  # not `rope_scaling`: transformers rewrites that key
        self.source = source  # {"name", "sha256"} of the base model this one descends from
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class QLinear(nn.Linear):
    """Linear whose weight is sliced to an active prefix and fake-quantized on the export grid."""

    def __init__(self, in_features: int, out_features: int, bits: int = 16, fmt: str = "gguf", bias: bool = False):
        # A bias (Qwen2's q/k/v) is sliced with the rows and stays float32: both formats store it so.
        super().__init__(in_features, out_features, bias=bias)
        self.bits, self.fmt = bits, fmt
        self.active_out, self.active_in = out_features, in_features
        # Learned clipping range per (format, bit-width), a factor on each block's range (1 = none).
        self.qclip = nn.Parameter(torch.ones(len(FMT_INDEX), CLIP_SLOTS))
        # Inference computes as the device runtime does (llama.cpp also rounds activations), so what
        # evaluate measures is what the exported file scores. Training always uses plain fake quant.
        self.runtime_emulation = False
        self._cache: tuple | None = None
        self._rt_cache: tuple | None = None
        self._pre: tuple | None = None  # (key, weight) from `grouped_weights`, for one forward

    def gamma(self) -> torch.Tensor | None:
        """The learned clipping factor of the current format and bit-width (None at 16 bits)."""
        return self.qclip[FMT_INDEX[self.fmt], clip_slot(self.fmt, self.bits)] if learns_clip(self.bits) else None

    def _key(self, w: torch.Tensor) -> tuple:
        return (self.weight._version, self.qclip._version, self.active_out, self.active_in, self.bits, self.fmt,
                w.device, w.dtype)

    def sliced(self) -> torch.Tensor:
        """The active prefix of the weight; the weight itself when the whole of it is active (a full-range
        slice would still cost its backward a zero-filled copy of the whole gradient)."""
        if (self.active_out, self.active_in) == (self.out_features, self.in_features):
            return self.weight
        return self.weight[: self.active_out, : self.active_in]

    def active_weight(self) -> torch.Tensor:
        w = self.sliced()
        if self.bits == 16:
            return w
        if self.trains_quant():
            if self._pre is not None and self._pre[0] == self._key(w):
                return self._pre[1]
            return fake_quant(w, self.bits, self.fmt, self.gamma())
        # Inference: quantizing every call is wasted work, so cache until weight, clip or slice changes.
        key = self._key(w)
        if self._cache is None or self._cache[0] != key:
            g = self.gamma()
            self._cache = (key, fake_quant(w.detach(), self.bits, self.fmt, None if g is None else g.detach()))
        return self._cache[1]

    def trains_quant(self) -> bool:
        """Whether this forward fake-quantizes with gradients (training), not from the inference cache."""
        return self.bits != 16 and torch.is_grad_enabled() and (self.weight.requires_grad or self.qclip.requires_grad)

    def clipped_weight(self) -> torch.Tensor:
        """The active weight clamped to its learned range: the float values export quantizes."""
        w = self.weight[: self.active_out, : self.active_in].detach()
        return w if self.bits == 16 else clipped(w, self.gamma(), self.fmt, self.bits)

    @torch.no_grad()
    def bake_clip_(self) -> None:
        """Write the learned clipping into the weight and reset it: same quantized values, no state."""
        if learns_clip(self.bits):
            self.weight[: self.active_out, : self.active_in] = self.clipped_weight()
        self.qclip.fill_(1.0)

    def emulating(self) -> bool:
        return self.runtime_emulation and not torch.is_grad_enabled()

    def active_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[: self.active_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., : self.active_in]
        if self.emulating():
            w = self.weight[: self.active_out, : self.active_in]
            key = self._key(w)
            if self._rt_cache is None or self._rt_cache[0] != key:
                self._rt_cache = (key, runtime_weight(self.clipped_weight(), self.bits, self.fmt))
            y = runtime_linear(x, self._rt_cache[1], self.bits, self.fmt)
            return y if self.bias is None else y + self.active_bias()
        return F.linear(x, self.active_weight(), self.active_bias())


@contextlib.contextmanager
def grouped_weights(linears: list[QLinear]):
    """Inside: each training QLinear of `linears` reads its fake-quantized weight from one
    `fake_quant_group` call per (format, choice) instead of quantizing alone; the same values and
    gradients, a few quantizer calls per forward instead of one per matrix (the supernet and QAT steps
    of small models are launch-bound). The weights are dropped on exit: no copy outlives the forward
    (activation checkpointing's recompute quantizes per matrix, to the same values)."""
    groups: dict[tuple, list[QLinear]] = {}
    for q in linears:
        if q.trains_quant():
            groups.setdefault((q.fmt, q.bits), []).append(q)
    try:
        for (fmt, bits), qs in groups.items():
            ws = [q.sliced() for q in qs]
            dev = ws[0].device.type
            # under autocast F.linear would cast each weight alone: cast the group once (same rounding)
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            # the clips as one gather from the stacked tables: per matrix, its gradient lands without
            # the zero-filled copies two selects of its own table would cost
            gammas = torch.stack([q.qclip for q in qs])[:, FMT_INDEX[fmt], clip_slot(fmt, bits)]
            for q, w, wq in zip(qs, ws, fake_quant_group(ws, bits, fmt, gammas, dtype)):
                q._pre = (q._key(w), wq)
        yield
    finally:
        for qs in groups.values():
            for q in qs:
                q._pre = None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# A block's elementwise chains (norms, RoPE, SwiGLU: ~25 small kernels a layer and pass, forward and backward),
# fused by torch.compile for CUDA training (`enable_compile`, through tailor.accel): a small model's supernet
# step is bound by kernel launches. Inference stays eager, so what evaluate and export see never changes.
_fused: dict[str, Any] = {}


def _chain(name: str, eager: Any, x: torch.Tensor) -> Any:
    f = _fused.get(name)
    return f if f is not None and x.is_cuda and torch.is_grad_enabled() else eager


def enable_compile() -> None:
    """Compile the blocks' elementwise chains (dynamic shapes: one graph across elastic widths)."""
    for name, fn in (("rms_norm", _rms_norm), ("rope", _rope), ("swiglu", _swiglu)):
        if name not in _fused:
            _fused[name] = torch.compile(fn, dynamic=True)


def disable_compile() -> None:
    _fused.clear()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chain("rms_norm", _rms_norm, x)(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32 of rotate-half RoPE: theta^(-2i/head_dim), and with
    `scaling` {"rope_type": "llama3", ...} Llama 3.1's rescaling (Meta's `apply_scaling` in llama-models,
    also transformers' `_compute_llama3_parameters`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than
    original / high_freq_factor kept, and the band between interpolated smoothly."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not scaling:
        return inv
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope scaling {scaling.get('rope_type')!r} is not supported (only llama3)")
    factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(between, mid, scaled)


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor, dtype: torch.dtype,
                scaling: dict | None = None):
    """cos, sin (T, head_dim) for `positions` (T,), rotate-half layout."""
    inv = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
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
        b = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = QLinear(h, q, bits.get("q", 16), f, bias=b)
        self.k_proj = QLinear(h, kv, bits.get("k", 16), f, bias=b)
        self.v_proj = QLinear(h, kv, bits.get("v", 16), f, bias=b)
        self.o_proj = QLinear(q, h, bits.get("o", 16), f)

    def set_kv(self, kv: int) -> None:
        self.kv_heads = kv
        q = kv * self.q_per_kv * self.head_dim
        self.q_proj.active_out = self.o_proj.active_in = q
        self.k_proj.active_out = self.v_proj.active_out = kv * self.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, hidden); cos, sin (T, hd) or (B, 1, T, hd); mask None = causal, else (B, 1, T, T) bool,
        True where a query (row) may attend a key (column)."""
        B, T, _ = x.shape
        nq, nkv, hd = self.kv_heads * self.q_per_kv, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, nq, hd).transpose(1, 2)  # (B, nq, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = _chain("rope", _rope, q)(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # (B, nq, T, hd)
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
        gate = self.gate_proj(x)
        return self.down_proj(_chain("swiglu", _swiglu, gate)(gate, self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: TailorConfig, i: int):
        super().__init__()
        bits = cfg.layer_bits[i] or {}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.layer_kv_heads[i], bits)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, cfg.layer_ffn[i], bits)
        self.active = True  # elastic depth: an inactive block is the identity

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
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
        # Training forwards quantize the layers' weights in one call per grid (`grouped_weights`): None =
        # on CUDA only (there it saves launches; on a CPU the stacked weights leave the caches: ~4x slower
        # quantizer), True = always, False = never (FSDP2's sharded copy).
        self.grouped_quant: bool | None = None
        self.post_init()
        set_runtime_emulation(self, getattr(config, "runtime_emulation", False))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        if self.tied:  # an untied head keeps its own weight: never silently replaced by the embedding
            self.lm_head.weight = self.model.embed_tokens.weight

    def input_table(self) -> torch.Tensor | None:
        """The token-embedding table as the exported file stores it: for an untied model, the input
        table fake-quantized at the head's bits (plain round-to-nearest, no learned clip); None at 16
        bits (the lookup reads the float table). Cached while the table is frozen."""
        head, w = self.lm_head, self.model.embed_tokens.weight
        if head.bits == 16:
            return None
        if torch.is_grad_enabled() and w.requires_grad:
            return fake_quant(w, head.bits, head.fmt)
        key = (w._version, head.bits, head.fmt, w.device, w.dtype)
        cache = getattr(self, "_table_cache", None)
        if cache is None or cache[0] != key:
            cache = self._table_cache = (key, fake_quant(w.detach(), head.bits, head.fmt))
        return cache[1]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(input table for `hidden_states`, head weight for `head`), each as the exported file stores
        it, or None where the plain module serves. Tied: the fake-quantized table once for both uses (the
        file stores it once); untied: the input table (`input_table`) and the head's own weight."""
        if not self.tied:
            return self.input_table(), None
        if self.lm_head.bits == 16:
            return None, None
        table = self.lm_head.active_weight()
        return table, table

    def head(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of final hidden states `h`: `weight` from `tables()` saves re-quantizing it."""
        if weight is None or self.lm_head.emulating():
            return self.lm_head(h)
        return F.linear(h, weight)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim) of this model's RoPE (its base and scaling) at `positions` (T,)."""
        c = self.config
        return rope_tables(c.head_dim, c.rope_theta, positions, dtype, getattr(c, "rope_freq_scaling", None))

    def hidden_states(self, input_ids: torch.Tensor, table: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, hidden) of input_ids (B, T).

        positions (B, T) and mask (B, 1, T, T) bool (True: the row's token may attend the column's) let one row
        hold several sequences that share a prefix (tailor.eval.scorer packs a question's context once with all
        its answers); None = positions 0..T-1 and causal attention."""
        x = self.model.embed_tokens(input_ids) if table is None else F.embedding(input_ids, table)  # (B, T, h)
        if positions is None:
            cos, sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        else:  # (B, 1, T, hd): broadcast over the heads
            cos, sin = (t.view(*positions.shape, -1)[:, None] for t in self.rope(positions.reshape(-1), x.dtype))
        # Activation checkpointing (`activation_checkpointing = True`): keep each block's input only and
        # recompute the block in backward (torch.utils.checkpoint; ~1/3 more compute, activations / L).
        ckpt = getattr(self, "activation_checkpointing", False) and torch.is_grad_enabled()
        active = [block for block in self.model.layers if block.active]
        g = getattr(self, "grouped_quant", None)
        # not under checkpointing: its recompute in backward quantizes per matrix, and must save what the
        # forward saved
        group = torch.is_grad_enabled() and (g or (g is None and x.is_cuda)) and not ckpt
        with grouped_weights([q for b in active for q in b.modules() if isinstance(q, QLinear)] if group else []):
            for block in active:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False) if ckpt else block(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        # Causal attention over right-padded batches: padding only affects positions after the text,
        # whose logits callers ignore, so attention_mask needs no further handling here.
        table, head = self.tables()
        logits = self.head(self.hidden_states(input_ids, table), head).float()  # (B, T, V)
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
