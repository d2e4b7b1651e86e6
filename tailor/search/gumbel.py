"""Strategy (c): differentiable search (the seed article's): Gumbel-softmax logits over every choice,
trained on the frozen supernet with a penalty on expected bytes above the budget.

Per layer: keep (droppable layers), KV groups, FFN width (the measured options) and each matrix's
bit-width. A forward pass mixes the options with Gumbel-softmax weights: a matrix's weight is the
weighted sum of its fake-quantized versions; KV groups and FFN channels are soft prefix masks
(P(width >= channel)); a dropped layer's residual branch is scaled by P(keep). The expected bytes
are exact in expectation (each matrix's bytes are affine in its bit choice for a fixed width, and
widths and bits are independent). After training, the argmax subnet is repaired to fit the budget.

Choices that fit only some matrices or widths (GGUF's 256-block K-quants on a model whose rows are not
whole 256s) are refused: the mixture gives every matrix the same choices at every width. Costly too: the
mixture keeps one quantized copy per choice per matrix (at 0.5B and four bit-widths it already passed
21 GB). Search such devices with MIP and NSGA-II (config validation says so before any stage runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailor.arch import FFN_STEP, MATRICES, LayerConfig, SubnetConfig, fixed_bytes, layer_vector_bytes
from tailor.distill import kd_loss
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import linear, set_active
from tailor.models.model import TailorForCausalLM
from tailor.quant.fake import FMT_INDEX, clip_slot, fake_quant, learns_clip
from tailor.quant.formats import matrix_bytes
from tailor.search.sensitivity import ffn_options


@dataclass
class GumbelResult:
    config: SubnetConfig
    expected_bytes: float
    losses: list[float]


def search(model: TailorForCausalLM, space: SearchSpace, fmt: str, embed_bits: int, budget: int,
           seqs: torch.Tensor, teacher: list[torch.Tensor], steps: int, seed: int, lr: float = 0.05,
           penalty: float = 5.0, tau: tuple[float, float] = (2.0, 0.3), batch_size: int = 8) -> GumbelResult:
    arch = space.arch
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    set_active(model, SubnetConfig.max(arch, bits=16, embed_bits=embed_bits), fmt)
    model.requires_grad_(False)
    bits = list(space.bits)
    narrow = {m: [b for b in bits if b not in space.choices_for(m)] for m in MATRICES}
    if any(narrow.values()) or space.ffn_step != FFN_STEP:
        raise ValueError(f"gumbel: choices {sorted({b for v in narrow.values() for b in v} or set(bits), key=str)} "
                         "do not fit every matrix at every width (K-quants need whole 256s); "
                         "search this device with strategies mip and nsga")
    ffns = ffn_options(space)
    kvs = list(range(space.min_kv, arch.n_kv_heads + 1))
    L = arch.n_layers
    logits = {
        "bits": torch.zeros(L, len(MATRICES), len(bits), device=dev),
        "kv": torch.zeros(L, len(kvs), device=dev),
        "ffn": torch.zeros(L, len(ffns), device=dev),
        "keep": torch.zeros(L, 2, device=dev),  # [drop, keep]
    }
    logits["keep"][:, 1] = 2.0  # start near the full model: dropping must earn its place
    for t in logits.values():
        t.requires_grad_(True)
    droppable = torch.tensor([i in space.droppable for i in range(L)], device=dev)
    opt = torch.optim.Adam(logits.values(), lr=lr)
    probs: dict[str, torch.Tensor] = {}
    hooks = []

    def sample(t: float) -> None:
        for k, v in logits.items():
            u = torch.rand(v.shape, generator=gen).to(dev).clamp(1e-6, 1 - 1e-6)
            probs[k] = F.softmax((v - torch.log(-torch.log(u))) / t, dim=-1)
        keep = probs["keep"][:, 1]
        probs["p_keep"] = torch.where(droppable, keep, torch.ones_like(keep))

    quantized: dict[tuple[int, int], list[torch.Tensor]] = {}  # weights are frozen: quantize once

    def mixed_weight(i: int, j: int, q):  # Gumbel mix of the matrix's quantized versions
        if (i, j) not in quantized:
            with torch.no_grad():
                quantized[(i, j)] = [fake_quant(q.weight, b, fmt, q.qclip[FMT_INDEX[fmt], clip_slot(fmt, b)] if learns_clip(b) else None)
                                     for b in bits]
        return sum(probs["bits"][i, j, k] * wq for k, wq in enumerate(quantized[(i, j)]))

    qpk, hd = arch.q_per_kv, arch.head_dim

    def channel_mask(p: torch.Tensor, widths: list[int], total: int, unit: int) -> torch.Tensor:
        """P(active width >= channel) per channel, a soft prefix mask."""
        m = torch.zeros(total, device=dev)
        for pk, w in zip(p, widths):
            m = m + pk * (torch.arange(total, device=dev) < w * unit).float()
        return m

    originals = {}
    for i, blk in enumerate(model.model.layers):
        for j, m in enumerate(MATRICES):
            q = linear(blk, m)
            originals[(i, m)] = q.active_weight
            q.active_weight = (lambda i=i, j=j, q=q: mixed_weight(i, j, q))
        hooks.append(blk.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, a, i=i: (a[0] * channel_mask(probs["kv"][i], kvs, a[0].shape[-1], qpk * hd),)))
        hooks.append(blk.mlp.down_proj.register_forward_pre_hook(
            lambda mod, a, i=i: (a[0] * channel_mask(probs["ffn"][i], ffns, a[0].shape[-1], 1),)))
        hooks.append(blk.register_forward_hook(
            lambda mod, a, out, i=i: a[0] + probs["p_keep"][i] * (out - a[0])))

    fixed = fixed_bytes(arch, fmt, embed_bits)
    # per kept layer at each KV-width option: norms (+ q/k/v biases, which shrink with the heads)
    vec = torch.tensor([float(layer_vector_bytes(arch, fmt, kv)) for kv in kvs], device=dev)

    # bytes[j][w, b] of matrix j at width option w and bit-width b (the same for every layer)
    sizes = []
    for m in MATRICES:
        shapes = ([arch.matrix_shape(m, kv, arch.ffn) for kv in kvs] if m in ("q", "k", "v", "o")
                  else [arch.matrix_shape(m, arch.n_kv_heads, f) for f in ffns])
        sizes.append(torch.tensor([[float(matrix_bytes(fmt, b, r, c)) for b in bits] for r, c in shapes], device=dev))

    def expected_bytes() -> torch.Tensor:
        # E over width of E over bits of bytes(bits, width): the choices are independent
        layer = probs["kv"] @ vec  # (L,)
        for j, m in enumerate(MATRICES):
            pw = probs["kv"] if m in ("q", "k", "v", "o") else probs["ffn"]  # (L, W)
            layer = layer + torch.einsum("lw,wb,lb->l", pw, sizes[j], probs["bits"][:, j])
        return fixed + (probs["p_keep"] * layer).sum()

    losses = []
    batches = [seqs[k: k + batch_size].to(dev).long() for k in range(0, len(seqs), batch_size)]
    try:
        for step in range(steps):
            t = tau[0] * (tau[1] / tau[0]) ** (step / max(1, steps - 1))  # anneal the temperature
            sample(t)
            b = step % len(batches)
            kl = kd_loss(model(batches[b]).logits, teacher[b].to(dev))
            eb = expected_bytes()
            loss = kl + penalty * F.relu(eb / budget - 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(kl))
    finally:
        for h in hooks:
            h.remove()
        for (i, m), fn in originals.items():
            del linear(model.model.layers[i], m).active_weight  # back to the class method
    with torch.no_grad():
        sample(1e-3)
        eb = float(expected_bytes())
    layers = []
    for i in range(L):
        keep = bool(i not in space.droppable or logits["keep"][i].argmax() == 1)
        layers.append(LayerConfig(keep, kvs[int(logits["kv"][i].argmax())], ffns[int(logits["ffn"][i].argmax())],
                                  {m: bits[int(logits["bits"][i, j].argmax())] for j, m in enumerate(MATRICES)}))
    # respect the cap on dropped layers: keep the most-wanted ones beyond it
    dropped = [i for i, lc in enumerate(layers) if not lc.keep]
    if len(dropped) > space.max_drop:
        dropped.sort(key=lambda i: float(logits["keep"][i, 1] - logits["keep"][i, 0]))
        for i in dropped[space.max_drop:]:
            layers[i] = LayerConfig(True, layers[i].kv_groups, layers[i].ffn, layers[i].bits)
    return GumbelResult(SubnetConfig(tuple(layers), embed_bits=embed_bits), eb, losses)
