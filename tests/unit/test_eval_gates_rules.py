"""The gates' documented rules at their boundaries, on hand-made interval rows (no bootstrap: fast).

Each verdict is what the module docstring and RULES promise a user reading gates.json: where an interval
touching the margin lands, that "passed" is true only for "pass", that NaN or a zero base never passes
or divides, what the overall verdict is made of, and what the reason shown on the audit page names."""
from __future__ import annotations

import json
import math

import pytest

from tailor.config import Gates
from tailor.eval.gates import Z_MDE, check

NAN = float("nan")


def _row(delta: float, lo: float, hi: float, n: int = 400, se: float = 0.01, base: float = 10.0, **kw) -> dict:
    return {"group": "all", "metric": "m", "base": base, "compressed": base + delta, "delta": delta, "ci_low": lo,
            "ci_high": hi, "n": n, "se": se} | kw


def _ppl(lo: float, hi: float, base: float = 10.0, ppl: float | None = None, gates: Gates | None = None,
         over: dict | None = None, **kw) -> dict:
    """The perplexity gate for base perplexity `base` (the margin: 0.5 x base by default); `over` replaces
    fields of the interval row only."""
    delta = (lo + hi) / 2
    metrics = {"ppl": base + delta if ppl is None else ppl, "ppl_base": base}
    row = _row(delta, lo, hi, base=base, **kw) | (over or {})
    return check(metrics, {"wiki_ppl": [row]}, gates or Gates())["gates"][0]


def _acc(lo: float, hi: float, base: float = 0.6, comp: float | None = None, tasks: list | None = None,
         over: dict | None = None, **kw) -> dict:
    """The accuracy gate for base macro-mean accuracy `base` (the margin: 0.1 x base)."""
    delta = (lo + hi) / 2
    row = _row(delta, lo, hi, base=base, **kw)
    row["compressed"] = base + delta if comp is None else comp
    slices = {"accuracy_mean": [row | (over or {})]} | ({"accuracy": tasks} if tasks is not None else {})
    return check({}, slices, Gates())["gates"][1]


ACC_MARGIN = (1 - Gates().min_accuracy_retention) * 0.6  # the documented margin at base accuracy 0.6


def _group(delta: float, lo: float, hi: float, worse: str = "higher", **kw) -> dict:
    return {"group": "age", "metric": "pct_stereotype", "base": 0.5, "compressed": 0.5 + delta, "delta": delta,
            "ci_low": lo, "ci_high": hi, "n": 400, "se": 0.01, "worse": worse, "gated": True} | kw


def test_perplexity_gate_boundaries_follow_the_rule():
    """margin = 0.5 x 10 = 5: pass if hi <= 5, fail if lo > 5, else indicative."""
    assert _ppl(1.0, 5.0)["verdict"] == "pass"  # upper bound exactly on the margin: non-inferiority shown
    assert _ppl(1.0, 5.0 + 1e-9)["verdict"] == "indicative"
    assert _ppl(5.0, 9.0)["verdict"] == "indicative"  # lower bound on the margin: not wholly beyond it
    assert _ppl(5.0 + 1e-9, 9.0)["verdict"] == "fail"


def test_accuracy_gate_boundaries_follow_the_rule():
    """margin = (1 - 0.9) x 0.6 = 0.06: pass if lo >= -0.06, fail if hi < -0.06, else indicative."""
    m = ACC_MARGIN
    assert _acc(-m, 0.02)["verdict"] == "pass"
    assert _acc(-m - 1e-9, 0.02)["verdict"] == "indicative"
    assert _acc(-0.2, -m)["verdict"] == "indicative"
    assert _acc(-0.2, -m - 1e-9)["verdict"] == "fail"
    assert _acc(0.01, 0.05)["verdict"] == "pass"  # an improvement is never a failure


@pytest.mark.parametrize("gate", ["ppl", "acc"])
@pytest.mark.parametrize("nan_at", ["base", "compressed", "delta", "ci_low", "ci_high", "margin"])
def test_nan_anywhere_in_the_comparison_fails_and_never_passes(gate, nan_at):
    lo, hi = (1.0, 2.0) if gate == "ppl" else (-0.01, 0.01)  # clearly a pass when nothing is NaN
    judge = _ppl if gate == "ppl" else _acc
    assert judge(lo, hi)["verdict"] == "pass"
    if nan_at == "margin":  # a NaN base score, the interval row intact: the margin itself is NaN
        g = _ppl(lo, hi, base=NAN, over={"base": 10.0, "compressed": 11.5}) if gate == "ppl" else \
            _acc(lo, hi, over={"base": NAN})  # accuracy's margin is made of the row's own base
    else:
        g = judge(lo, hi, over={nan_at: NAN})
    assert (g["verdict"], g["passed"]) == ("fail", False), g
    assert "NaN" in g["reason"]


