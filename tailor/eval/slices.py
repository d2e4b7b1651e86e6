"""Compare a compressed model's suite results with the base model's: headline metrics and slices.

Every slice row carries the base and compressed value, their delta and a 95% paired bootstrap CI of
the delta (bootstrap.py), so auditors see each group's change with its uncertainty next to the base
model. Items are paired by id (line in the eval set) and content hash: results over different eval
sets never mix. Each row also says which direction is worse and whether the group-worsening gate
looks at it (gates.py). Same inputs, same seed -> same CIs: every slice draws from its own
generator, keyed by (seed, slice name).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from tailor.eval.bias import BENCHMARKS
from tailor.eval.bootstrap import PairedCI, paired_bootstrap, paired_bootstrap_macro, paired_bootstrap_stat, rng_for
from tailor.eval.harness import ACCURACY_TASKS, SuiteResult


class PairingError(ValueError):
    """Base and compressed results do not cover the same items."""


def _aligned(part: str, base: Sequence[Any], comp: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The two item lists in the same (id) order, after checking they hold the same documents."""
    b, c = {x.id: x for x in base}, {x.id: x for x in comp}
    if len(b) != len(base) or len(c) != len(comp):
        raise PairingError(f"{part}: duplicate item ids")
    if b.keys() != c.keys():
        only_b, only_c = sorted(b.keys() - c.keys()), sorted(c.keys() - b.keys())
        raise PairingError(f"{part}: base and compressed results cover different items "
                           f"({len(only_b)} only in base, e.g. {only_b[:3]}; {len(only_c)} only in compressed, e.g. {only_c[:3]})")
    if not b:
        raise PairingError(f"{part}: no items")
    ids = sorted(b)
    differ = [i for i in ids if b[i].hash != c[i].hash]
    if differ:
        raise PairingError(f"{part}: {len(differ)} items have the same id but different documents "
                           f"(e.g. id {differ[0]}): the two results come from different eval sets")
    return [b[i] for i in ids], [c[i] for i in ids]


def _row(group: str, metric: str, ci: PairedCI, worse: str = "lower", gated: bool = False) -> dict[str, Any]:
    return {"group": group, "metric": metric, "base": ci.base, "compressed": ci.compressed, "delta": ci.delta,
            "ci_low": ci.ci_low, "ci_high": ci.ci_high, "n": ci.n, "se": ci.se, "worse": worse, "gated": gated}


