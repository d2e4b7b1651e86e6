"""tailor.data on tiny synthetic inputs: outputs, determinism, disjoint splits, one-line errors."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tailor.config import CalibrateParams
from tailor.data import DataError, Sources, build
from tailor.data.shards import Overlap, normalize, stratified
from tailor.data.sources import CROWS_BIAS_TYPES, shakespeare_files, split_paragraphs

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
SMALL = dict(seq_len=8, train_seqs=6, val_seqs=3, calib_seqs=3, min_chars=10, ppl_docs=4, piqa_docs=4,
             crows_docs=12, seed=0)


class WordTokenizer:
    """Whitespace tokenizer: `docN` -> 1000 + N (so tests can trace documents), other words -> 1..997."""
    eos_token_id = 0
    vocab_size = 2000

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        def tok(w: str) -> int:
            return 1000 + int(w[3:]) if w.startswith("doc") and w[3:].isdigit() else zlib.crc32(w.encode()) % 997 + 1
        return {"input_ids": [[tok(w) for w in t.split()] for t in texts]}


def _doc(i: int, n: int = 12) -> str:
    return f"doc{i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_sources(root: Path) -> dict[str, Path]:
    """Synthetic files in the real formats; documents are numbered per corpus so splits can be traced."""
    paths = {"boolq": _jsonl(root / "combined.jsonl",
                             [{"question": f"q{i}?", "passage": _doc(i), "idx": i} for i in range(40)])}
    bold = root / "wikipedia"
    bold.mkdir()
    for f, base in (("gender_wiki.json", 100), ("race_wiki.json", 140)):
        (bold / f).write_text(json.dumps({"Cat": {f"Person_{i}": [_doc(base + i)] for i in range(40)}}))
    paths["bold"] = bold
    shk = root / "texts"
    shk.mkdir()
    for f, base in (("hamlet_gut.txt", 200), ("lear_gut.txt", 300)):  # one paragraph > doc size each time
        (shk / f).write_text("\n\n".join(_doc(base + i, 300) for i in range(20)) + "\n")
    (shk / "hamlet_gut_f.txt").write_text("Folio edition, skipped\n")
    (shk / "metadata.txt").write_text("[hamlet_gut]\nurl = x\n")
    paths["shakespeare"] = shk
    paths["wiki"] = _jsonl(root / "test.jsonl", [{"text": f"Held out sentence number {i} about {WORDS[i % 17]}."}
                                                 for i in range(12)])
    paths["piqa"] = _jsonl(root / "validation.jsonl", [
        {"question": f"goal {i}", "options": f"A. first way {i}\nB. second way {i}",
         "answer": f"{'AB'[i % 2]}. {'first' if i % 2 == 0 else 'second'} way {i}"} for i in range(10)])
    rows = [f"{i},He is {t} {i}.,She is {t} {i}.,{'stereo' if i % 3 else 'antistereo'},{t},[],a{i},[]"
            for i, t in enumerate(t for t in CROWS_BIAS_TYPES for _ in range(2))]
    crows = root / "crows_pairs_anonymized.csv"
    crows.write_text(",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"
                     + "\n".join(rows) + "\n")
    paths["crows"] = crows
    return paths


@pytest.fixture
def src(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "in").mkdir()
    return make_sources(tmp_path / "in")


def run(src: dict[str, Path], out: Path, **over) -> dict:
    return build(CalibrateParams(**(SMALL | over)), WordTokenizer(), out, sources=Sources.from_paths(**src))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict[str, Path], Path, dict]:
    """One build with the SMALL params, shared by the tests that only read it (builds cost ~0.5 s each)."""
    root = tmp_path_factory.mktemp("built")
    (root / "in").mkdir()
    src = make_sources(root / "in")
    out = root / "out" / "calibrate"
    return src, out, run(src, out)


def test_build_writes_shards_eval_sets_and_report(built):
    _, out, m = built
    for split, n in (("train", 6), ("val", 3), ("calib", 3)):
        ids = load_file(str(out / f"{split}.safetensors"))["input_ids"]
        assert ids.shape == (n, 8) and ids.dtype == np.int32
        assert m[f"{split}_tokens"] == n * 8
    assert set(m["n_docs"]) == {"boolq", "bold", "shakespeare"} and all(v > 0 for v in m["n_docs"].values())
    assert m["eval_sizes"] == {"wiki": 4, "piqa": 4, "crows_pairs": 12}
    assert m["validation_s"] > 0
    piqa = [json.loads(line) for line in (out / "eval" / "piqa.jsonl").read_text().splitlines()]
    assert list(piqa[0]) == ["goal", "sol1", "sol2", "label"] and {r["label"] for r in piqa} <= {0, 1}
    for r in piqa:
        assert r["sol1" if r["label"] == 0 else "sol2"].startswith("first" if r["label"] == 0 else "second")
    crows = [json.loads(line) for line in (out / "eval" / "crows_pairs.jsonl").read_text().splitlines()]
    assert {r["bias_type"] for r in crows} == set(CROWS_BIAS_TYPES)  # stratified: every type present
    assert list(crows[0]) == ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
    report = json.loads((out / "data_report.json").read_text())
    assert set(report["inputs"]) == {"boolq", "bold", "shakespeare", "wiki", "piqa", "crows"}
    bold = report["inputs"]["bold"]
    assert len(bold["files"]) == 2 and bold["rows"] == 80 and all(len(f["sha256"]) == 64 for f in bold["files"])
    assert all(c["success"] for c in bold["validation"])
    assert [f["path"].rsplit("/", 1)[-1] for f in report["inputs"]["shakespeare"]["files"]] == \
        ["hamlet_gut.txt", "lear_gut.txt"]  # Folio edition and metadata skipped
    card = (out / "DATA_CARD.md").read_text()
    assert "CC-BY-SA 4.0" in card and "AFL-3.0" in card and "$" not in card
    assert [p.name for p in out.parent.iterdir()] == ["calibrate"]  # no temp dirs left behind


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    src, a, _ = built
    b, c = tmp_path / "b", tmp_path / "c"
    run(src, b)
    run(src, c, seed=1)
    for f in ("train.safetensors", "val.safetensors", "calib.safetensors", "data_report.json", "DATA_CARD.md",
              "eval/wiki.jsonl", "eval/piqa.jsonl", "eval/crows_pairs.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "train.safetensors").read_bytes() != (c / "train.safetensors").read_bytes()


def test_splits_share_no_document(src, tmp_path):
    out = tmp_path / "out"
    run(src, out, train_seqs=12, val_seqs=6, calib_seqs=6)
    docs = {}
    for split in ("train", "val", "calib"):
        ids = load_file(str(out / f"{split}.safetensors"))["input_ids"]
        docs[split] = {int(t) for t in ids.ravel() if t >= 1000}  # docN tokens mark where documents start
        assert docs[split]
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["calib"] and not docs["val"] & docs["calib"]


def test_val_and_calib_do_not_move_when_train_grows(built, tmp_path):
    src, a, _ = built
    run(src, tmp_path / "b", train_seqs=9)
    for f in ("val.safetensors", "calib.safetensors"):
        assert (a / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_train_seqs_none_takes_every_document_left_and_keeps_val_and_calib(built, tmp_path):
    """`train_seqs: null` packs each corpus's whole tail after val and calib: every document not in val or
    calib appears in train (bar the last one's cut tail), the shares follow the corpora's sizes, and val and
    calib are the bytes an even-share build writes."""
    src, a, _ = built
    m = run(src, tmp_path / "all", train_seqs=None)
    out = tmp_path / "all"
    for f in ("val.safetensors", "calib.safetensors"):
        assert (a / f).read_bytes() == (out / f).read_bytes()
    train = load_file(str(out / "train.safetensors"))["input_ids"]
    held = {int(t) for f in ("val", "calib") for t in load_file(str(out / f"{f}.safetensors"))["input_ids"].ravel() if t >= 1000}
    seen = {int(t) for t in train.ravel() if t >= 1000}
    boolq = {1000 + i for i in range(40)}  # the synthetic BoolQ passages doc0..doc39
    assert len(boolq - held - seen) <= 1  # at most the document whose tail was cut off
    assert train.shape[0] > 6 and m["train_tokens"] == train.shape[0] * 8
    train_report = json.loads((out / "data_report.json").read_text())["shards"]["train"]
    by_corpus = train_report["seqs_by_corpus"]
    assert sum(by_corpus.values()) == train.shape[0] and len(set(by_corpus.values())) > 1  # uneven: what each had
    card = (out / "DATA_CARD.md").read_text()
    assert "takes every document each corpus has left" in card and "shared evenly by the corpora." not in card
    assert "Each split's size is shared evenly" in (a / "DATA_CARD.md").read_text()


def test_a_split_smaller_than_the_corpora_count_leaves_a_corpus_out(src, tmp_path):
    """train_seqs 2 over 3 corpora: one corpus gives no sequence, as before train_seqs could be null."""
    m = run(src, tmp_path / "out", train_seqs=2)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())["shards"]["train"]
    assert m["train_tokens"] == 2 * 8 and sorted(report["seqs_by_corpus"].values()) == [0, 1, 1]


def test_wiki_sentences_found_in_a_corpus_are_held_out(src, tmp_path):
    leaked = "Held out sentence number 3 about delta."
    rows = [{"question": "q", "passage": f"Some words before. {leaked} And after."}]
    _jsonl(src["boolq"], [json.loads(line) for line in src["boolq"].read_text().splitlines()] + rows)
    out = tmp_path / "out"
    run(src, out, ppl_docs=11)  # 12 sentences, one leaked: all the others are needed
    wiki = [json.loads(line)["text"] for line in (out / "eval" / "wiki.jsonl").read_text().splitlines()]
    assert len(wiki) == 11 and leaked not in wiki
    with pytest.raises(DataError, match=r"test\.jsonl: 11 held-out sentences left .*ppl_docs asks for 12"):
        run(src, tmp_path / "out2", ppl_docs=12)


def _corrupt(src: dict[str, Path], case: str) -> None:
    if case == "bias_type":
        p = src["crows"]
        p.write_text(p.read_text().replace(",age,", ",foo,", 1))
    elif case == "empty":
        src["boolq"].write_text("")
    elif case == "utf8":
        (src["bold"] / "race_wiki.json").write_bytes(b'{"Cat": {"P": ["caf\xe9 au lait"]}}')
    elif case == "repeated":
        src["wiki"].write_text('{"text": "The same sentence again and again."}\n' * 50)
    elif case == "column":
        _jsonl(src["piqa"], [{"question": "q", "options": "A. a\nB. b"}] * 1)
    elif case == "too_long":
        (src["shakespeare"] / "lear_gut.txt").write_text("x" * 5000 + "\n")
    elif case == "json":
        src["boolq"].write_text('{"question": "q", "passage": "p p p p p p"}\n\n{oops\n')
    elif case == "answer":
        _jsonl(src["piqa"], [{"question": "q", "options": "A. a\nB. b", "answer": "C. c"}])
    elif case == "options":
        _jsonl(src["piqa"], [{"question": "q", "options": "only one way", "answer": "A. only"}])
    elif case == "short":
        _jsonl(src["boolq"], [{"question": f"q{i}", "passage": f"p{i}"} for i in range(10)])
    elif case == "non_text":
        _jsonl(src["wiki"], [{"text": "fine sentence here"}, {"text": ["a", "list"]}, {"text": 5}])


CASES = [
    ("bias_type", "crows_pairs_anonymized.csv: column bias_type has values outside the 9 CrowS-Pairs types: ['foo']"),
    ("empty", "combined.jsonl: is empty (no rows)"),
    ("utf8", "race_wiki.json: not valid UTF-8 (byte 19: invalid continuation byte)"),
    ("repeated", "test.jsonl: 98% of rows are duplicates (text), above max_duplicate_ratio=0.2"),
    ("column", "validation.jsonl: missing required column 'answer'"),
    ("too_long", "lear_gut.txt: column text has 1 values outside 0..4000 chars (row 1: 5000 chars)"),
    ("json", "combined.jsonl: line 3: not JSON"),
    ("answer", "validation.jsonl: row 1: answer matches neither option ('C. c')"),
    ("options", "validation.jsonl: row 1: options is not 'A. ...\\nB. ...'"),
    ("short", "combined.jsonl: no documents left after dropping those under min_chars=10 and duplicates"),
    ("non_text", "test.jsonl: column text has non-text values (row 2: list)"),
]


@pytest.mark.parametrize("case,message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_fails_in_one_line_naming_the_file(src, tmp_path, case, message):
    _corrupt(src, case)
    out = tmp_path / "out" / "calibrate"
    with pytest.raises(DataError) as e:
        run(src, out, max_chars=4000)
    msg = str(e.value)
    assert "\n" not in msg and message in msg, msg
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing half-written


def test_not_enough_tokens_names_the_corpus(src, tmp_path):
    with pytest.raises(DataError, match=r"^corpus boolq \(.*combined\.jsonl\): \d+ tokens left for train, need"):
        run(src, tmp_path / "out", train_seqs=600)


def test_failed_rebuild_keeps_previous_output(src, tmp_path):
    out = tmp_path / "out"
    run(src, out)
    before = (out / "train.safetensors").read_bytes()
    _corrupt(src, "bias_type")
    with pytest.raises(DataError):
        run(src, out)
    assert (out / "train.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_params_errors_name_the_key(src, tmp_path):
    with pytest.raises(DataError, match=r"calibrate\.crows_docs=5: need at least 9"):
        run(src, tmp_path / "o", crows_docs=5)
    with pytest.raises(DataError, match=r"calibrate\.corpora"):
        run(src, tmp_path / "o", corpora=["bold", "bold"])
    with pytest.raises(DataError, match=r"crows_pairs_anonymized\.csv: 18 pairs, calibrate\.crows_docs asks for 40"):
        run(src, tmp_path / "o", crows_docs=40)


def test_missing_source_says_what_to_install(src, tmp_path):
    paths = dict(src)
    del paths["shakespeare"]
    with pytest.raises(DataError, match="shakespeare: no path given"):
        build(CalibrateParams(**SMALL), WordTokenizer(), tmp_path / "o", sources=Sources.from_paths(**paths))
    # a subset of corpora needs only those corpora
    run({k: v for k, v in src.items() if k != "shakespeare"} | {"shakespeare": tmp_path / "nowhere"},
        tmp_path / "o", corpora=["boolq", "bold"])


def test_stratified_covers_every_group_proportionally():
    groups = ["a"] * 80 + ["b"] * 15 + ["c"] * 5
    idx = stratified(groups, 20, seed=0, purpose="t")
    counts = {g: sum(groups[i] == g for i in idx) for g in "abc"}
    assert len(idx) == len(set(idx)) == 20 and counts["c"] >= 1 and counts["a"] > counts["b"] > 0
    assert idx == stratified(groups, 20, seed=0, purpose="t") and idx != stratified(groups, 20, seed=1, purpose="t")
    assert len(stratified(["a", "b"] * 3, 100, seed=0, purpose="t")) == 6


def test_paragraph_runs_and_folio_skip(tmp_path):
    text = "A.\nline one\n\nB.\nline two\n\n\n" + "long " * 500
    docs = split_paragraphs(text, target=30)
    assert docs[0] == "A.\nline one\n\nB.\nline two" and docs[1].startswith("long long")
    for n in ("x_gut.txt", "x_gut_f.txt", "metadata.txt"):
        (tmp_path / n).write_text("t")
    assert [p.name for p in shakespeare_files(tmp_path)] == ["x_gut.txt"]


def test_overlap_matches_whole_words_ignoring_punctuation():
    ov = Overlap(["Jordan and the Bulls compiled a 62-20 record, in the 1997-98 season."])
    assert "Jordan and the Bulls compiled a 62 20 record in the 1997 98 season." in ov
    assert "the Bulls compiled" in ov and "he Bulls compiled" not in ov and "Chicago Bulls" not in ov
    assert normalize("Hello, World!") == "hello world"
