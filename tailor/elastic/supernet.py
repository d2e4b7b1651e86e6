"""Elastic supernet over Tailor's Llama: set_active / set_max / export_active (once-for-all style).

The supernet is the dense model itself: every QLinear keeps its largest weight and slices a prefix in
forward; bits switch the fake-quant grid per matrix; an inactive block is skipped. Importance
ordering (tailor.elastic.importance) makes the prefixes the most useful channels.
"""
from __future__ import annotations

import torch

from tailor.arch import MATRICES, BaseArch, LayerConfig, SubnetConfig
from tailor.formats import backend
from tailor.models.model import Block, QLinear, TailorConfig, TailorForCausalLM

_PROJ = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
         "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
         "down": ("mlp", "down_proj")}


def linear(block: Block, matrix: str) -> QLinear:
    part, name = _PROJ[matrix]
    return getattr(getattr(block, part), name)


def arch_of(model: TailorForCausalLM) -> BaseArch:
    return BaseArch.from_hf(model.config)


def set_active(model: TailorForCausalLM, cfg: SubnetConfig, fmt: str = "gguf") -> None:
    """Make the supernet compute the subnet `cfg`, fake-quantized on export format `fmt`'s grid."""
    cfg.validate(arch_of(model))
    for block, lc in zip(model.model.layers, cfg.layers):
        set_block_active(block, lc, fmt)
    model.lm_head.bits, model.lm_head.fmt = cfg.embed_bits, fmt


def set_block_active(block: Block, lc: LayerConfig, fmt: str = "gguf") -> None:
    """One decoder block's share of `set_active`: kept or skipped, KV groups, FFN width, bits per matrix."""
    block.active = lc.keep
    block.self_attn.set_kv(lc.kv_groups)
    block.mlp.set_ffn(lc.ffn)
    for m in MATRICES:
        q = linear(block, m)
        q.bits, q.fmt = lc.bits[m], fmt


def set_max(model: TailorForCausalLM) -> None:
    set_active(model, SubnetConfig.max(arch_of(model)))


def export_active(model: TailorForCausalLM, cfg: SubnetConfig, fmt: str = "gguf") -> TailorForCausalLM:
    """A standalone model of subnet `cfg` with physically smaller tensors, carrying `cfg` in its config.

    Its forward equals the supernet's under `set_active(cfg, fmt)` (a test checks this)."""
    arch = arch_of(model)
    cfg.validate(arch)
    kept = [(block, lc) for block, lc in zip(model.model.layers, cfg.layers) if lc.keep]
    base = model.config
    # every base field carries over (family, biases, tying, RoPE, source); only the widths change
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
    fields.update(num_hidden_layers=len(kept), layer_kv_heads=[lc.kv_groups for _, lc in kept],
                  layer_ffn=[lc.ffn for _, lc in kept], layer_bits=[dict(lc.bits) for _, lc in kept],
                  embed_bits=cfg.embed_bits, quant_format=fmt, subnet=cfg.to_dict(),
                  runtime_emulation=backend(fmt).runtime_emulation)
    new_cfg = TailorConfig(**fields)
    out = TailorForCausalLM(new_cfg)
    hd, qpk = base.head_dim, base.num_attention_heads // base.num_key_value_heads
    with torch.no_grad():
        out.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        out.model.norm.weight.copy_(model.model.norm.weight)
        for dst, (src, lc) in zip(out.model.layers, kept):
            q, kv = lc.kv_groups * qpk * hd, lc.kv_groups * hd
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            slices = {"q": (q, None), "k": (kv, None), "v": (kv, None), "o": (None, q),
                      "gate": (lc.ffn, None), "up": (lc.ffn, None), "down": (None, lc.ffn)}
            for m, (rows, cols) in slices.items():
                w = linear(src, m).weight
                linear(dst, m).weight.copy_(w[:rows] if rows is not None else w[:, :cols])
                linear(dst, m).qclip.copy_(linear(src, m).qclip)
                if linear(src, m).bias is not None:  # q/k/v biases follow their rows
                    linear(dst, m).bias.copy_(linear(src, m).bias[:rows])
        if not base.tie_word_embeddings:
            out.lm_head.weight.copy_(model.lm_head.weight)
        out.lm_head.qclip.copy_(model.lm_head.qclip)
    out.tie_weights()
    bake_clip_(out)  # the learned clipping goes into the weights: export packs plain weights
    round16_(out)
    return out.to(model.device).eval()


@torch.no_grad()
def bake_clip_(model: TailorForCausalLM) -> None:
    """Clamp every quantized matrix to its learned range and reset the clipping factors: the model
    computes the same, and its weights are what export packs."""
    # The tied table too: below 16 bits both its uses read the one fake-quantized table, so clamping it to
    # its learned range changes nothing the model computes; export packs the raw table and would otherwise
    # drop a clip that fine-tuning with train_embeddings moved.
    for mod in model.modules():
        if isinstance(mod, QLinear):
            mod.bake_clip_()


@torch.no_grad()
def round16_(model: TailorForCausalLM) -> None:
    """Round 16-bit matrices to float16 values: both export formats store them as F16, so the
    PyTorch model computes with exactly the numbers the device will."""
    for mod in model.modules():
        if isinstance(mod, QLinear) and mod.bits == 16:
            mod.weight.copy_(mod.weight.half().float())
    if not model.config.tie_word_embeddings and model.lm_head.bits == 16:  # an untied input table too
        emb = model.model.embed_tokens.weight
        emb.copy_(emb.half().float())


def subnet_of(model: TailorForCausalLM) -> SubnetConfig | None:
    """The SubnetConfig an extracted model was built from (None for a dense model)."""
    d = getattr(model.config, "subnet", None)
    return SubnetConfig.from_dict(d) if d else None