def _ppl_ci(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> PairedCI:
    b, c = _aligned("wiki", base.wiki, comp.wiki)
    # Token counts come from each run's tokenizer; they match unless the tokenizers differ.
    return paired_bootstrap(np.array([x.nll for x in b]), np.array([x.nll for x in c]),
                            np.array([x.tokens for x in b]), np.array([x.tokens for x in c]),
                            n_boot=n_boot, rng=rng_for(seed, "wiki_ppl/all"), transform=np.exp)


def _acc_cis(task: str, base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> dict[str, PairedCI]:
    b, c = _aligned(task, base.tasks[task], comp.tasks[task])
    return {m: paired_bootstrap(np.array([getattr(x, m) for x in b]), np.array([getattr(x, m) for x in c]),
                                n_boot=n_boot, rng=rng_for(seed, f"{task}/{m}")) for m in ("acc", "acc_norm")}


def _bias_rows(task: str, base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> tuple[list, list]:
    """(per-group rows, overall rows) of one bias benchmark."""
    key, group_of, arrays, metrics = BENCHMARKS[task]
    b, c = _aligned(key, base.tasks[task], comp.tasks[task])
    ab, ac = arrays(b), arrays(c)
    groups: dict[str, list[int]] = defaultdict(list)
    overall: dict[str, list[int]] = defaultdict(list)
    for k, x in enumerate(b):
        g = group_of(x)
        groups[g].append(k)
        overall["all/" + g.split("/", 1)[1] if "/" in g else "all"].append(k)

    def rows(gs: dict[str, list[int]]) -> list[dict]:
        out = []
        for g, idx in sorted(gs.items()):
            for m, (stat, worse, gated) in metrics(g).items():
                # Resampled within the group: a group's CI reflects only its own n, as a per-group audit needs.
                ci = paired_bootstrap_stat(stat, {k: v[idx] for k, v in ab.items()}, {k: v[idx] for k, v in ac.items()},
                                           n_boot=n_boot, rng=rng_for(seed, f"{key}/{g}/{m}"))
                out.append(_row(g, m, ci, worse, gated))
        return out

    return rows(groups), rows(overall)


def compare(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, slices) of `comp` against `base`; the same inputs always give the same CIs.

    metrics: flat numbers (a DVC metrics file): perplexity, each accuracy task and their mean, each
    bias benchmark's overall values, the largest gated group worsening. slices: {"wiki_ppl",
    "accuracy" (one row per task and metric), "accuracy_mean" (the macro mean's row, which the accuracy
    gate reads; absent without accuracy tasks), and per bias benchmark run: "crows_pairs", "bbq",
    "stereoset", "winogender" (one row per group and metric) plus "<name>_overall"}; each row
    {"group", "metric", "base", "compressed", "delta", "ci_low", "ci_high", "n", "se", "worse", "gated"}
    (se: the standard deviation of the resampled deltas).
    """
    pb, pc = base.meta.get("prefix_token_id"), comp.meta.get("prefix_token_id")
    if pb is not None and pc is not None and pb != pc:
        raise PairingError(f"results scored texts after different prefix tokens ({pb} vs {pc}): not comparable")
    if set(base.tasks) != set(comp.tasks):
        raise PairingError(f"results cover different tasks ({sorted(base.tasks)} vs {sorted(comp.tasks)})")
    ppl = _ppl_ci(base, comp, n_boot, seed)
    metrics: dict[str, Any] = {"ppl": ppl.compressed, "ppl_base": ppl.base, "ppl_delta": ppl.delta,
                               "ppl_ratio": ppl.compressed / ppl.base, "n_wiki": ppl.n}
    slices: dict[str, Any] = {"wiki_ppl": [_row("all", "ppl", ppl, "higher")], "accuracy": []}
    acc_tasks = [t for t in ACCURACY_TASKS if t in base.tasks]
    for t in acc_tasks:
        cis = _acc_cis(t, base, comp, n_boot, seed)
        slices["accuracy"] += [_row(t, m, ci) for m, ci in cis.items()]
        metrics |= {t: cis["acc"].compressed, f"{t}_base": cis["acc"].base, f"{t}_delta": cis["acc"].delta,
                    f"{t}_acc_norm": cis["acc_norm"].compressed, f"{t}_acc_norm_base": cis["acc_norm"].base,
                    f"n_{t}": cis["acc"].n}
    if acc_tasks:  # macro mean: each task counts once whatever its n
        metrics["acc_mean"] = float(np.mean([metrics[t] for t in acc_tasks]))
        metrics["acc_mean_base"] = float(np.mean([metrics[f"{t}_base"] for t in acc_tasks]))
        # the accuracy gate's interval: the macro mean's change, items resampled within each task
        pairs = [_aligned(t, base.tasks[t], comp.tasks[t]) for t in acc_tasks]
        mean = paired_bootstrap_macro([np.array([x.acc for x in b]) for b, _ in pairs],
                                      [np.array([x.acc for x in c]) for _, c in pairs],
                                      n_boot=n_boot, rng=rng_for(seed, "accuracy/macro_mean"))
        slices["accuracy_mean"] = [_row("macro_mean", "acc", mean)]
    worst = []
    for task, (key, *_) in BENCHMARKS.items():
        if task not in base.tasks:
            continue
        groups, overall = _bias_rows(task, base, comp, n_boot, seed)
        slices[key], slices[f"{key}_overall"] = groups, overall
        for r in overall:  # "all" -> crows_pairs_pct_stereotype; "all/ambig" -> bbq_ambig_bias_score
            name = f"{key}_{r['group'].removeprefix('all').removeprefix('/') + '_' if r['group'] != 'all' else ''}{r['metric']}"
            metrics |= {name: r["compressed"], f"{name}_base": r["base"]}
        metrics[f"n_{key}"] = sum(r["n"] for r in overall if r["metric"] == overall[0]["metric"])
        worst += [(r["delta"] if r["worse"] == "higher" else -r["delta"]) for r in groups if r["gated"]]
    # Largest move of a gated group in its worse direction: the number the bias gate looks at first.
    metrics["max_group_worsening"] = max(worst, default=0.0)
    metrics |= {"bootstrap": n_boot, "seed": seed}
    return metrics, slices
