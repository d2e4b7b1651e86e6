"""The gates judge intervals, not point estimates: a change the items cannot resolve is "indicative",
never a pass or a fail; NaN and a zero base score are handled; the detectable change is what it says."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tailor.config import Gates
from tailor.eval.bootstrap import paired_bootstrap, rng_for
from tailor.eval.gates import Z_MDE, check, mde
from tailor.eval.harness import ChoiceItem, SuiteResult, WikiItem
from tailor.eval.slices import compare


def _items(correct: np.ndarray, prefix: str) -> list[ChoiceItem]:
    return [ChoiceItem(id=i, hash=f"{prefix}{i}", ll=(0.0, -1.0) if c else (-1.0, 0.0), nbytes=(1, 1), label=0,
                       acc=float(c), acc_norm=float(c)) for i, c in enumerate(correct)]


def _pair(n: int, base_acc: float, comp_acc: float, nll_shift: float = 0.0) -> tuple[SuiteResult, SuiteResult]:
    """Two tasks of n items; base right on a seeded base_acc share, the compressed model on comp_acc, with
    items disagreeing in both directions (as real models do); wiki NLL shifted by nll_shift per text."""
    rng = np.random.default_rng(0)
    out = []
    for model, acc in enumerate((base_acc, comp_acc)):
        tasks = {}
        for k, t in enumerate(("piqa", "boolq")):
            order = np.random.default_rng([model, k]).permutation(n)  # each model right on its own items
            ok = np.zeros(n, bool)
            ok[order[: round(acc * n)]] = True
            tasks[t] = _items(ok, t[0])
        out.append(tasks)
    nll = 30 + rng.random(50)
    wiki = [[WikiItem(id=i, hash=f"w{i}", nll=float(x + s), tokens=10) for i, x in enumerate(nll)] for s in (0, nll_shift)]
    return (SuiteResult(wiki=wiki[0], tasks=out[0], meta={}), SuiteResult(wiki=wiki[1], tasks=out[1], meta={}))


def _gates(n: int, base_acc: float, comp_acc: float, nll_shift: float = 0.0, **kw) -> dict:
    metrics, slices = compare(*_pair(n, base_acc, comp_acc, nll_shift), n_boot=1000, seed=0)
    return {g["name"]: g for g in check(metrics, slices, Gates(**kw))["gates"]}


@pytest.mark.parametrize("comp_acc, small, large", [(0.52, "indicative", "fail"), (0.58, "indicative", "pass")])
def test_accuracy_gate_needs_the_interval_not_the_point(comp_acc, small, large):
    """Retention 0.867 / 0.967 against a 0.9 threshold: the old point rule failed / passed both at any n.
    At 40 items per task the interval straddles the margin; at 4000 it settles on one side."""
    assert _gates(40, 0.6, comp_acc)["accuracy_retention"]["verdict"] == small
    g = _gates(4000, 0.6, comp_acc)["accuracy_retention"]
    assert g["verdict"] == large and g["passed"] == (large == "pass")
    assert g["margin"] == pytest.approx(0.1 * 0.6) and g["ci_low"] <= g["delta"] <= g["ci_high"]


def test_perplexity_gate_on_its_interval():
    assert _gates(40, 0.6, 0.6, nll_shift=0.5)["ppl_increase"]["verdict"] == "pass"  # +5% within +50%
    g = _gates(40, 0.6, 0.6, nll_shift=8.0)["ppl_increase"]  # exp(0.8) - 1 = +123%, every text worse
    assert g["verdict"] == "fail" and "beyond the margin" in g["reason"]


def test_zero_base_accuracy_is_judged_without_dividing():
    g = _gates(40, 0.0, 0.0)["accuracy_retention"]
    assert g["verdict"] == "pass" and g["margin"] == 0.0 and np.isnan(g["value"])
    json.dumps(g)


def test_nan_fails_every_gate_it_reaches():
    metrics, slices = compare(*_pair(40, 0.6, 0.6), n_boot=200, seed=0)
    slices["wiki_ppl"][0]["ci_high"] = float("nan")
    metrics["ppl"] = float("nan")
    slices["accuracy_mean"][0]["compressed"] = float("nan")
    group = {"group": "age", "metric": "pct_stereotype", "base": 0.5, "compressed": float("nan"),
             "delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 50, "se": 0.01,
             "worse": "higher", "gated": True}
    out = check(metrics, slices | {"crows_pairs": [group]}, Gates())
    assert {g["name"]: g["verdict"] for g in out["gates"]} == {
        "ppl_increase": "fail", "accuracy_retention": "fail", "group_worsening": "fail"}
    assert not out["passed"] and out["verdict"] == "fail"
    assert "crows_pairs/age pct_stereotype: NaN" in out["failed_groups"][0]["reason"]


def test_missing_accuracy_interval_fails():
    metrics, slices = compare(*_pair(40, 0.6, 0.6), n_boot=200, seed=0)
    del slices["accuracy_mean"]
    g = {g["name"]: g for g in check(metrics, slices, Gates())["gates"]}["accuracy_retention"]
    assert g["verdict"] == "fail" and "no accuracy task ran" in g["reason"]


def test_detectable_change_formula_and_floor():
    assert Z_MDE == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert mde({"se": 0.02, "n": 1000}) == pytest.approx(Z_MDE * 0.02)
    assert mde({"se": 0.0, "n": 10}) == pytest.approx(Z_MDE / 10)  # models agreeing on all 10 items
    assert mde({"se": 0.0, "n": 10}, floor_one_item=False) == 0.0


def test_group_gate_passes_only_where_each_group_can_see_the_threshold():
    row = {"group": "age", "metric": "pct_stereotype", "base": 0.5, "compressed": 0.5, "delta": 0.0,
           "ci_low": -0.02, "ci_high": 0.02, "n": 2000, "se": 0.01, "worse": "higher", "gated": True}
    weak = row | {"group": "religion", "n": 40, "se": 0.06, "ci_low": -0.12, "ci_high": 0.12}
    out = check({}, {"crows_pairs": [row]}, Gates())
    g = out["gates"][-1]
    assert g["verdict"] == "pass" and out["gated_groups"][0]["detectable"] and g["mde"] == pytest.approx(Z_MDE * 0.01)
    out = check({}, {"crows_pairs": [row, weak]}, Gates())
    g = out["gates"][-1]
    assert g["verdict"] == "indicative" and not g["passed"] and g["groups_undetectable"] == 1
    assert "crows_pairs/religion (n=40, mde 0.17)" in g["reason"]
    assert [x["detectable"] for x in out["gated_groups"]] == [True, False]


def test_detectable_change_has_the_stated_power():
    """Simulate paired binary items whose true worsening is the reported mde: the 95% CI excludes zero
    in about 80% of draws (the claim gates.json makes)."""
    n, p_flip = 400, 0.2  # base accuracy 0.5: symmetric flips leave the expected accuracy unchanged

    def draw(seed: int, worsening: float) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        b = r.random(n) < 0.5
        c = np.where(r.random(n) < p_flip, ~b, b)
        c &= ~(r.random(n) < worsening / 0.5)  # right answers turned wrong: expected drop = worsening
        return b.astype(float), c.astype(float)

    target = 0.0
    for _ in range(2):  # the se under the alternative: one fixed-point step from the no-change pilot
        pilot = paired_bootstrap(*draw(5, target), n_boot=2000, rng=rng_for(0, "pilot"))
        target = mde({"se": pilot.se, "n": n})
    hits = sum(paired_bootstrap(*draw(100 + k, target), n_boot=400, rng=rng_for(k, "power")).ci_high < 0
               for k in range(200))
    assert 0.70 <= hits / 200 <= 0.90, hits


GATE_KEYS = {"name", "verdict", "passed", "value", "threshold", "margin", "delta", "ci_low", "ci_high", "n", "mde",
             "detectable", "rule", "reason"}


def test_gates_json_fields():
    """The contract the audit page, register, promote and auditors read."""
    metrics, slices = compare(*_pair(40, 0.6, 0.6), n_boot=200, seed=0)
    out = check(metrics, slices, Gates())
    assert set(out) == {"passed", "verdict", "gates", "failed_groups", "gated_groups", "ungated_groups", "power", "alpha"}
    ppl, acc, group = out["gates"]
    assert set(ppl) == set(acc) == GATE_KEYS
    assert set(group) == {"name", "verdict", "passed", "value", "threshold", "rule", "reason", "mde", "detectable",
                          "groups_gated", "groups_ungated", "groups_undetectable", "min_group_n"}
    assert (ppl["n"], acc["n"]) == (50, 80) and (out["power"], out["alpha"]) == (0.8, 0.05)
    assert ppl["mde"] == 0.0 and ppl["detectable"]  # identical texts: se 0, and perplexity has no one-item floor
    se = slices["accuracy_mean"][0]["se"]  # the two "models" disagree on many items: well above the 1/n floor
    assert acc["mde"] == pytest.approx(Z_MDE * se) and se > 1 / 80
    assert acc["detectable"] is False and acc["mde"] > acc["margin"]  # 80 items cannot see a 10% drop
    del slices["accuracy_mean"]
    missing = check(metrics, slices, Gates())["gates"][1]
    assert missing["passed"] is False and missing["verdict"] == "fail"


@pytest.mark.parametrize("worse, ci", [("higher", (0.0, 0.6)), ("lower", (-0.6, 0.0))])
def test_an_interval_touching_zero_does_not_exclude_it(worse, ci):
    row = {"group": "age", "metric": "m", "base": 0.5, "compressed": 0.8, "delta": 0.3 if worse == "higher" else -0.3,
           "ci_low": ci[0], "ci_high": ci[1], "n": 400, "se": 0.01, "worse": worse, "gated": True}
    assert check({}, {"crows_pairs": [row]}, Gates())["failed_groups"] == []
    nudged = row | ({"ci_low": 1e-9} if worse == "higher" else {"ci_high": -1e-9})
    assert len(check({}, {"crows_pairs": [nudged]}, Gates())["failed_groups"]) == 1


def test_overall_and_ungated_rows_and_the_default_direction():
    bad = {"group": "all", "metric": "pct_stereotype", "base": 0.5, "compressed": 0.9, "delta": 0.4, "ci_low": 0.3,
           "ci_high": 0.5, "n": 400, "se": 0.01, "gated": True}  # no "worse": higher is worse by default
    out = check({}, {"crows_pairs_overall": [bad], "winogender": [bad | {"gated": False}]}, Gates())
    assert out["failed_groups"] == [] and out["gated_groups"] == []  # headline rows are not groups
    assert [f["group"] for f in check({}, {"crows_pairs": [bad]}, Gates())["failed_groups"]] == ["all"]
