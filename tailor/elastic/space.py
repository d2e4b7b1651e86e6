"""The space of subnets one supernet can become, and seeded sampling from it (OFA's sample_active).

Choices per matrix are bit-widths or type names (`tailor.quant.formats.Choice`). A type with 256-wide
super-blocks (GGUF's K-quants) fits only matrices whose input dimension is whole 256s, so the space
offers each matrix only the choices that fit it at *every* width the space can give it (`choices_for`:
q/k/v/gate/up read `hidden`, o the kept query heads, down the FFN width), and when the space holds such a
type its FFN widths move in steps of 256 instead of 64 (`ffn_step`), so `ffn_down` keeps its K-quants at
every width. A space of plain bit-widths is exactly what it was before named types (steps of 64, every
choice everywhere), so its samples and its subnets are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tailor.arch import FFN_STEP, MATRICES, BaseArch, Choice, LayerConfig, SubnetConfig, round_ffn
from tailor.quant.formats import block_of, eligible, sort_choices


@dataclass(frozen=True)
class SearchSpace:
    arch: BaseArch
    bits: tuple[Choice, ...]  # choices each matrix may take where it fits (fewest bits first)
    embed_bits: tuple[int, ...]
    min_ffn: int
    min_kv: int
    max_drop: int  # most layers a subnet may drop
    drop_order: tuple[int, ...]  # layers from least to most important; only the first 2*max_drop may go

    @classmethod
    def build(cls, arch: BaseArch, bits: list[Choice], embed_bits: list[int], min_ffn_frac: float,
              min_kv: int, max_drop_frac: float, drop_order: list[int] | None = None) -> "SearchSpace":
        order = tuple(drop_order) if drop_order is not None else tuple(range(arch.n_layers - 1, -1, -1))
        step = _ffn_step(bits)
        min_ffn = round_ffn(arch.ffn * min_ffn_frac, arch.ffn)
        if step != FFN_STEP:  # the narrowest width that keeps whole super-blocks (never below the fraction)
            min_ffn = min(arch.ffn, -(-min_ffn // step) * step)
        return cls(arch, sort_choices(bits), tuple(sorted(embed_bits)), min_ffn,
                   min(min_kv, arch.n_kv_heads), int(max_drop_frac * arch.n_layers), order)

    @property
    def ffn_step(self) -> int:
        return _ffn_step(self.bits)

    def ffn_widths(self) -> list[int]:
        """Every FFN width the space offers, narrowest first (the base width always)."""
        ws = list(range(self.min_ffn, self.arch.ffn + 1, self.ffn_step))
        return ws if ws and ws[-1] == self.arch.ffn else ws + [self.arch.ffn]

    def kv_options(self) -> list[int]:
        return list(range(self.min_kv, self.arch.n_kv_heads + 1))

    def choices_for(self, m: str) -> tuple[Choice, ...]:
        """The choices matrix `m` may take: those whose block divides its input dimension at every KV
        group count and FFN width of the space (never empty: 16 fits everything)."""
        cols = {self.arch.matrix_shape(m, kv, ffn)[1] for kv in self.kv_options() for ffn in self.ffn_widths()}
        out = tuple(b for b in self.bits if all(eligible(b, c) for c in cols))
        if not out:
            raise ValueError(f"no allowed type fits {m} (input dimensions {sorted(cols)}; allowed {self.bits})")
        return out

    @property
    def droppable(self) -> tuple[int, ...]:
        return self.drop_order[: min(len(self.drop_order), 2 * self.max_drop)]

    def max(self) -> SubnetConfig:
        top = {m: self.choices_for(m)[-1] for m in MATRICES}
        return SubnetConfig(tuple(LayerConfig(True, self.arch.n_kv_heads, self.arch.ffn, dict(top))
                                  for _ in range(self.arch.n_layers)), embed_bits=max(self.embed_bits))

    def min(self) -> SubnetConfig:
        """Smallest subnet: fewest bits, narrowest widths, the least important layers dropped."""
        lc = LayerConfig(True, self.min_kv, self.min_ffn, {m: self.choices_for(m)[0] for m in MATRICES})
        drop = set(self.drop_order[: self.max_drop])
        layers = tuple(LayerConfig(i not in drop, lc.kv_groups, lc.ffn, dict(lc.bits)) for i in range(self.arch.n_layers))
        return SubnetConfig(layers, embed_bits=min(self.embed_bits))

    def middle(self) -> SubnetConfig:
        """A fixed subnet halfway between min and max (the middle choice of each matrix, half-way FFN
        width and KV groups, half the droppable layers dropped): the supernet's report watches it train."""
        arch = self.arch
        bits = {m: c[len(c) // 2] for m, c in ((m, self.choices_for(m)) for m in MATRICES)}
        ffn = round_ffn((arch.ffn + self.min_ffn) / 2, arch.ffn)
        if ffn not in self.ffn_widths():  # a space of K-quants moves in steps of 256
            ffn = min(self.ffn_widths(), key=lambda w: (abs(w - ffn), w))
        kv = (arch.n_kv_heads + self.min_kv + 1) // 2
        drop = set(self.drop_order[: self.max_drop // 2])
        return SubnetConfig(tuple(LayerConfig(i not in drop, kv, ffn, dict(bits))
                                  for i in range(arch.n_layers)), embed_bits=max(self.embed_bits))

    def sample(self, gen: torch.Generator) -> SubnetConfig:
        """A uniformly random subnet; the generator makes it reproducible (and rank-consistent)."""
        def pick(options: tuple | list):
            return options[int(torch.randint(len(options), (1,), generator=gen))]

        ffn_options = self.ffn_widths()
        kv_options = self.kv_options()
        per_matrix = {m: self.choices_for(m) for m in MATRICES}
        n_drop = pick(list(range(self.max_drop + 1)))
        cand = list(self.droppable)
        perm = torch.randperm(len(cand), generator=gen).tolist()
        drop = {cand[j] for j in perm[:n_drop]}
        layers = tuple(
            LayerConfig(i not in drop, pick(kv_options), pick(ffn_options), {m: pick(per_matrix[m]) for m in MATRICES})
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


def _ffn_step(bits) -> int:
    """FFN_STEP, or the largest block of the choices when it exceeds it (256 with a K-quant)."""
    return max([FFN_STEP] + [block_of(b) for b in bits])


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
