"""Sampled search: every proposed candidate fits the budget exactly; an impossible budget is refused."""
import pytest
import torch

from tailor.config import DeviceProfile
from tailor.devices import budget_bytes
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of
from tailor.models.tiny import tiny_model
from tailor.search.sampled import NoFeasibleSubnet, pareto, propose, run_search


def _device(budget_bytes=None, fraction=None):
    return DeviceProfile(runtime="llama.cpp", format="gguf", budget_bytes=budget_bytes, budget_fraction=fraction,
                         bandwidth_gbs=50, compute_tflops=1, allowed_bits=[4, 8, 16], embed_bits=8)


def test_candidates_fit_the_budget_and_best_has_lowest_kl():
    model = tiny_model(n_layers=4)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    dev = _device(fraction=0.35)
    seqs = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    best, cands = run_search(model, space, dev, seqs, teacher_logits(tiny_model(n_layers=4), seqs), n=10, seed=0)
    budget = budget_bytes(dev, arch_of(model))
    assert len(cands) >= 5 and all(c.nbytes <= budget for c in cands)
    assert all(c.nbytes == c.config.nbytes(arch_of(model), "gguf") for c in cands)
    assert best.kl == min(c.kl for c in cands)
    front = pareto(cands)
    assert all(a.nbytes <= b.nbytes and a.kl > b.kl for a, b in zip(front, front[1:]))


def test_impossible_budget_is_refused_with_sizes():
    model = tiny_model(n_layers=4)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    with pytest.raises(NoFeasibleSubnet, match="below the smallest subnet"):
        propose(space, _device(budget_bytes=1000), 5, 0)


def test_repaired_candidates_fill_a_tight_budget():
    model = tiny_model(n_layers=4)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    dev = _device(fraction=0.27)
    cands = propose(space, dev, 12, seed=1)
    budget = budget_bytes(dev, arch_of(model))
    assert len(cands) >= 10 and all(c.nbytes <= budget for c in cands)
    assert all(space.contains(c.config) for c in cands)
    assert any(c.origin == "repaired" for c in cands)
