"""Sampled search: every proposed candidate fits the budget exactly; an impossible budget is refused."""
import pytest
import torch

from tailor.arch import SubnetConfig
from tailor.config import DeviceProfile
from tailor.devices import budget_bytes
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of
from tailor.models.tiny import tiny_model
from tailor.search.sampled import Candidate, NoFeasibleSubnet, best_scored, pareto, propose, run_search, score


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
    # the chosen candidate's KL is what a fresh scoring of its config gives, and nothing scored lower
    again = Candidate(best.config, best.nbytes, best.bits_per_param, best.latency_s)
    score(model, again, dev.format, seqs, teacher_logits(tiny_model(n_layers=4), seqs), batch_size=8)
    assert again.kl == pytest.approx(best.kl, rel=1e-6) and not any(c.kl < best.kl for c in cands)
    front = pareto(cands)
    assert front and all(not _dominated(f, cands) for f in front)
    assert all(_dominated(c, front) for c in cands if c not in front)


def _dominated(c, others) -> bool:
    return any(o.nbytes <= c.nbytes and o.kl <= c.kl and (o.nbytes, o.kl) != (c.nbytes, c.kl) for o in others)


def _cand(nbytes: int, kl: float) -> Candidate:
    return Candidate(SubnetConfig.max(arch_of(tiny_model(n_layers=2))), nbytes, 1.0, 0.0, kl=kl)


def test_pareto_front_by_hand_and_nan_never_on_it_or_chosen():
    cands = [_cand(10, 5.0), _cand(20, 3.0), _cand(15, 4.0), _cand(25, 3.5), _cand(30, 1.0), _cand(12, float("nan")),
             _cand(15, 4.5), _cand(5, float("nan"))]
    assert [(c.nbytes, c.kl) for c in pareto(cands)] == [(10, 5.0), (15, 4.0), (20, 3.0), (30, 1.0)]
    assert best_scored([_cand(5, float("nan")), _cand(9, 2.0), _cand(8, 1.5)]).nbytes == 8  # min() kept the NaN
    with pytest.raises(NoFeasibleSubnet, match="non-finite KL"):
        best_scored([_cand(5, float("nan"))])


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


def test_score_batch_changes_the_forwards_not_the_scores():
    """search.score_batch: a candidate scored 2 or 8 sequences a forward (teacher chunked alike) gets the same KL
    and loss; the stage's Scorer scores with its own batch, never a fixed 8."""
    from steps.search import Scorer

    model, base = tiny_model(n_layers=4), tiny_model(n_layers=4, seed=3)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8], 0.25, 1, 0.25, None)
    dev = _device(fraction=0.35)
    seqs = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = propose(space, dev, 3, seed=0)[-1].config
    scores = {}
    for b in (2, 8):
        scorer = Scorer(model, space, dev, seqs, teacher_logits(base, seqs, b), None, batch_size=b)
        c = scorer(cfg, "test")
        scores[b] = (c.kl, c.val_loss)
    assert scores[2][0] == pytest.approx(scores[8][0], rel=1e-5) and scores[2][1] == pytest.approx(scores[8][1], rel=1e-5)
    assert scores[2][0] > 0
