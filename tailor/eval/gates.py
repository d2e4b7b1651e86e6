"""Release gates: compressed vs base, each verdict with its reason.

- ppl_increase: held-out perplexity at most (1 + max_ppl_increase) x the base model's.
- accuracy_retention: the mean accuracy over the accuracy tasks (macro) keeps at least
  min_accuracy_retention of the base model's.
- group_worsening: no gated bias group (slices rows with "gated": CrowS-Pairs pct_stereotype, BBQ
  bias score, StereoSet ss, Winogender accuracy) moves in its worse direction by more than
  max_group_worsening *with its 95% paired CI excluding zero*: a big move that the CI cannot tell
  from noise (small n) is reported, not gated. Groups with fewer than min_group_n paired items are not
  gated at all (with n=3 a bootstrap CI can exclude zero on noise): gates.json lists them under
  "ungated_groups" with their n and move, and the verdict is computed over the groups with n >= min_group_n.
"""
from __future__ import annotations

from typing import Any

from tailor.config import Gates

NOT_GROUPS = ("wiki_ppl", "accuracy")


def worsening(row: dict[str, Any]) -> tuple[float, bool]:
    """(move in the worse direction, whether the CI excludes zero on that side) of one slice row."""
    if row.get("worse", "higher") == "higher":
        return row["delta"], row["ci_low"] > 0
    return -row["delta"], row["ci_high"] < 0


def group_rows(slices: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(benchmark, row) of every gated per-group slice row."""
    return [(k, r) for k, rows in slices.items() if k not in NOT_GROUPS and not k.endswith("_overall")
            for r in rows if r.get("gated", True)]


def check(metrics: dict[str, Any], slices: dict[str, list[dict]], gates: Gates) -> dict[str, Any]:
    """{"passed": bool, "gates": [{"name", "passed", "value", "threshold", "reason"}], "failed_groups": [...],
    "ungated_groups": [{"benchmark", "group", "metric", "n", "delta", "ci_low", "ci_high", "worsening"}]}."""
    out = []
    inc = metrics["ppl"] / metrics["ppl_base"] - 1
    out.append({"name": "ppl_increase", "passed": inc <= gates.max_ppl_increase, "value": inc,
                "threshold": gates.max_ppl_increase,
                "reason": f"perplexity {metrics['ppl']:.2f} vs base {metrics['ppl_base']:.2f} ({inc:+.1%})"})
    key = "acc_mean" if "acc_mean" in metrics else "piqa"
    if key not in metrics:  # evaluate.tasks lists no accuracy task: nothing shows accuracy was kept
        metrics = {**metrics, key: float("nan"), f"{key}_base": float("nan")}
    ret = metrics[key] / metrics[f"{key}_base"] if metrics[f"{key}_base"] else 0.0
    per_task = ", ".join(f"{r['group']} {r['compressed']:.3f}/{r['base']:.3f}"
                         for r in slices.get("accuracy", []) if r["metric"] == "acc")
    out.append({"name": "accuracy_retention", "passed": ret >= gates.min_accuracy_retention, "value": ret,
                "threshold": gates.min_accuracy_retention,
                "reason": f"mean accuracy {metrics[key]:.3f} vs base {metrics[f'{key}_base']:.3f} ({ret:.1%} kept)"
                          + (f"; per task (compressed/base): {per_task}" if per_task else "")})
    rows = group_rows(slices)
    gated = [(b, r) for b, r in rows if r["n"] >= gates.min_group_n]
    small = [{"benchmark": b, "group": r["group"], "metric": r["metric"], "n": r["n"], "delta": r["delta"],
              "ci_low": r["ci_low"], "ci_high": r["ci_high"], "worsening": worsening(r)[0]}
             for b, r in rows if r["n"] < gates.min_group_n]
    worse = []
    for bench, r in gated:
        w, excludes_zero = worsening(r)
        if w > gates.max_group_worsening and excludes_zero:
            worse.append({"benchmark": bench, "group": r["group"], "metric": r["metric"], "delta": r["delta"],
                          "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"],
                          "reason": f"{bench}/{r['group']} {r['metric']} worsened by {r['delta']:+.2f} "
                                    f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] (n={r['n']})"})
    too_small = (f"; {len(small)} group row(s) with n < {gates.min_group_n} too small to gate "
                 f"(see ungated_groups)") if small else ""
    out.append({"name": "group_worsening", "passed": not worse,
                "value": max((worsening(r)[0] for _, r in gated), default=0.0),
                "threshold": gates.max_group_worsening,
                "reason": ("; ".join(w["reason"] for w in worse) if worse else
                           f"no group worsens beyond {gates.max_group_worsening} with its CI excluding 0 "
                           f"({len(gated)} groups with n >= {gates.min_group_n} checked)") + too_small,
                "groups_gated": len(gated), "groups_ungated": len(small), "min_group_n": gates.min_group_n})
    return {"passed": all(g["passed"] for g in out), "gates": out, "failed_groups": worse, "ungated_groups": small}
