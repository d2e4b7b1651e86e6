"""Strategy (a): a mixed-integer programme over the sensitivity table (Puzzle's block library, with
bits in the blocks), solved exactly by HiGHS through `scipy.optimize.milp`.

Each layer picks one attention variant (KV groups x choices of q, k, v, o), one MLP variant (FFN width x
choices of gate, up, down), or is dropped. A variant's quality cost is the sum of its pieces' measured
KL deltas (the table is additive by construction); its bytes are exact in the device's format. One
knapsack row keeps the total under the budget, one row caps dropped layers. Bytes of the solution are
recomputed from the SubnetConfig afterwards (they agree: the same formula).

Two exact formulations of that programme. Enumerated (one binary per whole variant) while a layer has
at most ENUMERATE_MAX variants: the devices of plain bit-widths (the phone's 4 widths: 1,024 per layer),
whose solutions therefore stay what they were. Per matrix otherwise (GGUF's eight types on a model whose
rows all take K-quants: 8^4 x 3 + 8^3 x 4 = 14,336 per layer): a binary per structure choice (KV groups,
FFN width) and one per (matrix, structure, choice), linked by sum_b y[m, s, b] = x[s]. Each matrix's
bytes depend only on its own choice and the structure it sits in, and its KL delta only on its choice,
so both have the same optimum; tests/unit/test_search_strategies.py compares them.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from tailor.arch import LayerConfig, SubnetConfig, fixed_bytes, layer_vector_bytes
from tailor.elastic.space import SearchSpace
from tailor.quant.formats import matrix_bytes
from tailor.search.sensitivity import SensTable, _interp, ffn_options

ATTN, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
ENUMERATE_MAX = 4096  # variants per layer up to which the enumerated formulation is used


def _milp(c: np.ndarray, a, lo: list[float], hi: list[float], time_limit: float):
    """HiGHS on binaries, single-threaded. Its default starts a pool of worker threads on the first solve;
    a process forked after that (a Dask or mutation-testing worker) inherits the pool's state without
    its threads, and its next solve waits on them for ever. These programmes are small; one thread does.
    `threads` is a HiGHS option scipy passes through verbatim (with a warning that says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        return milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(len(c)), bounds=Bounds(0, 1),
                    options={"time_limit": time_limit, "disp": False, "threads": 1})


def n_variants(table: SensTable, space: SearchSpace) -> int:
    """Attention + MLP variants of one layer in the enumerated formulation."""
    attn = math.prod(len(space.choices_for(m)) for m in ATTN) * len(space.kv_options())
    return attn + math.prod(len(space.choices_for(m)) for m in MLP) * len(ffn_options(space))


def _variants(table: SensTable, space: SearchSpace, fmt: str, i: int):
    """(kind, structure, bits-dict, cost, bytes) for layer i's attention and MLP variants."""
    arch, ref = space.arch, table.reference.layers[i]
    out = []
    for kv in range(space.min_kv, arch.n_kv_heads + 1):
        dkv = 0.0 if kv == ref.kv_groups else table.kv[f"{i}:{kv}"]
        for bits in itertools.product(*(space.choices_for(m) for m in ATTN)):
            d = dict(zip(ATTN, bits))
            cost = dkv + sum(table.bits[f"{i}:{m}:{b}"] for m, b in d.items() if b != ref.bits[m])
            nb = sum(matrix_bytes(fmt, b, *arch.matrix_shape(m, kv, arch.ffn)) for m, b in d.items())
            out.append(("attn", kv, d, cost, nb + layer_vector_bytes(arch, fmt, kv)))  # + norms and biases
    for ffn in ffn_options(space):
        dffn = 0.0 if ffn == ref.ffn else _interp(table.ffn, i, ffn, ref.ffn)
        for bits in itertools.product(*(space.choices_for(m) for m in MLP)):
            d = dict(zip(MLP, bits))
            cost = dffn + sum(table.bits[f"{i}:{m}:{b}"] for m, b in d.items() if b != ref.bits[m])
            nb = sum(matrix_bytes(fmt, b, *arch.matrix_shape(m, arch.n_kv_heads, ffn)) for m, b in d.items())
            out.append(("mlp", ffn, d, cost, nb))
    return out


