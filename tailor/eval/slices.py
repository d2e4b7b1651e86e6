"""Compare a compressed model's suite results with the base model's: headline metrics and slices.

Every slice row carries the base and compressed value, their delta and a 95% paired bootstrap CI of
the delta (bootstrap.py), so auditors see each bias group's change with its uncertainty next to the
base model. Items are paired by doc id and content hash: results over different eval sets never mix.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from tailor.eval.bootstrap import PairedCI, paired_bootstrap, rng_for
from tailor.eval.harness import SuiteResult


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


def _row(group: str, metric: str, ci: PairedCI) -> dict[str, Any]:
    return {"group": group, "metric": metric, "base": ci.base, "compressed": ci.compressed, "delta": ci.delta,
            "ci_low": ci.ci_low, "ci_high": ci.ci_high, "n": ci.n}


def _ppl_ci(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> PairedCI:
    b, c = _aligned("wiki", base.wiki, comp.wiki)
    # Token counts come from each run's tokenizer; they match unless the tokenizers differ.
    return paired_bootstrap(np.array([x.nll for x in b]), np.array([x.nll for x in c]),
                            np.array([x.tokens for x in b]), np.array([x.tokens for x in c]),
                            n_boot=n_boot, rng=rng_for(seed, "wiki_ppl/all"), transform=np.exp)


def _piqa_cis(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> dict[str, PairedCI]:
    b, c = _aligned("piqa", base.piqa, comp.piqa)
    return {m: paired_bootstrap(np.array([getattr(x, m) for x in b]), np.array([getattr(x, m) for x in c]),
                                n_boot=n_boot, rng=rng_for(seed, f"piqa/{m}")) for m in ("acc", "acc_norm")}


def _crows_cis(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> tuple[PairedCI, dict[str, PairedCI]]:
    b, c = _aligned("crows_pairs", base.crows, comp.crows)
    groups: dict[str, list[int]] = defaultdict(list)
    for k, x in enumerate(b):
        groups[x.bias_type].append(k)
    sb, sc = np.array([x.stereotype for x in b]), np.array([x.stereotype for x in c])

    def ci(name: str, idx: Sequence[int]) -> PairedCI:
        # Resampled within the group: a group's CI reflects only its own n, as a per-group audit needs.
        return paired_bootstrap(sb[idx], sc[idx], n_boot=n_boot, rng=rng_for(seed, f"crows_pairs/{name}"))

    return ci("all", list(range(len(b)))), {g: ci(g, idx) for g, idx in sorted(groups.items())}


def compare(base: SuiteResult, comp: SuiteResult, n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, slices) of `comp` against `base`; the same inputs always give the same CIs.

    metrics: flat numbers (a DVC metrics file). pct_stereotype is a fraction in [0, 1] (lm-eval's
    convention despite the name); 0.5 means no preference for the stereotyping sentence.
    slices: {"crows_pairs": one row per bias type, "crows_pairs_overall", "piqa" (acc, acc_norm),
    "wiki_ppl"}; each row {"group", "metric", "base", "compressed", "delta", "ci_low", "ci_high", "n"}.
    """
    pb, pc = base.meta.get("prefix_token_id"), comp.meta.get("prefix_token_id")
    if pb is not None and pc is not None and pb != pc:
        raise PairingError(f"results scored texts after different prefix tokens ({pb} vs {pc}): not comparable")
    ppl = _ppl_ci(base, comp, n_boot, seed)
    piqa = _piqa_cis(base, comp, n_boot, seed)
    crows_all, crows_groups = _crows_cis(base, comp, n_boot, seed)
    metrics = {
        "ppl": ppl.compressed, "ppl_base": ppl.base, "ppl_delta": ppl.delta, "ppl_ratio": ppl.compressed / ppl.base,
        "piqa": piqa["acc"].compressed, "piqa_base": piqa["acc"].base, "piqa_delta": piqa["acc"].delta,
        "piqa_acc_norm": piqa["acc_norm"].compressed, "piqa_acc_norm_base": piqa["acc_norm"].base,
        "crows_pct_stereotype": crows_all.compressed, "crows_pct_stereotype_base": crows_all.base,
        "crows_pct_stereotype_delta": crows_all.delta,
        # Largest per-group move in either direction: the number a bias gate looks at first.
        "crows_max_abs_group_delta": max(abs(g.delta) for g in crows_groups.values()),
        "n_wiki": ppl.n, "n_piqa": piqa["acc"].n, "n_crows_pairs": crows_all.n,
        "bootstrap": n_boot, "seed": seed,
    }
    slices = {
        "crows_pairs": [_row(g, "pct_stereotype", ci) for g, ci in crows_groups.items()],
        "crows_pairs_overall": [_row("all", "pct_stereotype", crows_all)],
        "piqa": [_row("all", m, ci) for m, ci in piqa.items()],
        "wiki_ppl": [_row("all", "ppl", ppl)],
    }
    return metrics, slices