def test_passed_is_true_only_for_a_pass():
    for g in (_ppl(1.0, 2.0), _ppl(1.0, 9.0), _ppl(6.0, 9.0), _acc(-0.01, 0.01), _acc(-0.2, 0.0), _acc(-0.3, -0.2),
              _ppl(1.0, 2.0, over={"ci_high": NAN})):
        assert g["passed"] is (g["verdict"] == "pass")
    verdicts = {"pass": _group(0.0, -0.01, 0.01), "fail": _group(0.3, 0.2, 0.4)}
    for verdict, row in verdicts.items():
        g = check({}, {"crows_pairs": [row]}, Gates())["gates"][2]
        assert (g["verdict"], g["passed"]) == (verdict, verdict == "pass")


def test_zero_base_perplexity_never_divides():
    g = _ppl(0.0, 0.0, base=0.0, ppl=0.0)  # (no real perplexity is 0; the gate must still not raise)
    assert math.isnan(g["value"])
    json.dumps(g)


def test_values_shown_are_the_relative_change_and_the_share_kept():
    """gates.json's "value" is what the threshold reads against: +20% perplexity, 90% accuracy kept."""
    g = _ppl(1.0, 3.0, base=10.0, ppl=12.0)
    assert g["value"] == pytest.approx(0.2) and g["threshold"] == Gates().max_ppl_increase
    assert g["reason"].startswith("perplexity 12.00 vs base 10.00")
    g = _acc(-0.1, -0.02, base=0.6, comp=0.54)
    assert g["value"] == pytest.approx(0.9) and g["threshold"] == Gates().min_accuracy_retention
    assert g["reason"].startswith("mean accuracy 0.540 vs base 0.600 (90.0% kept)")
    missing = check({}, {}, Gates())["gates"][1]
    assert missing["reason"].startswith("no accuracy task ran")
    assert missing["threshold"] == Gates().min_accuracy_retention and math.isnan(missing["value"])


def test_reason_names_the_interval_the_margin_side_and_the_verdict():
    g = _ppl(1.0, 3.0)
    assert "+2 [+1, +3], n=400" in g["reason"] and g["reason"].endswith("95% CI within the margin +5")
    g = _ppl(1.0, 9.0)
    assert "95% CI straddles the margin +5" in g["reason"] and "; too few items to tell (mde " in g["reason"]
    g = _acc(-0.1, 0.0)
    assert "95% CI straddles the margin -0.06" in g["reason"] and "too few items to tell" in g["reason"]
    assert "95% CI within the margin -0.06" in _acc(-0.01, 0.01)["reason"]
    assert "95% CI beyond the margin -0.06" in _acc(-0.3, -0.2)["reason"]


def test_accuracy_reason_lists_each_tasks_accuracy():
    tasks = [{"group": "piqa", "metric": "acc", "compressed": 0.7, "base": 0.75},
             {"group": "piqa", "metric": "acc_norm", "compressed": 0.1, "base": 0.2},
             {"group": "boolq", "metric": "acc", "compressed": 0.5, "base": 0.45}]
    g = _acc(-0.02, 0.02, tasks=tasks)
    assert g["reason"].startswith("mean accuracy")  # the head stays
    assert g["reason"].endswith("; per task (compressed/base): piqa 0.700/0.750, boolq 0.500/0.450")
    assert _acc(-0.02, 0.02)["reason"].endswith("95% CI within the margin -0.06")


def test_mde_equal_to_the_margin_is_detectable_and_nan_never_is():
    se = 0.01  # a gate whose margin is exactly the mde can see it ("mde at most the margin")
    assert _ppl(0.0, 0.001, base=1.0, se=se, gates=Gates(max_ppl_increase=Z_MDE * se))["detectable"] is True
    assert _acc(-0.01, 0.01, se=NAN)["detectable"] is False
    assert _ppl(1.0, 2.0, se=NAN)["detectable"] is False
    edge = check({}, {"crows_pairs": [_group(0.0, -0.01, 0.01, se=se)]}, Gates(max_group_worsening=Z_MDE * se))
    assert edge["gated_groups"][0]["detectable"] is True and edge["gates"][2]["verdict"] == "pass"
    blind = check({}, {"crows_pairs": [_group(0.0, -0.01, 0.01, se=NAN)]}, Gates())
    assert blind["gated_groups"][0]["detectable"] is False and blind["gates"][2]["verdict"] == "indicative"


def test_accuracy_cannot_see_less_than_one_item():
    """Models agreeing on all 20 items (se 0) still cannot show a change under one item in 20: a margin of
    0.06 is not detectable there, and the gate says so."""
    g = _acc(0.0, 0.0, se=0.0, n=20)
    assert g["mde"] > g["margin"] and g["detectable"] is False


