"""Search plots: the Pareto front (bytes x KL, by strategy) and the chosen subnet's per-layer
bit / structure heatmap. PNG files, written atomically; the audit report embeds them."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tailor.arch import MATRICES, BaseArch, SubnetConfig  # noqa: E402
from tailor.quant.formats import bits_per_weight  # noqa: E402

COLORS = {"mip": "tab:blue", "nsga": "tab:orange", "gumbel": "tab:green", "sampled": "tab:gray"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def pareto_png(cands, front, chosen, budget: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for origin in sorted({c.origin for c in cands}):
        pts = [c for c in cands if c.origin == origin]
        ax.scatter([c.nbytes / 1e6 for c in pts], [c.kl for c in pts], s=14, alpha=0.7, label=origin,
                   color=COLORS.get(origin, "tab:purple"))
    ax.plot([c.nbytes / 1e6 for c in front], [c.kl for c in front], color="black", lw=1, label="Pareto front")
    ax.scatter([chosen.nbytes / 1e6], [chosen.kl], marker="*", s=160, color="red", label="chosen", zorder=5)
    ax.axvline(budget / 1e6, color="red", ls="--", lw=1, label="budget")
    ax.set_xlabel("weight bytes in the device format (MB)")
    ax.set_ylabel("KL to the base model (nats/token)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("search candidates")
    _save(fig, path)


def heatmap_png(cfg: SubnetConfig, arch: BaseArch, path: Path) -> None:
    """Rows: the 7 matrices' bits, then KV groups and FFN width as fractions; columns: layers
    (dropped layers blank)."""
    L = len(cfg.layers)
    grid = np.full((len(MATRICES) + 2, L), np.nan)
    for i, lc in enumerate(cfg.layers):
        if not lc.keep:
            continue
        for j, m in enumerate(MATRICES):
            grid[j, i] = bits_per_weight(lc.bits[m])  # a named type (Q4_K) at its stored bits per weight
        grid[len(MATRICES), i] = 16 * lc.kv_groups / arch.n_kv_heads
        grid[len(MATRICES) + 1, i] = 16 * lc.ffn / arch.ffn
    fig, ax = plt.subplots(figsize=(max(6, L * 0.28), 3.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=16)
    ax.set_yticks(range(grid.shape[0]), [*MATRICES, "kv (x16)", "ffn (x16)"])
    ax.set_xticks(range(L), [str(i) for i in range(L)], fontsize=6)
    ax.set_xlabel("layer (blank = dropped)")
    for i, lc in enumerate(cfg.layers):
        if lc.keep:
            for j, m in enumerate(MATRICES):
                ax.text(i, j, str(lc.bits[m]), ha="center", va="center", fontsize=5, color="white")
    fig.colorbar(im, ax=ax, label="bits / scaled width")
    ax.set_title(f"chosen subnet {cfg.hash}: bits per matrix, KV groups and FFN width per layer")
    _save(fig, path)
