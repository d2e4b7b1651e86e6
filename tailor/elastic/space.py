"""The space of subnets one supernet can become, and seeded sampling from it (OFA's sample_active)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tailor.arch import FFN_STEP, MATRICES, BaseArch, LayerConfig, SubnetConfig, round_ffn


@dataclass(frozen=True)
class SearchSpace:
    arch: BaseArch
    bits: tuple[int, ...]  # bit-widths each matrix may take
    embed_bits: tuple[int, ...]
    min_ffn: int
    min_kv: int
    max_drop: int  # most layers a subnet may drop
    drop_order: tuple[int, ...]  # layers from least to most important; only the first 2*max_drop may go

    @classmethod
    def build(cls, arch: BaseArch, bits: list[int], embed_bits: list[int], min_ffn_frac: float,
              min_kv: int, max_drop_frac: float, drop_order: list[int] | None = None) -> "SearchSpace":
        order = tuple(drop_order) if drop_order is not None else tuple(range(arch.n_layers - 1, -1, -1))
        return cls(arch, tuple(sorted(bits)), tuple(sorted(embed_bits)), round_ffn(arch.ffn * min_ffn_frac, arch.ffn),
                   min(min_kv, arch.n_kv_heads), int(max_drop_frac * arch.n_layers), order)

    @property
    def droppable(self) -> tuple[int, ...]:
        return self.drop_order[: min(len(self.drop_order), 2 * self.max_drop)]

    def max(self) -> SubnetConfig:
        return SubnetConfig.max(self.arch, bits=max(self.bits), embed_bits=max(self.embed_bits))

    def min(self) -> SubnetConfig:
        """Smallest subnet: fewest bits, narrowest widths, the least important layers dropped."""
        lc = LayerConfig(True, self.min_kv, self.min_ffn, {m: min(self.bits) for m in MATRICES})
        drop = set(self.drop_order[: self.max_drop])
        layers = tuple(LayerConfig(i not in drop, lc.kv_groups, lc.ffn, dict(lc.bits)) for i in range(self.arch.n_layers))
        return SubnetConfig(layers, embed_bits=min(self.embed_bits))

    def sample(self, gen: torch.Generator) -> SubnetConfig:
        """A uniformly random subnet; the generator makes it reproducible (and rank-consistent)."""
        def pick(options: tuple[int, ...] | list[int]) -> int:
            return options[int(torch.randint(len(options), (1,), generator=gen))]

        ffn_options = list(range(self.min_ffn, self.arch.ffn + 1, FFN_STEP))
        kv_options = list(range(self.min_kv, self.arch.n_kv_heads + 1))
        n_drop = pick(list(range(self.max_drop + 1)))
        cand = list(self.droppable)
        perm = torch.randperm(len(cand), generator=gen).tolist()
        drop = {cand[j] for j in perm[:n_drop]}
        layers = tuple(
            LayerConfig(i not in drop, pick(kv_options), pick(ffn_options), {m: pick(self.bits) for m in MATRICES})
            for i in range(self.arch.n_layers))
        return SubnetConfig(layers, embed_bits=pick(self.embed_bits))

    def contains(self, cfg: SubnetConfig) -> bool:
        try:
            cfg.validate(self.arch, set(self.bits) | set(self.embed_bits))
        except ValueError:
            return False
        dropped = [i for i, lc in enumerate(cfg.layers) if not lc.keep]
        return (len(dropped) <= self.max_drop and set(dropped) <= set(self.droppable)
                and all(lc.ffn >= self.min_ffn and lc.kv_groups >= self.min_kv for lc in cfg.layers)
                and cfg.embed_bits in self.embed_bits)


def sandwich_configs(spaces: dict[str, SearchSpace], step: int, n_random: int,
                     gen: torch.Generator) -> list[tuple[SubnetConfig, str]]:
    """The sandwich rule over several export grids: the max subnet (16-bit: the grid does not matter),
    the min subnet of one format (formats take turns by step) and `n_random` random subnets, each on a
    format taking turns too, so one supernet trains for every device."""
    fmts = list(spaces)
    first = fmts[0]
    out = [(spaces[first].max(), first)]
    lo = fmts[step % len(fmts)]
    out.append((spaces[lo].min(), lo))
    for j in range(n_random):
        f = fmts[(step + 1 + j) % len(fmts)]
        out.append((spaces[f].sample(gen), f))
    return out
