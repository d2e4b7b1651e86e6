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


# ---- per-type decode cost (issue 22: K-quant kernels cost more per weight than Q4_0's on a CPU) ----------
from tailor.arch import SubnetConfig  # noqa: E402
from tailor.config import DeviceProfile  # noqa: E402
from tailor.devices import cost  # noqa: E402
from tailor.search.latency import probes, type_cost_s, type_weights  # noqa: E402

# seconds per weight, as if measured: Q4_K and IQ4_NL store as many bytes per weight as Q4_0 (4.5 bits)
# but decode slower; F16 streams 3.6x the bytes of Q4_0 yet costs under 3x
TRUE_NS = {"Q4_0": 0.05, "Q4_K": 0.11, "IQ4_NL": 0.09, "Q8_0": 0.07, "F16": 0.14}
TYPES = ["Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "F16"]


def _k_space():
    # every width a whole number of 256s, so every matrix may take a K-quant
    model = tiny_model(n_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=768)
    arch = arch_of(model)
    choices = [4, "Q4_K", "IQ4_NL", 8, 16]
    return SearchSpace.build(arch, choices, [8], 0.34, 1, 0.5, None)


def _typed_rows(space, cfgs, overhead_s=120e-6, fixed_s=1.5e-3):
    rows = []
    for c in cfgs:
        tw = type_weights(c, space.arch, "gguf")
        s = sum(n * TRUE_NS[t] * 1e-9 for t, n in tw.items()) + len(c.kept) * overhead_s + fixed_s
        rows.append({"config_hash": c.hash, "weight_bytes": c.nbytes(space.arch, "gguf"), "layers": len(c.kept),
                     "measured_ms": s * 1e3, "type_weights": tw})
    return rows


def test_type_weights_count_every_matrix_and_the_head():
    space = _k_space()
    a = space.arch
    cfg = SubnetConfig.uniform(a, "Q4_K", embed_bits=8).with_layer(0, keep=False)
    tw = type_weights(cfg, a, "gguf")
    per_layer = sum(r * c for r, c in (a.matrix_shape(m, a.n_kv_heads, a.ffn) for m in ("q", "k", "v", "o", "gate", "up", "down")))
    assert tw == {"Q4_K": 3 * per_layer, "Q8_0": a.vocab * a.hidden}


def test_probes_are_one_full_structure_subnet_per_choice():
    space = _k_space()
    got = probes(space)
    a = space.arch
    assert len(got) == len(space.bits)
    assert {frozenset(type_weights(c, a, "gguf")) - {"Q8_0"} for c in got} >= {frozenset({t}) for t in TYPES if t != "Q8_0"}
    assert all(len(c.kept) == a.n_layers and all(lc.ffn == a.ffn and lc.kv_groups == a.n_kv_heads for lc in c.layers)
               for c in got)


def test_per_type_fit_recovers_each_types_cost():
    space = _k_space()
    cfgs = spread(space, "gguf", 8, seeds(space)) + probes(space)
    rows = _typed_rows(space, list({c.hash: c for c in cfgs}.values()))
    out = calibrate(rows, per_type=True)
    assert set(out["type_cost_ns"]) == set(TYPES)
    for t in TYPES:
        assert out["type_cost_ns"][t] == pytest.approx(TRUE_NS[t], rel=1e-3), t
    assert out["layer_overhead_us"] == pytest.approx(120, rel=1e-2) and out["host_bandwidth_gbs"] is None
    # the bytes model cannot tell Q4_K from Q4_0 (same bytes): it mispredicts these points, leave-one-out
    # included; the per-type model's leave-one-out error is what leaving out a type's only probe costs
    bytes_mape = calibrate([{k: v for k, v in r.items() if k != "predicted_ms_loo"} for r in rows])["latency_mape"]
    assert bytes_mape > 0.02 and out["latency_mape"] < bytes_mape / 2
    # without per_type the same points keep the bytes model (profiles of bit-widths are unchanged)
    assert "type_cost_ns" not in calibrate([dict(r) for r in rows])


def test_per_type_fit_needs_more_points_than_unknowns():
    space = _k_space()
    rows = _typed_rows(space, probes(space)[:3])
    out = calibrate(rows, per_type=True)
    assert "type_cost_ns" not in out and type_cost_s(out) is None


def test_cost_prices_types_not_bytes():
    space = _k_space()
    a = space.arch
    dev = DeviceProfile(runtime="llama.cpp", format="gguf", budget_fraction=0.5, bandwidth_gbs=50, compute_tflops=1,
                        allowed_types=["Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "F16"], embed_bits=8)
    q4_0, q4_k = SubnetConfig.uniform(a, 4, embed_bits=8), SubnetConfig.uniform(a, "Q4_K", embed_bits=8)
    assert q4_0.nbytes(a, "gguf") == q4_k.nbytes(a, "gguf")  # 4.5 bits per weight each
    assert cost(q4_0, a, dev).latency_s == cost(q4_k, a, dev).latency_s  # bytes / bandwidth: a tie
    table = type_cost_s({"type_cost_ns": TRUE_NS})
    fast, slow = cost(q4_0, a, dev, 100e-6, table), cost(q4_k, a, dev, 100e-6, table)
    n_mat = sum(n for t, n in type_weights(q4_k, a, "gguf").items() if t == "Q4_K")
    assert slow.latency_s - fast.latency_s == pytest.approx(n_mat * (TRUE_NS["Q4_K"] - TRUE_NS["Q4_0"]) * 1e-9)
    with pytest.raises(ValueError, match=r"no cost for \['Q4_K'\]"):
        cost(q4_k, a, dev, None, {t: c for t, c in table.items() if t != "Q4_K"})
