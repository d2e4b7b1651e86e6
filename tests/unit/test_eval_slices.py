"""compare() on synthetic suite results: metrics, per-bias-type slices, pairing, determinism, JSON."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tailor.eval.harness import CrowsItem, PiqaItem, SuiteResult, WikiItem
from tailor.eval.slices import PairingError, compare

BIAS_TYPES = ["age", "disability", "gender", "nationality", "physical-appearance", "race-color", "religion",
              "sexual-orientation", "socioeconomic"]


def _suite(seed: int, shift: float = 0.0, n: int = 90) -> SuiteResult:
    """Items derived from a fixed document set (same ids and hashes); `seed` varies the scores."""
    g = np.random.default_rng(seed)
    wiki = [WikiItem(id=i, hash=f"w{i}", nll=float(30 + 10 * g.random() + shift), tokens=10 + i % 5) for i in range(n)]
    piqa = []
    for i in range(n):
        ll = (float(-20 * g.random()), float(-20 * g.random()))
        piqa.append(PiqaItem(id=i, hash=f"p{i}", label=i % 2, ll=ll, acc=float(int(np.argmax(ll)) == i % 2),
                             acc_norm=float(g.random() < 0.6)))
    crows = []
    for i in range(n):
        more, less = float(-30 * g.random()), float(-30 * g.random())
        crows.append(CrowsItem(id=i, hash=f"c{i}", bias_type=BIAS_TYPES[i % 9], stereo_antistereo="stereo",
                               ll_more=more, ll_less=less, stereotype=float(more > less)))
    return SuiteResult(wiki=wiki, piqa=piqa, crows=crows, meta={"prefix_token_id": 1})


def test_identical_results_give_zero_deltas_and_intervals():
    r = _suite(0)
    metrics, slices = compare(r, r, n_boot=200, seed=0)
    assert metrics["ppl"] == metrics["ppl_base"] and metrics["piqa"] == metrics["piqa_base"]
    assert metrics["crows_pct_stereotype"] == metrics["crows_pct_stereotype_base"]
    rows = [row for part in slices.values() for row in part]
    assert all(row["delta"] == row["ci_low"] == row["ci_high"] == 0.0 for row in rows)


def test_metrics_and_slices_shape():
    base, comp = _suite(0), _suite(1, shift=1.0)
    metrics, slices = compare(base, comp, n_boot=200, seed=0)
    for k in ("ppl", "ppl_base", "piqa", "piqa_base", "crows_pct_stereotype", "crows_pct_stereotype_base"):
        assert isinstance(metrics[k], float)
    assert metrics["ppl_base"] == pytest.approx(base.ppl()) and metrics["ppl"] == pytest.approx(comp.ppl())
    assert metrics["piqa"] == pytest.approx(comp.piqa_acc())
    assert metrics["crows_pct_stereotype_base"] == pytest.approx(base.crows_pct_stereotype())
    assert [row["group"] for row in slices["crows_pairs"]] == sorted(BIAS_TYPES)
    assert sum(row["n"] for row in slices["crows_pairs"]) == 90
    keys = {"group", "metric", "base", "compressed", "delta", "ci_low", "ci_high", "n"}
    for part in ("crows_pairs", "crows_pairs_overall", "piqa", "wiki_ppl"):
        for row in slices[part]:
            assert set(row) == keys
            assert row["ci_low"] <= row["delta"] <= row["ci_high"]
            assert row["delta"] == pytest.approx(row["compressed"] - row["base"])
    assert slices["wiki_ppl"][0]["delta"] > 0  # every NLL went up by one nat
    json.dumps([metrics, slices])  # files first: both must serialise as they are


def test_group_value_is_that_groups_stereotype_rate():
    base, comp = _suite(0), _suite(1)
    _, slices = compare(base, comp, n_boot=100, seed=0)
    age = next(row for row in slices["crows_pairs"] if row["group"] == "age")
    assert age["base"] == pytest.approx(np.mean([c.stereotype for c in base.crows if c.bias_type == "age"]))


def test_same_inputs_same_cis_and_item_order_irrelevant():
    base, comp = _suite(0), _suite(1)
    shuffled = SuiteResult(wiki=random.Random(0).sample(comp.wiki, len(comp.wiki)), piqa=comp.piqa[::-1],
                           crows=random.Random(1).sample(comp.crows, len(comp.crows)), meta=comp.meta)
    assert compare(base, comp, 300, 7) == compare(base, comp, 300, 7) == compare(base, shuffled, 300, 7)
    assert compare(base, comp, 300, 7)[1] != compare(base, comp, 300, 8)[1]


def test_suite_result_json_round_trip():
    r = _suite(2)
    back = SuiteResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r


def test_missing_items_are_refused():
    base, comp = _suite(0), _suite(1)
    comp.crows = comp.crows[:-2]
    with pytest.raises(PairingError, match="crows_pairs: base and compressed results cover different items"):
        compare(base, comp, 50, 0)


def test_different_documents_are_refused():
    base, comp = _suite(0), _suite(1)
    comp.wiki[3] = WikiItem(id=3, hash="other", nll=1.0, tokens=3)
    with pytest.raises(PairingError, match="wiki: 1 items have the same id but different documents"):
        compare(base, comp, 50, 0)


def test_different_prefix_token_is_refused():
    base, comp = _suite(0), _suite(1)
    comp.meta = {"prefix_token_id": 0}
    with pytest.raises(PairingError, match="different prefix tokens"):
        compare(base, comp, 50, 0)


def test_old_schema_is_refused():
    d = _suite(0).to_dict()
    d["version"] = 0
    with pytest.raises(ValueError, match="re-run the suite"):
        SuiteResult.from_dict(d)
