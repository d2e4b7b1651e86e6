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
