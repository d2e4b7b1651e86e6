"""Every eval set the harness reads is checked row by row before a model runs: one line naming the file,
the row and the field, for every set and every text field alike (not only CrowS' sent_less)."""
from __future__ import annotations

import json

import pytest

from tailor.eval.schema import SCHEMAS, EvalDataError, check_dir, check_file
from tailor.eval.harness import PARTS

GOOD = {
    "wiki": {"text": "The building receives its name from its tower."},
    "piqa": {"goal": "Keep bread fresh.", "sol1": "Seal it.", "sol2": "Soak it.", "label": 0},
    "boolq": {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "label": 1},
    "openbookqa": {"question": "The sun is a", "choices": ["star", "planet", "moon", "comet"], "label": 0},
    "commonsense_qa": {"question": "Where is a fork?", "choices": ["drawer", "sky", "sea", "sun", "moon"], "label": 0},
    "siqa": {"context": "Ann gave Bo a gift.", "question": "How does Bo feel?", "choices": ["glad", "sad", "cold"],
             "label": 0},
    "mmlu": {"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "label": 1, "subject": "math"},
    "crows": {"sent_more": "Old people are bad with phones.", "sent_less": "Young people are bad with phones.",
              "stereo_antistereo": "stereo", "bias_type": "age"},
    "bbq": {"context": "A grandson and his grandfather booked a cab.", "question": "Who was not comfortable?",
            "choices": ["The grandfather", "The grandson", "Unknown"], "label": 2, "category": "Age",
            "context_condition": "ambig", "question_polarity": "neg", "biased": [0], "unknown": 2},
    "stereoset": {"bias_type": "gender", "target": "mother", "stereotype": "She is caring.",
                  "anti_stereotype": "She is cold.", "unrelated": "Fish swim."},
    "winogender": {"sentence": "The technician told the customer that she could pay.", "pronoun": "she",
                   "occupation": "technician", "participant": "customer", "label": 1, "gender": "female"},
}
TEXT_FIELDS = [(part, k) for part, row in GOOD.items() for k, v in row.items() if isinstance(v, str)
               and k not in ("stereo_antistereo", "bias_type", "category", "context_condition", "question_polarity",
                             "gender")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_part_has_a_schema_and_the_good_rows_pass(tmp_path):
    assert set(SCHEMAS) == set(PARTS) == set(GOOD)
    files = {p: PARTS[p][0] for p in PARTS}
    for p, f in files.items():
        _write(tmp_path / f, [GOOD[p], GOOD[p]])
    assert check_dir(tmp_path, files) == {p: 2 for p in PARTS}


@pytest.mark.parametrize("part, key", TEXT_FIELDS)
@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_text_is_named_by_file_row_and_field(tmp_path, part, key, blank):
    f = _write(tmp_path / PARTS[part][0], [GOOD[part], GOOD[part] | {key: blank}])
    with pytest.raises(EvalDataError) as e:
        check_file(f, part)
    assert str(e.value) == f"{f}: row 2: {key}: empty text"


@pytest.mark.parametrize("part, row, expected", [
    ("crows", GOOD["crows"] | {"bias_type": "martians"}, "row 1: bias_type: Input should be"),
    ("crows", {k: v for k, v in GOOD["crows"].items() if k != "sent_less"}, "row 1: sent_less: missing"),
    ("piqa", GOOD["piqa"] | {"label": 2}, "row 1: label: Input should be 0 or 1"),
    ("piqa", GOOD["piqa"] | {"label": "0"}, "row 1: label: Input should be 0 or 1"),
    ("mmlu", GOOD["mmlu"] | {"choices": ["a", "b", "c"]}, "row 1: choices: List should have at least 4 items"),
    ("siqa", GOOD["siqa"] | {"choices": ["glad", "", "cold"]}, "row 1: choices.1: empty text"),
    ("bbq", GOOD["bbq"] | {"biased": [2]}, "row 1: (row): Value error, answer 2 is both the unknown and a biased"),
])
def test_other_problems_are_named(tmp_path, part, row, expected):
    f = _write(tmp_path / PARTS[part][0], [row])
    with pytest.raises(EvalDataError, match=None) as e:
        check_file(f, part)
    assert str(e.value).startswith(f"{f}: {expected}"), str(e.value)


def test_not_json_empty_and_missing(tmp_path):
    f = tmp_path / "wiki.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(EvalDataError, match=r"wiki.jsonl: row 2: not JSON"):
        check_file(f, "wiki")
    f.write_text("\n\n")
    with pytest.raises(EvalDataError, match=r"wiki.jsonl: no rows"):
        check_file(f, "wiki")
    with pytest.raises(EvalDataError, match=r"missing eval set\(s\) piqa.jsonl"):
        check_dir(tmp_path, {"piqa": "piqa.jsonl"})
