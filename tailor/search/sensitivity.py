"""Sensitivity table: what each single change to the reference subnet costs in KL to the base model.

For every kept layer x matrix x bit-width, every droppable layer, every KV-group count and every FFN
width option, the change in mean KL on a held-out shard when only that piece changes (EXL2's
measurement pass, over structure as well as bits). Changing layer i leaves layers < i untouched, so the
hidden states entering each layer are computed once for the reference and every measurement runs
only the layers from i on. The table is cached on disk by what it depends on (supernet weights,
format, options, shard), never by the budget: re-targeting a budget does not re-measure.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track

from tailor.arch import FFN_STEP, MATRICES, LayerConfig, SubnetConfig, round_ffn
from tailor.distill import kd_loss
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import set_active
from tailor.models.model import TailorForCausalLM

FFN_FRACS = (0.25, 0.5, 0.75)


def ffn_options(space: SearchSpace) -> list[int]:
    """FFN widths measured (and offered to the MIP), widest first: on the space's width grid (steps of 256
    in a space with K-quants, so `ffn_down` keeps them)."""
    arch = space.arch
    opts = {arch.ffn} | {round_ffn(arch.ffn * f, arch.ffn) for f in FFN_FRACS}
    widths = space.ffn_widths()
    if space.ffn_step != FFN_STEP:
        opts = {min(widths, key=lambda w: (abs(w - o), w)) for o in opts}
    return sorted((w for w in opts if w >= space.min_ffn), reverse=True)


@dataclass
class SensTable:
    fmt: str
    reference: SubnetConfig
    base_kl: float
    bits: dict[str, float] = field(default_factory=dict)   # "layer:matrix:bits" -> delta KL
    drop: dict[str, float] = field(default_factory=dict)   # "layer" -> delta KL
    kv: dict[str, float] = field(default_factory=dict)     # "layer:groups" -> delta KL
    ffn: dict[str, float] = field(default_factory=dict)    # "layer:width" -> delta KL
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"fmt": self.fmt, "reference": self.reference.to_dict(), "base_kl": self.base_kl, "bits": self.bits,
                "drop": self.drop, "kv": self.kv, "ffn": self.ffn, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "SensTable":
        return cls(d["fmt"], SubnetConfig.from_dict(d["reference"]), d["base_kl"], d["bits"], d["drop"], d["kv"],
                   d["ffn"], d.get("seconds", 0.0))

    def predict(self, cfg: SubnetConfig) -> float:
        """Additive estimate of `cfg`'s KL: reference KL + the sum of its pieces' deltas."""
        ref = self.reference.layers
        total = self.base_kl
        for i, lc in enumerate(cfg.layers):
            if not lc.keep:
                total += self.drop[str(i)]
                continue
            total += sum(self.bits[f"{i}:{m}:{b}"] for m, b in lc.bits.items() if b != ref[i].bits[m])
            if lc.kv_groups != ref[i].kv_groups:
                total += self.kv[f"{i}:{lc.kv_groups}"]
            if lc.ffn != ref[i].ffn:
                total += _interp(self.ffn, i, lc.ffn, ref[i].ffn)
        return total


def _interp(table: dict[str, float], layer: int, width: int, full: int) -> float:
    """Delta at an FFN width between measured ones: linear in width (0 at the full width)."""
    pts = sorted([(full, 0.0)] + [(int(k.split(":")[1]), v) for k, v in table.items() if int(k.split(":")[0]) == layer])
    for (w0, d0), (w1, d1) in zip(pts, pts[1:]):
        if w0 <= width <= w1:
            return d0 + (d1 - d0) * (width - w0) / max(w1 - w0, 1)
    return pts[0][1] if width < pts[0][0] else 0.0


def reference(space: SearchSpace, embed_bits: int) -> SubnetConfig:
    """The widest subnet, each matrix at the highest choice the device allows for it, the device's embedding."""
    arch, top = space.arch, {m: space.choices_for(m)[-1] for m in MATRICES}
    return SubnetConfig(tuple(LayerConfig(True, arch.n_kv_heads, arch.ffn, dict(top)) for _ in range(arch.n_layers)),
                        embed_bits=embed_bits)