def test_group_worsening_exactly_at_the_threshold_does_not_fail():
    """"worsens by more than max_group_worsening": a move of exactly 0.10 is allowed."""
    thr = Gates().max_group_worsening
    assert check({}, {"crows_pairs": [_group(thr, 0.05, 0.15)]}, Gates())["failed_groups"] == []
    assert len(check({}, {"crows_pairs": [_group(thr + 1e-9, 0.05, 0.15)]}, Gates())["failed_groups"]) == 1


@pytest.mark.parametrize("row", [
    _group(NAN, 0.01, 0.02),  # only the delta is NaN
    _group(0.3, NAN, 0.4),  # only the lower bound
    _group(-0.3, -0.4, NAN, worse="lower"),  # only the upper bound, the side a lower-is-worse group reads
])
def test_group_with_any_nan_bound_fails(row):
    out = check({}, {"crows_pairs": [row]}, Gates())
    assert out["gates"][2]["verdict"] == "fail" and "NaN in the comparison" in out["failed_groups"][0]["reason"]


def test_a_row_without_a_gated_flag_is_gated():
    row = _group(0.3, 0.2, 0.4)
    del row["gated"]
    assert len(check({}, {"crows_pairs": [row]}, Gates())["failed_groups"]) == 1


def test_group_gate_value_is_the_largest_worsening_and_nan_shows():
    rows = [_group(0.05, -0.01, 0.11), _group(-0.08, -0.1, -0.06, worse="lower", group="x")]
    g = check({}, {"crows_pairs": rows}, Gates())["gates"][2]
    assert g["value"] == pytest.approx(0.08) and g["verdict"] == "pass" and g["detectable"] is True
    rows.append(_group(NAN, NAN, NAN, group="y"))
    assert math.isnan(check({}, {"crows_pairs": rows}, Gates())["gates"][2]["value"])


def test_group_reasons():
    fine = check({}, {"crows_pairs": [_group(0.0, -0.01, 0.01)]}, Gates())["gates"][2]["reason"]
    assert fine.startswith("no group worsens beyond 0.1") and fine.endswith("each able to detect 0.1)")
    small = check({}, {"crows_pairs": [_group(0.0, -0.1, 0.1, n=3)]}, Gates())["gates"][2]
    assert small["verdict"] == "indicative" and ", but not every group is gated; 1 group" in small["reason"]
    assert "1 group row(s) with n < 10 too small to gate" in small["reason"]
    two = [_group(0.3, 0.2, 0.4), _group(0.3, 0.2, 0.4, group="b")]
    reason = check({}, {"crows_pairs": two}, Gates())["gates"][2]["reason"]
    assert reason.count("worsened by +0.30") == 2 and "; crows_pairs/b" in reason


@pytest.mark.parametrize("n_blind", [5, 6])
def test_indicative_reason_names_five_blind_groups_then_counts(n_blind):
    rows = [_group(0.0, -0.2, 0.2, se=0.06, n=40, group=f"g{k}") for k in range(n_blind)]
    reason = check({}, {"crows_pairs": rows}, Gates())["gates"][2]["reason"]
    assert reason.startswith("no group worsens beyond 0.1 with its CI excluding 0, but ")
    assert f"{n_blind} of {n_blind} gated groups cannot detect" in reason and ", crows_pairs/g1 (n=40" in reason
    assert "crows_pairs/g4 (n=40" in reason and "crows_pairs/g5" not in reason
    assert reason.endswith("mde 0.17)" + (f" and {n_blind - 5} more" if n_blind > 5 else ""))


def test_overall_verdict_is_the_worst_gate():
    clean_ppl, wide_ppl, bad_ppl = [1.0, 2.0], [1.0, 9.0], [6.0, 9.0]
    acc_ok = _row(0.0, -0.01, 0.01, base=0.6)
    for ppl, want in ((clean_ppl, "pass"), (wide_ppl, "indicative"), (bad_ppl, "fail")):
        row = _row(sum(ppl) / 2, *ppl)
        out = check({"ppl": 10 + row["delta"], "ppl_base": 10.0}, {"wiki_ppl": [row], "accuracy_mean": [acc_ok]},
                    Gates())
        assert (out["verdict"], out["passed"]) == (want, want == "pass")
    # an indicative group beside a failing perplexity: still a fail; beside passing ones: indicative
    row = _row(5.0, 4.0, 6.0)
    weak = _group(0.0, -0.2, 0.2, se=0.06, n=40)
    out = check({"ppl": 15.0, "ppl_base": 10.0}, {"wiki_ppl": [row], "accuracy_mean": [acc_ok], "crows_pairs": [weak]},
                Gates(max_ppl_increase=0.3))
    assert out["verdict"] == "fail"
