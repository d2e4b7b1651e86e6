"""Paired bootstrap: seeded, deterministic, paired, and its 95% CI covers the true delta."""
from __future__ import annotations

import numpy as np
import pytest

from tailor.eval.bootstrap import paired_bootstrap, rng_for


def _pair(n: int, p: float, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Base correctness ~ Bernoulli(p); the compressed model loses each correct item with prob `flip`."""
    g = np.random.default_rng(seed)
    base = (g.random(n) < p).astype(float)
    comp = base * (g.random(n) >= flip)
    return base, comp


def test_same_seed_same_ci_other_seed_other_ci():
    b, c = _pair(300, 0.7, 0.1, seed=1)
    a1 = paired_bootstrap(b, c, n_boot=500, rng=np.random.default_rng(0))
    a2 = paired_bootstrap(b, c, n_boot=500, rng=np.random.default_rng(0))
    a3 = paired_bootstrap(b, c, n_boot=500, rng=np.random.default_rng(1))
    assert a1 == a2
    assert (a1.ci_low, a1.ci_high) != (a3.ci_low, a3.ci_high)


def test_rng_for_depends_on_seed_and_name_only():
    assert rng_for(3, "crows/age").random() == rng_for(3, "crows/age").random()
    assert rng_for(3, "crows/age").random() != rng_for(3, "crows/gender").random()
    assert rng_for(3, "crows/age").random() != rng_for(4, "crows/age").random()


def test_identical_models_give_zero_interval():
    b, _ = _pair(200, 0.6, 0.0, seed=2)
    ci = paired_bootstrap(b, b.copy(), n_boot=300, rng=np.random.default_rng(0))
    assert (ci.delta, ci.ci_low, ci.ci_high) == (0.0, 0.0, 0.0)


def test_pairing_cancels_item_difficulty():
    # Every item's score moves by exactly +0.1: a paired bootstrap sees no uncertainty at all,
    # whereas resampling the two models independently would give a wide interval.
    b = np.random.default_rng(3).random(100)
    ci = paired_bootstrap(b, b + 0.1, n_boot=300, rng=np.random.default_rng(0))
    assert ci.ci_low == pytest.approx(0.1) and ci.ci_high == pytest.approx(0.1)


def test_ci_contains_true_delta_at_about_95_percent():
    # True delta = -p * flip = -0.07; count how often the 95% interval covers it.
    true, hits, reps = -0.7 * 0.1, 0, 100
    for r in range(reps):
        b, c = _pair(400, 0.7, 0.1, seed=100 + r)
        ci = paired_bootstrap(b, c, n_boot=400, rng=np.random.default_rng(r))
        assert ci.ci_low <= ci.delta <= ci.ci_high
        hits += ci.ci_low <= true <= ci.ci_high
    assert 0.85 <= hits / reps <= 1.0


def test_perplexity_is_token_weighted_and_exponentiated():
    nll_b, nll_c = np.array([10.0, 40.0]), np.array([12.0, 44.0])
    tokens = np.array([5.0, 20.0])
    ci = paired_bootstrap(nll_b, nll_c, tokens, n_boot=200, rng=np.random.default_rng(0), transform=np.exp)
    assert ci.base == pytest.approx(np.exp(50 / 25)) and ci.compressed == pytest.approx(np.exp(56 / 25))
    assert ci.ci_low <= ci.delta <= ci.ci_high


@pytest.mark.parametrize("b, c", [([], []), ([1.0, 0.0], [1.0])])
def test_rejects_empty_or_unpaired(b, c):
    with pytest.raises(ValueError, match="paired bootstrap"):
        paired_bootstrap(np.array(b), np.array(c), n_boot=10, rng=np.random.default_rng(0))


def test_any_statistic_bootstrap_equals_the_ratio_one_on_a_mean():
    """paired_bootstrap_stat (BBQ bias score, ICAT) on a plain mean draws the same resamples as
    paired_bootstrap: same interval, same se (a width of zero would mean no resampling at all)."""
    from tailor.eval.bootstrap import paired_bootstrap_stat

    b, c = _pair(300, 0.7, 0.1, seed=3)
    ratio = paired_bootstrap(b, c, n_boot=400, rng=np.random.default_rng(7))
    stat = paired_bootstrap_stat(lambda a: a["x"].mean(-1), {"x": b}, {"x": c}, n_boot=400,
                                 rng=np.random.default_rng(7))
    assert (stat.ci_low, stat.ci_high, stat.n) == pytest.approx((ratio.ci_low, ratio.ci_high, ratio.n))
    assert stat.se == pytest.approx(ratio.se) and stat.ci_high - stat.ci_low > 0.02
    with pytest.raises(ValueError, match="equal-length non-empty"):
        paired_bootstrap_stat(lambda a: a["x"].mean(-1), {"x": b}, {"x": c[:-1]}, n_boot=10, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_boot must be positive, got 0"):
        paired_bootstrap_stat(lambda a: a["x"].mean(-1), {"x": b}, {"x": c}, n_boot=0, rng=np.random.default_rng(0))


def test_macro_bootstrap_weighs_tasks_equally_and_resamples_within_each():
    from tailor.eval.bootstrap import paired_bootstrap_macro

    big_b, big_c = _pair(900, 0.6, 0.0, seed=4)  # no change on the big task
    small_b, small_c = _pair(30, 0.9, 0.5, seed=5)  # a large drop on the small one
    ci = paired_bootstrap_macro([big_b, small_b], [big_c, small_c], n_boot=500, rng=np.random.default_rng(0))
    assert ci.delta == pytest.approx(((big_c.mean() - big_b.mean()) + (small_c.mean() - small_b.mean())) / 2)
    assert ci.n == 930 and ci.ci_low < ci.delta < ci.ci_high and ci.ci_high < 0
    one = paired_bootstrap(small_b, small_c, n_boot=500, rng=np.random.default_rng(1))
    assert ci.se == pytest.approx(one.se / 2, rel=0.25)  # the big task adds nothing: it did not change
    with pytest.raises(ValueError, match="same non-empty list of parts"):
        paired_bootstrap_macro([big_b], [big_c, small_c], n_boot=10, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="a part has 30 base and 29 compressed items"):
        paired_bootstrap_macro([small_b], [small_c[:-1]], n_boot=10, rng=np.random.default_rng(0))


def test_stat_bootstrap_gathers_only_what_the_statistic_reads_and_equals_gathering_all():
    """The BBQ bias score reads 2 of its 3 arrays: the unread one is never gathered ((n_boot, n) floats each), and
    the interval is the one an eager gather of every array gives, to the bit."""
    from tailor.eval.bias import bbq_s_dis
    from tailor.eval.bootstrap import _ci, paired_bootstrap_stat

    rng = np.random.default_rng(3)
    b = {k: rng.integers(0, 2, 500).astype(float) for k in ("correct", "biased", "non_unknown")}
    c = {k: rng.integers(0, 2, 500).astype(float) for k in ("correct", "biased", "non_unknown")}
    got = paired_bootstrap_stat(bbq_s_dis, b, c, n_boot=300, rng=np.random.default_rng(9))
    idx = np.random.default_rng(9).integers(0, 500, size=(300, 500))
    diff = bbq_s_dis({k: v[idx] for k, v in c.items()}) - bbq_s_dis({k: v[idx] for k, v in b.items()})
    assert got == _ci(float(bbq_s_dis(b)), float(bbq_s_dis(c)), diff, 500, 0.05)

    # memory says which arrays were gathered: the resample indices and two gathers, not three
    import tracemalloc

    n, n_boot = 20_000, 200
    gather = n * n_boot * 8  # bytes of one (n_boot, n) float64 gather, as of the int64 indices
    b = {k: rng.integers(0, 2, n).astype(float) for k in ("correct", "biased", "non_unknown")}
    tracemalloc.start()
    paired_bootstrap_stat(bbq_s_dis, b, b, n_boot=n_boot, rng=np.random.default_rng(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 3 * gather <= peak < 3.6 * gather, peak / gather
