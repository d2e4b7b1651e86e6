"""Search strategies on a tiny supernet: the sensitivity table is what it claims to be, the MIP is
optimal for the table and respects the budget exactly, NSGA-II and Gumbel are deterministic and
feasible, and re-targeting a budget reuses the cached table."""
import itertools

import pytest
import torch

from tailor.arch import MATRICES, LayerConfig, SubnetConfig
from tailor.config import DeviceProfile
from tailor.devices import budget_bytes, cost
from tailor.distill import mean_kl, teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.search import gumbel, mip, nsga, sensitivity

SEQS = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(n_layers=3)
    teacher = teacher_logits(tiny_model(n_layers=3), SEQS)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.34, None)
    table = sensitivity.measure(model, space, "gguf", 8, SEQS, teacher)
    return model, teacher, space, table


def _device(frac):
    return DeviceProfile(runtime="llama.cpp", format="gguf", budget_fraction=frac, bandwidth_gbs=50,
                         compute_tflops=1, allowed_bits=[4, 8, 16], embed_bits=8)


def test_table_entries_are_single_change_kl_deltas(setup):
    model, teacher, space, table = setup
    ref = table.reference
    set_active(model, ref, "gguf")
    assert table.base_kl == pytest.approx(mean_kl(model, SEQS, teacher), rel=1e-4)
    cfg = ref.with_layer(1, bits={**ref.layers[1].bits, "up": 4})
    set_active(model, cfg, "gguf")
    assert table.bits["1:up:4"] == pytest.approx(mean_kl(model, SEQS, teacher) - table.base_kl, rel=1e-3, abs=1e-6)
    assert table.predict(cfg) == pytest.approx(mean_kl(model, SEQS, teacher), rel=1e-3, abs=1e-6)
    n_layers = space.arch.n_layers
    assert len(table.bits) == n_layers * len(MATRICES) * 2 and len(table.drop) == len(space.droppable)


def test_mip_is_optimal_for_the_table_and_fits_exactly(setup):
    _, _, space, table = setup
    arch = space.arch
    budget = budget_bytes(_device(0.45), arch)
    cfg = mip.solve(table, space, "gguf", 8, budget)
    assert cfg is not None and cfg.nbytes(arch, "gguf") <= budget and space.contains(cfg)
    # brute force over uniform-per-layer bit choices (a subset of the MIP's space): none beats it
    for bits in itertools.product([4, 8, 16], repeat=arch.n_layers):
        cand = SubnetConfig(tuple(LayerConfig(True, arch.n_kv_heads, arch.ffn, {m: b for m in MATRICES}) for b in bits),
                            embed_bits=8)
        if cand.nbytes(arch, "gguf") <= budget:
            assert table.predict(cfg) <= table.predict(cand) + 1e-9
    assert mip.solve(table, space, "gguf", 8, 1000) is None  # nothing fits


def test_nsga_is_seeded_feasible_and_deterministic(setup):
    model, teacher, space, table = setup
    dev = _device(0.45)
    budget = budget_bytes(dev, space.arch)
    seeds = mip.solutions(table, space, "gguf", 8, budget)

    def run_once():
        seen = []

        def evaluate(cfg):
            c = cost(cfg, space.arch, dev)
            set_active(model, cfg, "gguf")
            kl = mean_kl(model, SEQS, teacher)
            if c.fits:
                seen.append((cfg.hash, kl))
            return kl, c.nbytes, c.latency_s

        nsga.run(space, 8, evaluate, budget, 10, seed=3, seeds=seeds)
        return seen

    a, b = run_once(), run_once()
    assert a == b and len(a) >= len(seeds)
    assert a[0][0] == seeds[0].hash  # the MIP's solutions go first


def test_gumbel_returns_a_valid_subnet_deterministically(setup):
    model, teacher, space, _ = setup
    budget = budget_bytes(_device(0.45), space.arch)
    r1 = gumbel.search(model, space, "gguf", 8, budget, SEQS, teacher, steps=4, seed=0)
    r2 = gumbel.search(model, space, "gguf", 8, budget, SEQS, teacher, steps=4, seed=0)
    assert r1.config == r2.config and r1.losses == r2.losses
    assert space.contains(r1.config)
    # the supernet is left as it was: plain QLinear methods, no hooks
    assert all(not blk._forward_hooks for blk in model.model.layers)
    assert "active_weight" not in vars(model.model.layers[0].self_attn.q_proj)


def test_cached_table_is_reused_for_another_budget(setup, tmp_path):
    model, teacher, space, table = setup
    key = sensitivity.cache_key("w", "gguf", space, 8, SEQS)
    t1, cached1 = sensitivity.load_or_measure(tmp_path, key, model, space, "gguf", 8, SEQS, teacher)
    t2, cached2 = sensitivity.load_or_measure(tmp_path, key, model, space, "gguf", 8, SEQS, teacher)
    assert (cached1, cached2) == (False, True) and t1.to_dict() == t2.to_dict()
    arch = space.arch
    a = mip.solve(t2, space, "gguf", 8, budget_bytes(_device(0.4), arch))
    b = mip.solve(t2, space, "gguf", 8, budget_bytes(_device(0.6), arch))
    assert a.nbytes(arch, "gguf") <= b.nbytes(arch, "gguf")
