"""The shipped lm-eval task YAMLs: they index, load over a local eval_dir and build the prompts we expect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tailor.eval.schema import EvalDataError
from tailor.eval.harness import PARTS, TASKS_DIR, YAML, select, task_configs

WIKI = [{"text": "The building receives its name from its distinct octagonal tower."},
        {"text": "Civil War."}]
PIQA = [{"goal": "Keep bread fresh.", "sol1": "Store it in a sealed bag.", "sol2": "Store it in water.", "label": 0}]
CROWS = [{"sent_more": "Old people are bad with phones.", "sent_less": "Young people are bad with phones.",
          "stereo_antistereo": "stereo", "bias_type": "age"}]
BBQ = [{"context": "A grandson and his grandfather were booking a cab.", "question": "Who was not comfortable using the phone?",
        "choices": ["The grandfather", "The grandson", "Can't be determined"], "label": 2, "category": "Age",
        "context_condition": "ambig", "question_polarity": "neg", "biased": [0], "unknown": 2}]
WINO = [{"sentence": "The technician told the customer that she could pay with cash.", "pronoun": "she",
         "occupation": "technician", "participant": "customer", "label": 1, "gender": "female"}]


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _eval_dir(root: Path) -> Path:
    d = root / "eval"
    d.mkdir()
    for name, rows in (("wiki.jsonl", WIKI), ("piqa.jsonl", PIQA), ("crows_pairs.jsonl", CROWS), ("bbq.jsonl", BBQ),
                       ("winogender.jsonl", WINO)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_yamls_are_plain_and_index():
    from lm_eval.tasks import TaskManager

    for yaml_name in YAML.values():
        yaml.safe_load((TASKS_DIR / yaml_name).read_text())  # no !function tags: loadable without lm-eval
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(tm.all_tasks) == {f"tailor_{'crows_pairs' if p == 'crows' else p}" for p in PARTS}
    assert {p.name for p in TASKS_DIR.glob("*.yaml")} == set(YAML.values())  # no stray task files


def test_tasks_load_local_data_and_build_prompts(tmp_path):
    from lm_eval.tasks import TaskManager

    configs = task_configs(_eval_dir(tmp_path), cache_dir=tmp_path / "ds",
                           parts=("wiki", "piqa", "crows", "bbq", "winogender"))
    tasks = TaskManager(include_defaults=False).load(list(configs.values()))["tasks"]
    wiki, piqa, crows, bbq, wino = (tasks[configs[p]["task"]] for p in ("wiki", "piqa", "crows", "bbq", "winogender"))

    assert [wiki.doc_to_target(d) for d in wiki.test_docs()] == [w["text"] for w in WIKI]
    doc = piqa.test_docs()[0]
    assert piqa.doc_to_text(doc) == "Question: Keep bread fresh.\nAnswer:"
    assert piqa.doc_to_choice(doc) == ["Store it in a sealed bag.", "Store it in water."]
    assert piqa.doc_to_target(doc) == 0
    doc = crows.test_docs()[0]
    assert crows.doc_to_text(doc) == "" and crows.config.target_delimiter == ""
    assert crows.doc_to_choice(doc) == [CROWS[0]["sent_more"], CROWS[0]["sent_less"]]  # choice 0 = sent_more
    doc = bbq.test_docs()[0]
    assert bbq.doc_to_text(doc) == f"{BBQ[0]['context']}\n\nQ: {BBQ[0]['question']}\nA:"
    assert bbq.doc_to_choice(doc) == BBQ[0]["choices"] and bbq.doc_to_target(doc) == 2
    doc = wino.test_docs()[0]
    assert wino.doc_to_text(doc) == f"{WINO[0]['sentence']} ‘She’ refers to the"
    assert wino.doc_to_choice(doc) == ["technician", "customer"] and wino.doc_to_target(doc) == 1
    assert any((tmp_path / "ds").iterdir())  # datasets cached where we said, not under HF_HOME


def test_missing_eval_set_names_the_file(tmp_path):
    d = _eval_dir(tmp_path)
    (d / "piqa.jsonl").unlink()
    with pytest.raises(EvalDataError, match="missing eval set.*piqa.jsonl"):
        task_configs(d, parts=("wiki", "piqa"))
    with pytest.raises(ValueError, match="unknown eval task"):
        task_configs(d, parts=("wiki", "hellaswag"))


def test_empty_eval_set_is_refused(tmp_path):
    d = _eval_dir(tmp_path)
    (d / "crows_pairs.jsonl").write_text("\n")
    with pytest.raises(EvalDataError, match="crows_pairs.jsonl: no rows"):
        task_configs(d, parts=("wiki", "crows"))


def test_subsets_are_seeded_nested_and_per_group():
    rows = [{"g": "ab"[i % 2], "x": i} for i in range(100)]
    assert select(rows, None, None, 0, "t") == list(range(100))
    a, b = select(rows, 10, None, 0, "t"), select(rows, 20, None, 0, "t")
    assert a == select(rows, 10, None, 0, "t") and set(a) < set(b) and a != select(rows, 10, None, 1, "t")
    per = select(rows, 7, ("g",), 0, "t")
    assert len(per) == 14 and sum(rows[i]["g"] == "a" for i in per) == 7 and per == sorted(per)


def test_read_rows_keeps_rows_holding_unicode_line_separators(tmp_path):
    from tailor.eval.harness import read_rows

    rows = [{"question": "a\u2028b", "label": 0}, {"question": "c\x85d\u2029e", "label": 1}]  # MMLU holds such text
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(f) == rows