def solve(table: SensTable, space: SearchSpace, fmt: str, embed_bits: int, budget: int,
          time_limit: float = 60.0, per_matrix: bool | None = None) -> SubnetConfig | None:
    """The subnet of least predicted KL whose bytes fit `budget`; None when nothing fits. `per_matrix`
    picks the formulation (None: enumerated up to ENUMERATE_MAX variants per layer)."""
    if per_matrix is None:
        per_matrix = n_variants(table, space) > ENUMERATE_MAX
    if per_matrix:
        return _solve_per_matrix(table, space, fmt, embed_bits, budget, time_limit)
    arch = space.arch
    fixed = fixed_bytes(arch, fmt, embed_bits)
    cols: list[tuple] = []  # (layer, kind, struct, bits, cost, bytes)
    for i in range(arch.n_layers):
        for kind, struct, bits, cost, nb in _variants(table, space, fmt, i):
            cols.append((i, kind, struct, bits, cost, nb))
        if i in space.droppable:
            cols.append((i, "drop", None, None, table.drop[str(i)], 0))
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
    res = _milp(c, np.array(rows), lo, hi, time_limit)
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


def _solve_per_matrix(table: SensTable, space: SearchSpace, fmt: str, embed_bits: int, budget: int,
                      time_limit: float) -> SubnetConfig | None:
    arch = space.arch
    cols: list[tuple] = []  # (layer, kind, struct, matrix or None, choice or None, cost, bytes)
    entries: list[tuple[int, int, float]] = []  # (row, col, value) of the constraint matrix
    lo: list[float] = []
    hi: list[float] = []

    def row(coefs: list[tuple[int, float]], low: float, high: float) -> None:
        r = len(lo)
        entries.extend((r, j, v) for j, v in coefs)
        lo.append(low)
        hi.append(high)

    for i in range(arch.n_layers):
        ref = table.reference.layers[i]
        drop = None
        if i in space.droppable:
            drop = len(cols)
            cols.append((i, "drop", None, None, None, table.drop[str(i)], 0))
        for kind, structs, mats in (("attn", space.kv_options(), ATTN), ("mlp", ffn_options(space), MLP)):
            picks = []
            for s in structs:
                kv, ffn = (s, arch.ffn) if kind == "attn" else (arch.n_kv_heads, s)
                if kind == "attn":
                    d = 0.0 if s == ref.kv_groups else table.kv[f"{i}:{s}"]
                    nb = layer_vector_bytes(arch, fmt, s)  # norms and biases ride with the attention
                else:
                    d, nb = (0.0 if s == ref.ffn else _interp(table.ffn, i, s, ref.ffn)), 0
                x = len(cols)
                cols.append((i, kind, s, None, None, d, nb))
                picks.append((x, 1.0))
                for m in mats:
                    link = [(x, -1.0)]
                    for b in space.choices_for(m):
                        link.append((len(cols), 1.0))
                        cost = 0.0 if b == ref.bits[m] else table.bits[f"{i}:{m}:{b}"]
                        cols.append((i, kind, s, m, b, cost, matrix_bytes(fmt, b, *arch.matrix_shape(m, kv, ffn))))
                    row(link, 0.0, 0.0)  # the matrix takes one choice exactly when its structure is chosen
            row(picks + ([(drop, 1.0)] if drop is not None else []), 1.0, 1.0)
    n = len(cols)
    fixed = fixed_bytes(arch, fmt, embed_bits)
    row([(j, float(c[6])) for j, c in enumerate(cols) if c[6]], 0.0, float(budget - fixed))
    row([(j, 1.0) for j, c in enumerate(cols) if c[1] == "drop"], 0.0, float(space.max_drop))
    r, cidx, v = zip(*entries)
    a = coo_matrix((v, (r, cidx)), shape=(len(lo), n)).tocsr()
    res = _milp(np.array([c[5] for c in cols]), a, lo, hi, time_limit)
    if res.x is None:
        return None
    chosen = [cols[j] for j in np.flatnonzero(res.x > 0.5)]
    layers = []
    for i in range(arch.n_layers):
        mine = [c for c in chosen if c[0] == i]
        if any(c[1] == "drop" for c in mine):
            ref = table.reference.layers[i]
            layers.append(LayerConfig(False, ref.kv_groups, ref.ffn, dict(ref.bits)))
            continue
        kv = next(c[2] for c in mine if c[1] == "attn" and c[3] is None)
        ffn = next(c[2] for c in mine if c[1] == "mlp" and c[3] is None)
        bits = {c[3]: c[4] for c in mine if c[3] is not None and c[2] == (kv if c[1] == "attn" else ffn)}
        layers.append(LayerConfig(True, kv, ffn, {m: bits[m] for m in ATTN + MLP}))
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