def cache_key(weights_sha: str, fmt: str, space: SearchSpace, embed_bits: int, seqs: torch.Tensor) -> str:
    blob = json.dumps({"w": weights_sha, "fmt": fmt, "bits": space.bits, "embed": embed_bits,
                       "ffn": ffn_options(space), "kv": space.min_kv, "drop": list(space.droppable),
                       "seqs": hashlib.sha256(seqs.numpy().tobytes()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_measure(cache: Path, key: str, model: TailorForCausalLM, space: SearchSpace, fmt: str, embed_bits: int,
                    seqs: torch.Tensor, teacher: list[torch.Tensor]) -> tuple[SensTable, bool]:
    """The cached table for `key`, else a fresh measurement written to the cache (atomically)."""
    path = cache / f"{key}.json"
    if path.is_file():
        return SensTable.from_dict(json.loads(path.read_text())), True
    table = measure(model, space, fmt, embed_bits, seqs, teacher)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_dict()))
    os.replace(tmp, path)
    return table, False


@torch.no_grad()
def measure(model: TailorForCausalLM, space: SearchSpace, fmt: str, embed_bits: int, seqs: torch.Tensor,
            teacher: list[torch.Tensor], batch_size: int = 8, max_jobs: int | None = None) -> SensTable:
    """The table (`max_jobs` truncates it: benchmarks time a sample of the work)."""
    import time

    t0 = time.perf_counter()
    ref = reference(space, embed_bits)
    dev = next(model.parameters()).device
    batches = [seqs[i: i + batch_size].to(dev).long() for i in range(0, len(seqs), batch_size)]
    set_active(model, ref, fmt)
    table, head = model.tables()  # the tables as the file stores them (tied or untied)
    pos = torch.arange(seqs.shape[1], device=dev)
    cos, sin = model.rope(pos, model.lm_head.weight.dtype)
    layers = model.model.layers
    # inputs[b][i] = hidden state entering layer i under the reference subnet
    inputs = []
    for ids in batches:
        x = model.model.embed_tokens(ids) if table is None else F.embedding(ids, table)
        xs = [x]
        for blk in layers:
            x = blk(x, cos, sin)
            xs.append(x)
        inputs.append(xs)

    def kl_from(i: int) -> float:
        tot, n = 0.0, 0
        for b, ids in enumerate(batches):
            x = inputs[b][i]
            for blk in layers[i:]:
                if blk.active:
                    x = blk(x, cos, sin)
            logits = model.head(model.model.norm(x), head).float()
            tot += float(kd_loss(logits, teacher[b].to(dev))) * ids.numel()
            n += ids.numel()
        return tot / n

    base = kl_from(len(layers))
    out = SensTable(fmt, ref, base)
    ffns = [w for w in ffn_options(space) if w != space.arch.ffn]
    kvs = list(range(space.min_kv, space.arch.n_kv_heads))
    jobs = [(i, "drop", None) for i in space.droppable]
    for i in range(space.arch.n_layers):
        jobs += [(i, "bits", (m, b)) for m in MATRICES for b in space.choices_for(m) if b != ref.layers[i].bits[m]]
        jobs += [(i, "kv", g) for g in kvs] + [(i, "ffn", w) for w in ffns]
    jobs = jobs[:max_jobs] if max_jobs else jobs
    for i, kind, opt in track(jobs, description=f"sensitivity {fmt}", disable=not sys.stdout.isatty()):
        lc = ref.layers[i]
        if kind == "drop":
            cfg = ref.with_layer(i, keep=False)
        elif kind == "bits":
            cfg = ref.with_layer(i, bits={**lc.bits, opt[0]: opt[1]})
        elif kind == "kv":
            cfg = ref.with_layer(i, kv_groups=opt)
        else:
            cfg = ref.with_layer(i, ffn=opt)
        set_active(model, cfg, fmt)
        d = kl_from(i) - base
        if kind == "drop":
            out.drop[str(i)] = d
        elif kind == "bits":
            out.bits[f"{i}:{opt[0]}:{opt[1]}"] = d
        else:
            getattr(out, kind)[f"{i}:{opt}"] = d
    set_active(model, ref, fmt)
    out.seconds = round(time.perf_counter() - t0, 2)
    return out
