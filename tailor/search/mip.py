"""Strategy (a): a mixed-integer programme over the sensitivity table (Puzzle's block library, with
bits in the blocks), solved exactly by HiGHS through `scipy.optimize.milp`.

Each layer picks one attention variant (KV groups x bits of q, k, v, o), one MLP variant (FFN width x
bits of gate, up, down), or is dropped. A variant's quality cost is the sum of its pieces' measured
KL deltas (the table is additive by construction); its bytes are exact in the device's format. One
knapsack row keeps the total under the budget, one row caps dropped layers. Bytes of the solution are
recomputed from the SubnetConfig afterwards (they agree: the same formula).
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from tailor.arch import LayerConfig, SubnetConfig, fixed_bytes, layer_vector_bytes
from tailor.elastic.space import SearchSpace
from tailor.quant.formats import matrix_bytes
from tailor.search.sensitivity import SensTable, _interp, ffn_options

ATTN, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")


def _variants(table: SensTable, space: SearchSpace, fmt: str, i: int):
    """(kind, structure, bits-dict, cost, bytes) for layer i's attention and MLP variants."""
    arch, ref = space.arch, table.reference.layers[i]
    out = []
    for kv in range(space.min_kv, arch.n_kv_heads + 1):
        dkv = 0.0 if kv == ref.kv_groups else table.kv[f"{i}:{kv}"]
        for bits in itertools.product(space.bits, repeat=len(ATTN)):
            d = dict(zip(ATTN, bits))
            cost = dkv + sum(table.bits[f"{i}:{m}:{b}"] for m, b in d.items() if b != ref.bits[m])
            nb = sum(matrix_bytes(fmt, b, *arch.matrix_shape(m, kv, arch.ffn)) for m, b in d.items())
            out.append(("attn", kv, d, cost, nb + layer_vector_bytes(arch, fmt, kv)))  # + norms and biases
    for ffn in ffn_options(space):
        dffn = 0.0 if ffn == ref.ffn else _interp(table.ffn, i, ffn, ref.ffn)
        for bits in itertools.product(space.bits, repeat=len(MLP)):
            d = dict(zip(MLP, bits))
            cost = dffn + sum(table.bits[f"{i}:{m}:{b}"] for m, b in d.items() if b != ref.bits[m])
            nb = sum(matrix_bytes(fmt, b, *arch.matrix_shape(m, arch.n_kv_heads, ffn)) for m, b in d.items())
            out.append(("mlp", ffn, d, cost, nb))
    return out


def solve(table: SensTable, space: SearchSpace, fmt: str, embed_bits: int, budget: int,
          time_limit: float = 60.0) -> SubnetConfig | None:
    """The subnet of least predicted KL whose bytes fit `budget`; None when nothing fits."""
    arch = space.arch
    fixed = fixed_bytes(arch, fmt, embed_bits)
    cols: list[tuple] = []  # (layer, kind, struct, bits, cost, bytes)
    for i in range(arch.n_layers):
        for kind, struct, bits, cost, nb in _variants(table, space, fmt, i):
            cols.append((i, kind, struct, bits, cost, nb))
        if i in space.droppable:
            cols.append((i, "drop", None, None, table.drop[str(i)], 0))
    n = len(cols)
    c = np.array([col[4] for col in cols])
    size = np.array([col[5] for col in cols], dtype=float)
    rows, lo, hi = [], [], []
    for i in range(arch.n_layers):  # one attention and one MLP variant per layer, or the layer dropped
        for kind in ("attn", "mlp"):
            rows.append([1.0 if col[0] == i and col[1] in (kind, "drop") else 0.0 for col in cols])
            lo.append(1.0)
            hi.append(1.0)
    rows.append(size)
    lo.append(0.0)
    hi.append(float(budget - fixed))
    rows.append([1.0 if col[1] == "drop" else 0.0 for col in cols])
    lo.append(0.0)
    hi.append(float(space.max_drop))
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None
    chosen = [cols[j] for j in np.flatnonzero(res.x > 0.5)]
    layers = []
    for i in range(arch.n_layers):
        mine = {col[1]: col for col in chosen if col[0] == i}
        if "drop" in mine:
            ref = table.reference.layers[i]
            layers.append(LayerConfig(False, ref.kv_groups, ref.ffn, dict(ref.bits)))
            continue
        a, m = mine["attn"], mine["mlp"]
        layers.append(LayerConfig(True, a[2], m[2], {**a[3], **m[3]}))
    return SubnetConfig(tuple(layers), embed_bits=embed_bits)


def solutions(table: SensTable, space: SearchSpace, fmt: str, embed_bits: int, budget: int,
              fractions: tuple[float, ...] = (1.0, 0.98, 0.95, 0.9, 0.85)) -> list[SubnetConfig]:
    """MIP optima at the budget and a few tighter ones: distinct seeds for NSGA-II."""
    out, seen = [], set()
    for f in fractions:
        cfg = solve(table, space, fmt, embed_bits, int(budget * f))
        if cfg is not None and cfg.hash not in seen:
            seen.add(cfg.hash)
            out.append(cfg)
    return out
