"""First search strategy: structured seeds plus random subnets, each scored on the supernet.

Every candidate gets its exact bytes and predicted latency from the device cost model and its mean
KL to the base model (and next-token loss) on the validation shard; the best that fits the budget
wins. MIP, NSGA-II and Gumbel strategies plug in beside this one with the same inputs and outputs.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.progress import track

from tailor.arch import FFN_STEP, MATRICES, LayerConfig, SubnetConfig
from tailor.devices import budget_bytes, cost
from tailor.distill import kd_loss
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import set_active
from tailor.models.model import TailorForCausalLM

if TYPE_CHECKING:  # pydantic stays out of the import path of the GPU benchmarks
    from tailor.config import DeviceProfile


class NoFeasibleSubnet(ValueError):
    """The device budget is below the smallest subnet in the space."""


@dataclass
class Candidate:
    config: SubnetConfig
    nbytes: int
    bits_per_param: float
    latency_s: float
    kl: float = float("nan")
    val_loss: float = float("nan")
    origin: str = "random"

    @property
    def rank_kl(self) -> float:
        """KL for ranking: a candidate whose KL is NaN (a broken subnet, or never scored) ranks last and is
        never chosen: min() over raw KLs would keep a NaN that came first, since nan < x is False."""
        return self.kl if math.isfinite(self.kl) else math.inf

    def row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "config"}
        d.update(config_hash=self.config.hash, kept_layers=len(self.config.kept))
        return d


def seeds(space: SearchSpace) -> list[SubnetConfig]:
    """Uniform subnets over bits x FFN width x depth x KV groups: the obvious corners of the space."""
    arch = space.arch
    out = []
    fracs = sorted({1.0, 0.75, 0.5, space.min_ffn / arch.ffn}, reverse=True)
    drops = sorted({0, space.max_drop // 2, space.max_drop})
    kvs = sorted({arch.n_kv_heads, space.min_kv}, reverse=True)
    for bits, frac, n_drop, kv in itertools.product(space.bits, fracs, drops, kvs):
        cfg = SubnetConfig.uniform(arch, bits, embed_bits=max(space.embed_bits), ffn_frac=frac, kv_groups=kv,
                                   drop=space.drop_order[:n_drop])
        if space.ffn_step != FFN_STEP or any(bits not in space.choices_for(m) for m in MATRICES):
            cfg = _fitted(space, cfg, bits)
        if space.contains(cfg):
            out.append(cfg)
    return out


def _fitted(space: SearchSpace, cfg: SubnetConfig, bits) -> SubnetConfig:
    """A uniform seed in a space with types that fit only some matrices (K-quants): widths on the space's
    FFN grid, and each matrix `bits` where it fits, else the next larger choice that does (else its largest)."""
    widths = space.ffn_widths()
    rank = space.bits.index(bits)
    per = {m: next((c for c in space.choices_for(m) if space.bits.index(c) >= rank), space.choices_for(m)[-1])
           for m in MATRICES}
    layers = tuple(LayerConfig(lc.keep, lc.kv_groups, min(widths, key=lambda w: (abs(w - lc.ffn), w)), dict(per))
                   for lc in cfg.layers)
    return SubnetConfig(layers, embed_bits=cfg.embed_bits)


def propose(space: SearchSpace, device: DeviceProfile, n: int, seed: int) -> list[Candidate]:
    """Up to `n` distinct candidates that fit the budget: seeds first (largest first), then random."""
    arch = space.arch
    smallest = cost(space.min(), arch, device)
    if not smallest.fits:
        raise NoFeasibleSubnet(f"budget {budget_bytes(device, arch):,} B is below the smallest subnet "
                               f"({smallest.nbytes:,} B in {device.format})")
    seen: set[str] = set()
    out: list[Candidate] = []

    def add(cfg: SubnetConfig, origin: str) -> None:
        c = cost(cfg, arch, device)
        if c.fits and cfg.hash not in seen and len(out) < n:
            seen.add(cfg.hash)
            out.append(Candidate(cfg, c.nbytes, c.bits_per_param, c.latency_s, origin=origin))

    ranked = sorted(seeds(space), key=lambda c: -cost(c, arch, device).nbytes)
    for cfg in ranked[: max(1, n // 2)]:
        add(cfg, "seed")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20 * n):
        if len(out) >= n:
            break
        cfg = space.sample(gen)
        if cost(cfg, arch, device).fits:
            add(cfg, "random")
        else:
            add(shrink_to_fit(cfg, space, device, gen), "repaired")
    add(space.min(), "min")
    return out


def shrink_to_fit(cfg: SubnetConfig, space: SearchSpace, device: DeviceProfile, gen: torch.Generator) -> SubnetConfig:
    """Random shrinking moves (one matrix a choice lower, an FFN one step narrower, a KV group fewer) until
    `cfg` fits the budget: random samples mostly overshoot a tight budget, and the repaired ones land
    just under it, where the best subnets are."""
    arch = space.arch
    lower = {m: dict(zip(c[1:], c[:-1])) for m, c in ((m, space.choices_for(m)) for m in MATRICES)}
    while not cost(cfg, arch, device).fits:
        moves = []
        for i in cfg.kept:
            lc = cfg.layers[i]
            moves += [(i, "bits", m) for m in lc.bits if lower[m].get(lc.bits[m]) is not None]
            moves += [(i, "ffn", None)] * (lc.ffn > space.min_ffn) + [(i, "kv", None)] * (lc.kv_groups > space.min_kv)
        if not moves:
            break
        i, kind, m = moves[int(torch.randint(len(moves), (1,), generator=gen))]
        lc = cfg.layers[i]
        if kind == "bits":
            cfg = cfg.with_layer(i, bits={**lc.bits, m: lower[m][lc.bits[m]]})
        elif kind == "ffn":
            cfg = cfg.with_layer(i, ffn=max(space.min_ffn, lc.ffn - space.ffn_step))
        else:
            cfg = cfg.with_layer(i, kv_groups=lc.kv_groups - 1)
    return cfg


@torch.no_grad()
def score(model: TailorForCausalLM, cand: Candidate, fmt: str, seqs: torch.Tensor,
          teacher: list[torch.Tensor], batch_size: int) -> None:
    """Fill in the candidate's KL to the base model and next-token loss on `seqs`."""
    set_active(model, cand.config, fmt)
    dev = next(model.parameters()).device
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    for j, i in enumerate(range(0, len(seqs), batch_size)):
        ids = seqs[i: i + batch_size].to(dev).long()
        logits = model(ids).logits
        kl_sum += float(kd_loss(logits, teacher[j].to(dev))) * ids.numel()
        ce_sum += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                        reduction="sum"))
        n += ids.numel()
    cand.kl, cand.val_loss = kl_sum / n, ce_sum / (n - len(seqs))


def run_search(model: TailorForCausalLM, space: SearchSpace, device: DeviceProfile, seqs: torch.Tensor,
               teacher: list[torch.Tensor], n: int, seed: int, batch_size: int = 8) -> tuple[Candidate, list[Candidate]]:
    cands = propose(space, device, n, seed)
    for cand in track(cands, description=f"search {device.format}", disable=not sys.stdout.isatty()):
        score(model, cand, device.format, seqs, teacher, batch_size)
    return best_scored(cands), cands


def best_scored(cands: list[Candidate]) -> Candidate:
    """Lowest KL, first on ties; NoFeasibleSubnet when no candidate has a finite KL."""
    best = min(cands, key=lambda c: c.rank_kl)
    if not math.isfinite(best.kl):
        raise NoFeasibleSubnet(f"all {len(cands)} candidates scored a non-finite KL (NaN/inf): none can be chosen")
    return best


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both bytes and KL."""
    front = []
    for c in sorted((c for c in cands if math.isfinite(c.kl)), key=lambda c: (c.nbytes, c.kl)):
        if not front or c.kl < front[-1].kl:
            front.append(c)
    return front
