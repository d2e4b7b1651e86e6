"""Importance on calibration data, and the permutation that makes every subnet a prefix slice.

- FFN neurons: mean |silu(gate) * up| (the down projection's input), Minitron-style activation importance.
- KV groups: mean L2 norm of the group's attention output (its query heads' share of the o_proj input).
- Layers: block importance 1 - cos(x_in, x_out) (ShortGPT); low = the block barely changes its input.
Permuting neurons and groups leaves the model's function unchanged (a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tailor.models.model import TailorForCausalLM


@dataclass
class Importance:
    ffn: list[torch.Tensor]  # per layer, (ffn,)
    kv: list[torch.Tensor]  # per layer, (n_kv,)
    block: list[float]  # per layer

    def drop_order(self) -> list[int]:
        """Layers from least to most important."""
        return sorted(range(len(self.block)), key=lambda i: self.block[i])


@torch.no_grad()
def measure(model: TailorForCausalLM, batches: list[torch.Tensor]) -> Importance:
    cfg = model.config
    layers = model.model.layers
    n = len(layers)
    ffn = [torch.zeros(cfg.layer_ffn[i]) for i in range(n)]
    kv = [torch.zeros(cfg.layer_kv_heads[i]) for i in range(n)]
    block = [0.0] * n
    count = 0
    hooks = []

    def ffn_hook(i):
        def fn(mod, args):
            ffn[i] += args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).sum(0).cpu()
        return fn

    def attn_hook(i):
        def fn(mod, args):
            x = args[0].detach().float()  # (B, T, nq*hd)
            groups = x.reshape(-1, cfg.layer_kv_heads[i], x.shape[-1] // cfg.layer_kv_heads[i])
            kv[i] += groups.norm(dim=-1).sum(0).cpu()
        return fn

    def block_hook(i):
        def fn(mod, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            block[i] += float((1 - cos).sum())
        return fn

    for i, blk in enumerate(layers):
        hooks += [blk.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)),
                  blk.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)),
                  blk.register_forward_hook(block_hook(i))]
    try:
        for ids in batches:
            model(ids.to(model.device))
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return Importance([f / count for f in ffn], [k / count for k in kv], [b / count for b in block])


@torch.no_grad()
def permute_(model: TailorForCausalLM, imp: Importance) -> None:
    """Reorder FFN neurons and KV groups (with their query heads) by descending importance, in place."""
    cfg = model.config
    hd, qpk = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    for i, blk in enumerate(model.model.layers):
        order = torch.argsort(imp.ffn[i], descending=True, stable=True)
        mlp = blk.mlp
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[order])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[order])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])
        imp.ffn[i] = imp.ffn[i][order]

        g = torch.argsort(imp.kv[i], descending=True, stable=True)
        kv_rows = torch.cat([torch.arange(j * hd, (j + 1) * hd) for j in g.tolist()])
        q_rows = torch.cat([torch.arange(j * qpk * hd, (j + 1) * qpk * hd) for j in g.tolist()])
        att = blk.self_attn
        att.q_proj.weight.copy_(att.q_proj.weight[q_rows])
        att.k_proj.weight.copy_(att.k_proj.weight[kv_rows])
        att.v_proj.weight.copy_(att.v_proj.weight[kv_rows])
        att.o_proj.weight.copy_(att.o_proj.weight[:, q_rows])
        if att.q_proj.bias is not None:  # Qwen2's q/k/v biases move with their rows
            att.q_proj.bias.copy_(att.q_proj.bias[q_rows])
            att.k_proj.bias.copy_(att.k_proj.bias[kv_rows])
            att.v_proj.bias.copy_(att.v_proj.bias[kv_rows])
        imp.kv[i] = imp.kv[i][g]
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj, att.q_proj, att.k_proj, att.v_proj, att.o_proj):
            lin._cache = None
