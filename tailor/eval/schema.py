"""The row schema of every eval set the harness reads, checked before any model runs.

The calibrate stage writes these files from validated inputs, but `tailor evaluate --eval-dir D` takes a
directory anyone may have written, and lm-eval fails deep inside on what it cannot score (an empty
CrowS sentence is an IndexError in HFLM.loglikelihood). Each file is checked whole here, row by row,
with pydantic models of the fields its task YAML (tasks/tailor_<name>.yaml) reads; the first problem
is one line naming the file, the row (1-based line) and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from tailor.data.evalsets import BBQ_CATEGORIES, STEREOSET_TYPES, WINOGENDER_GENDERS
from tailor.data.sources import CROWS_BIAS_TYPES


class EvalDataError(ValueError):
    """An eval set the harness cannot score; the message is one line naming file, row and field."""


# a text lm-eval scores: whitespace alone tokenizes to nothing on some tokenizers, like the empty string
Text = Annotated[str, StringConstraints(pattern=r"\S")]
Label2 = Literal[0, 1]


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extra columns are carried, not read


def _choices(n: int) -> Any:
    return Annotated[list[Text], Field(min_length=n, max_length=n)]


class Wiki(_Row):
    text: Text


class Piqa(_Row):
    goal: Text
    sol1: Text
    sol2: Text
    label: Label2


class BoolQ(_Row):
    passage: Text
    question: Text
    label: Label2


class OpenBookQA(_Row):
    question: Text
    choices: _choices(4)
    label: Literal[0, 1, 2, 3]


class CommonsenseQA(_Row):
    question: Text
    choices: _choices(5)
    label: Literal[0, 1, 2, 3, 4]


class SIQA(_Row):
    context: Text
    question: Text
    choices: _choices(3)
    label: Literal[0, 1, 2]


class MMLU(_Row):
    question: Text
    choices: _choices(4)
    label: Literal[0, 1, 2, 3]
    subject: Text


class Crows(_Row):
    sent_more: Text
    sent_less: Text
    stereo_antistereo: Literal["stereo", "antistereo"]
    bias_type: Literal[CROWS_BIAS_TYPES]  # type: ignore[valid-type]


class BBQ(_Row):
    context: Text
    question: Text
    choices: _choices(3)
    label: Literal[0, 1, 2]
    category: Literal[BBQ_CATEGORIES]  # type: ignore[valid-type]
    context_condition: Literal["ambig", "disambig"]
    question_polarity: Literal["neg", "nonneg"]
    biased: list[Literal[0, 1, 2]]
    unknown: Literal[0, 1, 2] | None

    @model_validator(mode="after")
    def _answers_apart(self) -> "BBQ":
        if self.unknown is not None and self.unknown in self.biased:
            raise ValueError(f"answer {self.unknown} is both the unknown and a biased answer")
        return self


class StereoSet(_Row):
    bias_type: Literal[STEREOSET_TYPES]  # type: ignore[valid-type]
    target: Text
    stereotype: Text
    anti_stereotype: Text
    unrelated: Text


class Winogender(_Row):
    sentence: Text
    pronoun: Text
    occupation: Text
    participant: Text
    label: Label2
    gender: Literal[WINOGENDER_GENDERS]  # type: ignore[valid-type]


SCHEMAS: dict[str, type[_Row]] = {
    "wiki": Wiki, "piqa": Piqa, "boolq": BoolQ, "openbookqa": OpenBookQA, "commonsense_qa": CommonsenseQA,
    "siqa": SIQA, "mmlu": MMLU, "crows": Crows, "bbq": BBQ, "stereoset": StereoSet, "winogender": Winogender,
}


def _problem(e: ValidationError) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(row)"
    if err["type"] == "string_pattern_mismatch":
        msg = "empty text"
    elif err["type"] == "missing":
        msg = "missing"
    else:
        msg = err["msg"] + (f" (got {err['input']!r:.60})" if "input" in err and not isinstance(err["input"], dict) else "")
    return f"{field}: {msg}"


def check_file(path: Path, part: str) -> int:
    """Validate every row of one eval set; the number of rows, or EvalDataError on the first bad one."""
    schema = SCHEMAS[part]
    n = 0
    # split on "\n" only, as harness.read_rows does (U+2028 may sit inside a JSON string)
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: row {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}: row {i}: not a JSON object")
        try:
            schema.model_validate(row)
        except ValidationError as e:
            raise EvalDataError(f"{path}: row {i}: {_problem(e)}") from None
        n += 1
    if n == 0:
        raise EvalDataError(f"{path}: no rows")
    return n


def check_dir(eval_dir: Path, files: dict[str, str]) -> dict[str, int]:
    """Validate the eval sets `files` (part -> file name) in eval_dir: part -> rows, or EvalDataError."""
    missing = [f for f in files.values() if not (Path(eval_dir) / f).is_file()]
    if missing:
        raise EvalDataError(f"{eval_dir}: missing eval set(s) {', '.join(missing)} (written by the calibrate stage)")
    return {part: check_file(Path(eval_dir) / f, part) for part, f in files.items()}
