"""Latency calibration: the fit recovers a known bandwidth and per-layer overhead, and its error is
leave-one-out (a point is never predicted by a fit that saw it)."""
import pytest

from tailor.search.latency import calibrate, spread
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of
from tailor.models.tiny import tiny_model
from tailor.search.sampled import seeds


def _rows(noise=()):
    rows = []
    for k, (nb, layers) in enumerate([(4e7, 20), (6e7, 30), (8e7, 24), (1e8, 30), (1.2e8, 22), (1.5e8, 28),
                                      (2e8, 30), (2.4e8, 26)]):
        s = nb / 20e9 + layers * 150e-6 + 2e-3
        s *= 1 + (noise[k] if k < len(noise) else 0)
        rows.append({"weight_bytes": nb, "layers": layers, "measured_ms": s * 1e3})
    return rows


def test_fit_recovers_bandwidth_and_overhead():
    out = calibrate(_rows())
    assert out["host_bandwidth_gbs"] == pytest.approx(20, rel=1e-3)
    assert out["layer_overhead_us"] == pytest.approx(150, rel=1e-3)
    assert out["latency_mape"] < 1e-6 and out["n_configs"] == 8


def test_error_is_leave_one_out():
    rows = _rows(noise=[0, 0, 0, 0.3])  # one slow outlier: a fit that saw it would hide part of its error
    out = calibrate(rows)
    assert out["points"][3]["predicted_ms_loo"] < 0.85 * out["points"][3]["measured_ms"]
    assert out["latency_mape"] > 0.03


def test_spread_picks_distinct_configs_across_bytes():
    model = tiny_model(n_layers=4)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    pool = seeds(space)
    got = spread(space, "gguf", 8, pool)
    sizes = [c.nbytes(space.arch, "gguf") for c in got]
    assert len(got) == min(8, len(pool)) and len({c.hash for c in got}) == len(got)
    assert sizes == sorted(sizes) and sizes[0] == min(c.nbytes(space.arch, "gguf") for c in pool)
