"""Inputs people hit in the field, each through the entry point they used: one line naming the input and
the problem, exit 2, nothing written. A tiny random model (word-level tokenizer) stands in for real ones:
what is refused here is refused before any model scores anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from reliability_harness import ROOT, make_project, one_line_error, outputs, run_stage

pytestmark = pytest.mark.integration

WIKI = ["the old man walked to the market", "a quiet town by the river had one bridge"]
CROWS = [("the old man is bad with phones and never learns how to use them", "stereo", "age"),  # 14 words
         ("the young man is bad with phones and never learns how to use them", "stereo", "age")]
PIQA = [{"goal": "the old man walked", "sol1": "to the market", "sol2": "by the river", "label": 0},
        {"goal": "a quiet town", "sol1": "had one bridge", "sol2": "is bad with phones", "label": 1}]


@pytest.fixture
def hf_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_model_dir(d: Path) -> Path:
    """A tiny random Tailor model with a word-level tokenizer over the test sentences (bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tailor.models.tiny import tiny_model

    words = sorted({w for t in WIKI + [c[0] for c in CROWS] for w in t.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tiny_model(n_layers=2).save_pretrained(d, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(d)
    return d


def eval_dir(d: Path, sent_less: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "wiki.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in WIKI))
    rows = [{"sent_more": a, "sent_less": b, "stereo_antistereo": s, "bias_type": g}
            for (a, s, g), (b, _, _) in zip(CROWS, CROWS[1:] + CROWS[:1])]
    if sent_less is not None:
        rows[1]["sent_less"] = sent_less
    (d / "crows_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA))
    return d


def params_file(d: Path, **evaluate) -> Path:
    """params.yaml running held-out perplexity, PIQA and CrowS only, with `evaluate` values in every profile."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"] |= {"tasks": ["piqa", "crows"], "bootstrap": 200} | evaluate
    for prof in raw["profiles"].values():
        for k in ("tasks", "max_length", "bootstrap"):
            (prof or {}).get("evaluate", {}).pop(k, None)
    p = d / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _cli(*args: str):
    from tailor.cli import app

    return CliRunner().invoke(app, list(args))


def _one_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    # progress bars (datasets, lm-eval) may precede it, as on a terminal; the error is one line
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("tailor")]
    assert len(lines) == 1 and "Traceback" not in result.output and "Error" not in result.output, result.output
    return lines[0]


def test_evaluate_cli_refuses_an_empty_crows_sentence(tmp_path, hf_tmp):
    """Row 1 of the field report: lm-eval raised IndexError from inside HFLM.loglikelihood."""
    m = tiny_model_dir(tmp_path / "m")
    d = eval_dir(tmp_path / "eval", sent_less="")
    out = tmp_path / "out"
    line = _one_line(_cli("evaluate", "--model", str(m), "--base", str(m), "--eval-dir", str(d),
                          "--params", str(params_file(tmp_path)), "--out", str(out)))
    assert line == f"tailor: {d / 'crows_pairs.jsonl'}: row 2: sent_less: empty text", line
    assert not out.exists()


def test_evaluate_cli_refuses_a_window_too_small_for_an_item(tmp_path, hf_tmp):
    """Row 2: evaluate.max_length 12 against 14-token CrowS sentences was a bare AssertionError."""
    m = tiny_model_dir(tmp_path / "m")
    d = eval_dir(tmp_path / "eval")
    out = tmp_path / "out"
    line = _one_line(_cli("evaluate", "--model", str(m), "--base", str(m), "--eval-dir", str(d),
                          "--params", str(params_file(tmp_path, max_length=12)), "--out", str(out)))
    assert line == (f"tailor: {d / 'crows_pairs.jsonl'}: row 1: crows choice 0 is 14 tokens, more than the context "
                    "window of 12 (evaluate.max_length): it cannot be scored; raise evaluate.max_length"), line
    assert not out.exists()


def test_evaluate_cli_scores_the_same_set_with_room_and_reports_verdicts(tmp_path, hf_tmp):
    """The control: the same model and sets with a 16-token window run through lm-eval to gates.json."""
    m = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "out"
    r = _cli("evaluate", "--model", str(m), "--base", str(m), "--eval-dir", str(eval_dir(tmp_path / "eval")),
             "--params", str(params_file(tmp_path, max_length=16)), "--out", str(out))
    assert r.exit_code in (0, 1), r.output
    gates = json.loads((out / "gates.json").read_text())
    # a model against itself: no change in perplexity or accuracy (the intervals are [0, 0]), but a CrowS
    # group of 2 pairs is too small to gate: indicative, not a pass
    assert {g["name"]: g["verdict"] for g in gates["gates"]} == {
        "ppl_increase": "pass", "accuracy_retention": "pass", "group_worsening": "indicative"}
    assert gates["verdict"] == "indicative" and not gates["passed"] and r.exit_code == 1


@pytest.fixture
def proj(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


def test_evaluate_stage_refuses_a_bad_eval_row_before_any_model(proj):
    """Row 1 through the stage: the eval directory is validated whoever wrote it."""
    eval_dir(proj / "artifacts" / "calibrate" / "eval", sent_less="   ")
    params_file(proj)
    line = one_line_error(run_stage(proj, "evaluate", "phone"))
    assert line == "tailor evaluate@phone: artifacts/calibrate/eval/crows_pairs.jsonl: row 2: sent_less: empty text", line
    assert outputs(proj, "evaluate", "phone") == []


def test_a_params_key_written_twice_is_refused_by_every_stage(proj):
    """Row 5: PyYAML took the last value, DVC refused the file."""
    text = (proj / "params.yaml").read_text()
    head, tail = text.split("\n  phone:\n", 1)
    (proj / "dup.yaml").write_text(head + "\n  phone:\n    budget_fraction: 0.9\n" + tail)
    first = (head + "\n  phone:\n").count("\n") + 1
    second = next(i for i, ln in enumerate((proj / "dup.yaml").read_text().splitlines(), 1)
                  if i > first and "budget_fraction" in ln)
    for stage, device in (("calibrate", None), ("search", "phone")):
        line = one_line_error(run_stage(proj, stage, device, params="dup.yaml"))
        assert line == (f"tailor {stage}{'@' + device if device else ''}: dup.yaml: devices.phone.budget_fraction: "
                        f"key written twice (lines {first} and {second})"), line
        assert outputs(proj, stage, device) == []
    assert not (proj / "mlflow.db").exists()  # refused before any tracking
