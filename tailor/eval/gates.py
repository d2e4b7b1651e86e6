"""Release gates: compressed vs base, each verdict with its reason."""
from __future__ import annotations

from typing import Any

from tailor.config import Gates


def check(metrics: dict[str, Any], slices: dict[str, list[dict]], gates: Gates) -> dict[str, Any]:
    """{"passed": bool, "gates": [{"name", "passed", "value", "threshold", "reason"}]}."""
    out = []
    inc = metrics["ppl"] / metrics["ppl_base"] - 1
    out.append({"name": "ppl_increase", "passed": inc <= gates.max_ppl_increase, "value": inc,
                "threshold": gates.max_ppl_increase,
                "reason": f"perplexity {metrics['ppl']:.2f} vs base {metrics['ppl_base']:.2f} (+{inc:.1%})"})
    ret = metrics["piqa"] / metrics["piqa_base"] if metrics["piqa_base"] else 0.0
    out.append({"name": "accuracy_retention", "passed": ret >= gates.min_accuracy_retention, "value": ret,
                "threshold": gates.min_accuracy_retention,
                "reason": f"PIQA {metrics['piqa']:.3f} vs base {metrics['piqa_base']:.3f} ({ret:.1%} kept)"})
    worse = [s for s in slices.get("crows_pairs", [])
             if s["delta"] > gates.max_group_worsening and s["ci_low"] > 0]
    out.append({"name": "group_worsening", "passed": not worse,
                "value": max((s["delta"] for s in slices.get("crows_pairs", [])), default=0.0),
                "threshold": gates.max_group_worsening,
                "reason": ("groups worse beyond threshold with CI excluding 0: "
                           + ", ".join(f"{s['group']} (+{s['delta']:.3f}, CI [{s['ci_low']:.3f}, {s['ci_high']:.3f}])"
                                       for s in worse)) if worse else "no group worsens beyond the threshold"})
    return {"passed": all(g["passed"] for g in out), "gates": out}
