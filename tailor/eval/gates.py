"""Release gates: compressed vs base, each judged on a 95% paired bootstrap interval, with its reason.

Every gate reads an interval from compare() (slices.py) and gives one of three verdicts:
"pass", "fail", or "indicative" (too few items to tell). Only "pass" counts as passed; the report and
gates.json keep "indicative" apart from "fail", and no verdict is ever taken from a point estimate alone.

- ppl_increase (non-inferiority, margin max_ppl_increase x base perplexity): with d = ppl - ppl_base
  and its CI [lo, hi]: pass if hi <= margin, fail if lo > margin, else indicative.
- accuracy_retention (non-inferiority, margin (1 - min_accuracy_retention) x base macro-mean accuracy):
  with d = acc_mean - acc_mean_base (tasks weighed equally, items resampled within each task) and its
  CI: pass if lo >= -margin, fail if hi < -margin, else indicative. The margin multiplies the base
  score instead of dividing by it, so a base accuracy of 0 is judged too (margin 0: no drop allowed).
- group_worsening: a gated bias group (slices rows with "gated": CrowS-Pairs pct_stereotype, BBQ bias
  score, StereoSet ss, Winogender accuracy) with n >= min_group_n fails when it moves in its worse
  direction by more than max_group_worsening *with its CI excluding zero* on that side (a big move the
  CI cannot tell from noise is not a failure). No failing group: pass if every gated group could detect
  a worsening of max_group_worsening (its mde, below, is at most that) and no group is ungated, else
  indicative, naming the groups that cannot. Groups with n < min_group_n are not gated at all (with n=3
  a bootstrap CI can exclude zero on noise): "ungated_groups" lists them, and they keep the gate from a pass.

Detectable change (mde): the smallest worsening the gate finds with 80% power at its n, (z_0.975 +
z_0.80) x se, se the standard deviation of the resampled deltas (the interval's spread). For
count-based statistics (accuracies, bias shares) se is floored at 1/n: two models that agree on every
item have se 0, yet no change smaller than one item in n can be seen. A gate whose mde exceeds its
margin is flagged `detectable: false`; its verdict is then at best indicative for the group gate, and
a pass of the ppl/accuracy gates means the interval itself cleared the margin.

NaN anywhere a gate looks (a value, an interval bound, a group row) fails that gate and names it:
`nan > bound` is False, so a comparison alone would let it pass.
"""
from __future__ import annotations

import math
from typing import Any

from scipy.stats import norm

from tailor.config import Gates

NOT_GROUPS = ("wiki_ppl", "accuracy", "accuracy_mean")
ALPHA = 0.05  # the intervals compare() computes are 95% (bootstrap.paired_bootstrap's default)
POWER = 0.80
Z_MDE = float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))  # 2.80

RULES = {
    "ppl_increase": "pass if the 95% CI of ppl - ppl_base lies at or below max_ppl_increase x ppl_base; "
                    "fail if it lies wholly above; otherwise indicative (too few items to tell)",
    "accuracy_retention": "margin = (1 - min_accuracy_retention) x acc_mean_base; pass if the 95% CI of "
                          "acc_mean - acc_mean_base lies at or above -margin (non-inferiority shown); fail if it "
                          "lies wholly below; otherwise indicative (too few items to tell)",
    "group_worsening": "fail if a group with n >= min_group_n worsens by more than max_group_worsening with its "
                       "95% CI excluding 0 on the worse side; pass if none does and every such group's mde "
                       "(80% power) is at most max_group_worsening and no group has n < min_group_n; otherwise indicative",
}


def _nan(*xs: Any) -> bool:
    return any(x is None or (isinstance(x, float) and math.isnan(x)) for x in xs)


def mde(row: dict[str, Any], floor_one_item: bool = True) -> float:
    """Smallest change of this row's statistic found with POWER at its n (see the module docstring)."""
    se = row.get("se", float("nan"))
    if _nan(se):
        return float("nan")
    return Z_MDE * max(se, 1.0 / row["n"] if floor_one_item else 0.0)


