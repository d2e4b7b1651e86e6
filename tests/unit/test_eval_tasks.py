"""The shipped lm-eval task YAMLs: they index, load over a local eval_dir and build the prompts we expect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tailor.eval.harness import TASK_FILES, TASKS_DIR, task_configs

WIKI = [{"text": "The building receives its name from its distinct octagonal tower."},
        {"text": "Civil War."}]
PIQA = [{"goal": "Keep bread fresh.", "sol1": "Store it in a sealed bag.", "sol2": "Store it in water.", "label": 0}]
CROWS = [{"sent_more": "Old people are bad with phones.", "sent_less": "Young people are bad with phones.",
          "stereo_antistereo": "stereo", "bias_type": "age"}]


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _eval_dir(root: Path) -> Path:
    d = root / "eval"
    d.mkdir()
    for name, rows in (("wiki.jsonl", WIKI), ("piqa.jsonl", PIQA), ("crows_pairs.jsonl", CROWS)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_yamls_are_plain_and_index():
    from lm_eval.tasks import TaskManager

    for yaml_name, _ in TASK_FILES.values():
        yaml.safe_load((TASKS_DIR / yaml_name).read_text())  # no !function tags: loadable without lm-eval
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(tm.all_tasks) == {"tailor_wiki", "tailor_piqa", "tailor_crows_pairs"}


def test_tasks_load_local_data_and_build_prompts(tmp_path):
    from lm_eval.tasks import TaskManager

    configs = task_configs(_eval_dir(tmp_path), cache_dir=tmp_path / "ds")
    tasks = TaskManager(include_defaults=False).load(list(configs.values()))["tasks"]
    wiki, piqa, crows = (tasks[configs[p]["task"]] for p in ("wiki", "piqa", "crows"))

    assert [wiki.doc_to_target(d) for d in wiki.test_docs()] == [w["text"] for w in WIKI]
    doc = piqa.test_docs()[0]
    assert piqa.doc_to_text(doc) == "Question: Keep bread fresh.\nAnswer:"
    assert piqa.doc_to_choice(doc) == ["Store it in a sealed bag.", "Store it in water."]
    assert piqa.doc_to_target(doc) == 0
    doc = crows.test_docs()[0]
    assert crows.doc_to_text(doc) == "" and crows.config.target_delimiter == ""
    assert crows.doc_to_choice(doc) == [CROWS[0]["sent_more"], CROWS[0]["sent_less"]]  # choice 0 = sent_more
    assert any((tmp_path / "ds").iterdir())  # datasets cached where we said, not under HF_HOME


def test_missing_eval_set_names_the_file(tmp_path):
    d = _eval_dir(tmp_path)
    (d / "piqa.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="piqa.jsonl"):
        task_configs(d)


def test_empty_eval_set_is_refused(tmp_path):
    d = _eval_dir(tmp_path)
    (d / "crows_pairs.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty eval set.*crows_pairs.jsonl"):
        task_configs(d)
