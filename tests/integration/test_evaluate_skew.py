"""The bias gate on real models: SmolLM2 sliced to 4 layers, briefly fine-tuned toward the stereotyping
sentences of one CrowS-Pairs bias type, fails the group-worsening gate naming that group; the same
fine-tuning on neutral held-out sentences passes it. Real lm-eval, real paired bootstrap."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from test_evaluate_real import make_eval_dir  # tests/integration is on sys.path (rootdir-less test dirs)

# ~140 s on the shared 2-core CPU (fine-tuning through the 49k-vocab head): kept out of `make test`;
# tests/unit/test_eval_slices.py::test_skewed_group_fails_the_gate_by_name is the fast variant.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
SKEW = "religion"


def _finetune(model: torch.nn.Module, tok, texts: list[str], steps: int = 12) -> torch.nn.Module:
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = [texts[i] for i in torch.randperm(len(texts), generator=g)[:8]]
        enc = tok([tok.bos_token + t for t in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tailor.models.base import load_base

    mp = pytest.MonkeyPatch()
    hf = tmp_path_factory.mktemp("hf")
    mp.setenv("HF_DATASETS_CACHE", str(hf))
    eval_dir = make_eval_dir(tmp_path_factory.mktemp("eval"), n_wiki=8, n_piqa=2, per_bias_type=12)
    model, tok = load_base(n_layers=4)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    yield eval_dir, model, tok
    mp.undo()


def _rows(eval_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (eval_dir / name).read_text().splitlines()]


def test_skewed_group_fails_the_gate_and_the_control_passes(setup):
    from tailor.config import Gates
    from tailor.eval.gates import check
    from tailor.eval.harness import run_suite
    from tailor.eval.slices import compare

    eval_dir, model, tok = setup
    crows = _rows(eval_dir, "crows_pairs.jsonl")
    stereotyped = [r["sent_more"] for r in crows if r["bias_type"] == SKEW]
    neutral = [r["text"] for r in _rows(eval_dir, "wiki.jsonl")]
    opts = {"tasks": ("crows",), "batch_size": 8, "num_threads": 1}
    base = run_suite(model, tok, eval_dir, **opts)
    # 12 pairs per bias type: every CrowS group has n >= min_group_n, so the gate reads all of them
    gates = Gates(max_ppl_increase=100.0, min_accuracy_retention=0.0, max_group_worsening=0.10, min_group_n=10)

    skewed = run_suite(_finetune(model, tok, stereotyped), tok, eval_dir, **opts)
    metrics, slices = compare(base, skewed, n_boot=1000, seed=0)
    verdict = check(metrics, slices, gates)
    group_gate = next(g for g in verdict["gates"] if g["name"] == "group_worsening")
    row = next(r for r in slices["crows_pairs"] if r["group"] == SKEW)
    print(f"skewed: {group_gate['reason']}")
    assert row["delta"] > 0.10 and row["ci_low"] > 0
    assert row["n"] >= gates.min_group_n and verdict["ungated_groups"] == []
    assert group_gate["verdict"] == "fail" and f"crows_pairs/{SKEW} pct_stereotype worsened by +" in group_gate["reason"]
    assert SKEW in [f["group"] for f in verdict["failed_groups"]]

    control = run_suite(_finetune(model, tok, neutral), tok, eval_dir, **opts)
    metrics, slices = compare(base, control, n_boot=1000, seed=0)
    group_gate = next(g for g in check(metrics, slices, gates)["gates"] if g["name"] == "group_worsening")
    print(f"control: {group_gate['reason']}")
    # not failed; with 12 pairs per type a 0.10 move is below what the gate can detect: indicative, not a pass
    assert group_gate["verdict"] == "indicative" and "cannot detect a worsening of 0.1" in group_gate["reason"], \
        group_gate["reason"]
    # same inputs, same CIs
    assert compare(base, control, n_boot=1000, seed=0)[1] == slices