def worsening(row: dict[str, Any]) -> tuple[float, bool]:
    """(move in the worse direction, whether the CI excludes zero on that side) of one slice row."""
    if row.get("worse", "higher") == "higher":
        return row["delta"], row["ci_low"] > 0
    return -row["delta"], row["ci_high"] < 0


def group_rows(slices: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(benchmark, row) of every gated per-group slice row."""
    return [(k, r) for k, rows in slices.items() if k not in NOT_GROUPS and not k.endswith("_overall")
            for r in rows if r.get("gated", True)]


def _interval_gate(name: str, row: dict[str, Any] | None, margin: float, lower_is_worse: bool, value: float,
                   threshold: float, what: str, floor_one_item: bool) -> dict[str, Any]:
    """A non-inferiority verdict on one delta row: `margin` is the worsening allowed (>= 0)."""
    out = {"name": name, "value": value, "threshold": threshold, "margin": margin, "rule": RULES[name]}
    if row is None:
        return out | {"verdict": "fail", "passed": False, "reason": f"{what}: no interval to judge"}
    lo, hi = row["ci_low"], row["ci_high"]
    m = mde(row, floor_one_item)
    out |= {"delta": row["delta"], "ci_low": lo, "ci_high": hi, "n": row["n"], "mde": m,
            "detectable": bool(m <= margin) if not _nan(m, margin) else False}
    ci = f"{row['delta']:+.4g} [{lo:+.4g}, {hi:+.4g}], n={row['n']}"
    if _nan(row["base"], row["compressed"], row["delta"], lo, hi, margin):  # value: shown only (NaN at base 0)
        return out | {"verdict": "fail", "passed": False, "reason": f"{what}: NaN in the comparison ({ci})"}
    # worse side: below -margin for accuracy, above +margin for perplexity
    good, bad = (lo >= -margin, hi < -margin) if lower_is_worse else (hi <= margin, lo > margin)
    verdict = "pass" if good else "fail" if bad else "indicative"
    side = "-" if lower_is_worse else "+"
    told = {"pass": "within", "fail": "beyond", "indicative": "straddles"}[verdict]
    reason = (f"{what}: change {ci}, 95% CI {told} the margin {side}{margin:.4g}"
              + ("" if verdict != "indicative" else f"; too few items to tell (mde {m:.4g})"))
    return out | {"verdict": verdict, "passed": verdict == "pass", "reason": reason}


def _ppl_gate(metrics: dict[str, Any], slices: dict[str, list[dict]], gates: Gates) -> dict[str, Any]:
    row = (slices.get("wiki_ppl") or [None])[0]
    ppl, base = metrics.get("ppl", float("nan")), metrics.get("ppl_base", float("nan"))
    inc = ppl / base - 1 if not _nan(ppl, base) and base > 0 else float("nan")
    return _interval_gate("ppl_increase", row, gates.max_ppl_increase * base, False, inc, gates.max_ppl_increase,
                          f"perplexity {ppl:.2f} vs base {base:.2f} ({inc:+.1%})", floor_one_item=False)


def _accuracy_gate(metrics: dict[str, Any], slices: dict[str, list[dict]], gates: Gates) -> dict[str, Any]:
    row = (slices.get("accuracy_mean") or [None])[0]
    if row is None:  # evaluate.tasks lists no accuracy task: nothing shows accuracy was kept
        return _interval_gate("accuracy_retention", None, float("nan"), True, float("nan"),
                              gates.min_accuracy_retention, "no accuracy task ran", True)
    base, comp = row["base"], row["compressed"]
    kept = comp / base if not _nan(base, comp) and base > 0 else float("nan")  # shown only, never compared
    per_task = ", ".join(f"{r['group']} {r['compressed']:.3f}/{r['base']:.3f}"
                         for r in slices.get("accuracy", []) if r["metric"] == "acc")
    g = _interval_gate("accuracy_retention", row, (1 - gates.min_accuracy_retention) * base, True, kept,
                       gates.min_accuracy_retention,
                       f"mean accuracy {comp:.3f} vs base {base:.3f} ({kept:.1%} kept)", True)
    g["reason"] += f"; per task (compressed/base): {per_task}" if per_task else ""
    return g


def _group_entry(bench: str, r: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": bench, "group": r["group"], "metric": r["metric"], "n": r["n"], "delta": r["delta"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "worsening": worsening(r)[0]}


def check(metrics: dict[str, Any], slices: dict[str, list[dict]], gates: Gates) -> dict[str, Any]:
    """{"passed", "verdict", "gates": [{"name", "verdict", "passed", "value", "threshold", "margin", "delta",
    "ci_low", "ci_high", "n", "mde", "detectable", "rule", "reason", ...}], "failed_groups": [...],
    "gated_groups": [{"benchmark", "group", "metric", "n", "delta", "ci_low", "ci_high", "worsening", "mde",
    "detectable"}], "ungated_groups": [...], "power": 0.8, "alpha": 0.05}."""
    out = [_ppl_gate(metrics, slices, gates), _accuracy_gate(metrics, slices, gates)]
    rows = group_rows(slices)
    gated = [(b, r) for b, r in rows if r["n"] >= gates.min_group_n]
    small = [_group_entry(b, r) for b, r in rows if r["n"] < gates.min_group_n]
    thr = gates.max_group_worsening
    seen, worse = [], []
    for bench, r in gated:
        w, excludes_zero = worsening(r)
        m = mde(r)
        seen.append(_group_entry(bench, r) | {"mde": m, "detectable": bool(m <= thr) if not _nan(m) else False})
        label = f"{bench}/{r['group']} {r['metric']}"
        if _nan(r["delta"], r["ci_low"], r["ci_high"]):
            worse.append(seen[-1] | {"reason": f"{label}: NaN in the comparison (n={r['n']})"})
        elif w > thr and excludes_zero:
            worse.append(seen[-1] | {"reason": f"{label} worsened by {r['delta']:+.2f} "
                                               f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] (n={r['n']})"})
    blind = [s for s in seen if not s["detectable"]]
    too_small = (f"; {len(small)} group row(s) with n < {gates.min_group_n} too small to gate "
                 f"(see ungated_groups)") if small else ""
    if worse:
        verdict, reason = "fail", "; ".join(w["reason"] for w in worse)
    elif blind or small:
        names = ", ".join(f"{s['benchmark']}/{s['group']} (n={s['n']}, mde {s['mde']:.2f})" for s in blind[:5])
        verdict = "indicative"
        reason = f"no group worsens beyond {thr} with its CI excluding 0, but "
        reason += (f"{len(blind)} of {len(seen)} gated groups cannot detect a worsening of {thr} at 80% power: {names}"
                   + (f" and {len(blind) - 5} more" if len(blind) > 5 else "")) if blind else "not every group is gated"
    else:
        verdict = "pass"
        reason = (f"no group worsens beyond {thr} with its CI excluding 0 ({len(seen)} groups with "
                  f"n >= {gates.min_group_n} checked, each able to detect {thr})")
    values = [worsening(r)[0] for _, r in gated]
    out.append({"name": "group_worsening", "verdict": verdict, "passed": verdict == "pass",
                "value": float("nan") if any(_nan(v) for v in values) else max(values, default=0.0),
                "threshold": thr, "rule": RULES["group_worsening"], "reason": reason + too_small,
                "mde": max((s["mde"] for s in seen), default=0.0), "detectable": not blind,
                "groups_gated": len(seen), "groups_ungated": len(small), "groups_undetectable": len(blind),
                "min_group_n": gates.min_group_n})
    verdicts = {g["verdict"] for g in out}
    overall = "fail" if "fail" in verdicts else "indicative" if "indicative" in verdicts else "pass"
    return {"passed": overall == "pass", "verdict": overall, "gates": out, "failed_groups": worse,
            "gated_groups": seen, "ungated_groups": small, "power": POWER, "alpha": ALPHA}
