"""The calibrate stage's library: validate the pinned inputs, tokenize, split, describe.

`build(params, tokenizer, out_dir)` writes into a temp dir beside `out_dir` and renames it when
complete, so an error leaves nothing half-written:

    out_dir/train.safetensors, val.safetensors, calib.safetensors   {"input_ids": int32 [N, seq_len]}
    out_dir/eval/wiki.jsonl {"text"}   eval/piqa.jsonl {"goal","sol1","sol2","label"}
    out_dir/eval/crows_pairs.jsonl {"sent_more","sent_less","stereo_antistereo","bias_type"}
    out_dir/eval/{boolq,openbookqa,commonsense_qa,siqa,mmlu,bbq,stereoset,winogender}.jsonl
        whole sets in source order (tailor/data/evalsets.py); evaluate picks per-profile subsets
    out_dir/data_report.json   per input: path, package, sha256, rows, rows kept, validation results
    out_dir/DATA_CARD.md       datasets, licenses, versions, what each is used for

data_report.json holds no timings or absolute paths, so the same inputs give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from tailor.data import evalsets
from tailor.data.shards import (SPLITS, Overlap, Tokenizer, merge_split, pack_corpus, pick, pick_held_out,
                                share, stratified, write_shard)
from tailor.data.sources import (CROWS_BIAS_TYPES, META, DataError, Raw, Sources, parse_piqa, read_bold,
                                 read_csv, read_jsonl, read_shakespeare)
from tailor.data.validate import Labels, Rules, Validator
from tailor.hashing import sha256_file

if TYPE_CHECKING:
    from tailor.config import CalibrateParams

__all__ = ["DataError", "Sources", "build"]

TEXT_COLUMN = {"boolq": "passage", "bold": "text", "shakespeare": "text"}


def rules_for(name: str, p: CalibrateParams) -> Rules:
    """The expectation suite of each input, in terms of its own columns."""
    lim = dict(max_chars=p.max_chars, max_duplicate_ratio=p.max_duplicate_ratio)
    if name == "boolq":  # one passage serves several questions: a duplicate is a repeated (question, passage)
        return Rules(("question", "passage"), ("question", "passage"), ("question", "passage"), **lim)
    if name in ("bold", "shakespeare", "wiki"):
        return Rules(("text",), ("text",), ("text",), **lim)
    if name == "piqa":
        cols = ("question", "options", "answer")
        return Rules(cols, cols, ("question", "options"), min_len=1, **lim)
    if name == "crows":
        cols = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
        return Rules(cols, cols, ("sent_more", "sent_less"), min_len=1, **lim, labels=(
            Labels("bias_type", CROWS_BIAS_TYPES, f"the {len(CROWS_BIAS_TYPES)} CrowS-Pairs types"),
            Labels("stereo_antistereo", ("stereo", "antistereo"), "{stereo, antistereo}")))
    mc = {"boolq_dev": ("question", "passage", "answer"), "openbookqa": ("question", "options", "answer"),
          "commonsense_qa": ("question", "options", "answer"), "siqa": ("passage", "question", "options", "answer"),
          "mmlu": ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")}
    if name in mc:
        text = tuple(c for c in mc[name] if c != "correct_answer")
        return Rules(mc[name], text, tuple(c for c in mc[name] if c not in ("answer", "correct_answer", "topic")),
                     min_len=1, **lim)
    if name == "bbq":
        cols = ("context", "question", "category", "context_condition", "question_polarity")
        return Rules(cols, ("context", "question"), ("context", "question", "choices"), min_len=1, **lim, labels=(
            Labels("category", evalsets.BBQ_CATEGORIES, f"the {len(evalsets.BBQ_CATEGORIES)} BBQ categories"),
            Labels("context_condition", ("ambig", "disambig"), "{ambig, disambig}")))
    if name == "stereoset":
        cols = ("bias_type", "target", "stereotype", "anti_stereotype", "unrelated")
        return Rules(cols, cols, ("target", "stereotype"), min_len=1, **lim, labels=(
            Labels("bias_type", evalsets.STEREOSET_TYPES, "the 4 StereoSet bias types"),))
    if name == "winogender":
        cols = ("sentence", "pronoun", "occupation", "participant", "gender")
        return Rules(cols, cols, ("sentence",), min_len=1, **lim, labels=(
            Labels("gender", evalsets.WINOGENDER_GENDERS, "{female, male, neutral}"),))
    raise KeyError(name)


def read(name: str, sources: Sources) -> Raw:
    if name == "bold":
        return read_bold(sources.bold)
    if name == "shakespeare":
        return read_shakespeare(sources.shakespeare)
    if name == "crows":
        return read_csv(name, sources.crows)
    if name == "bbq":
        return evalsets.read_bbq(sources.bbq)
    if name == "stereoset":
        return evalsets.read_stereoset(sources.stereoset)
    if name == "winogender":
        return evalsets.read_winogender(sources.winogender)
    return read_jsonl(name, getattr(sources, name))


def keep_texts(raw: Raw, column: str, min_chars: int) -> tuple[list[str], dict[str, int]]:
    """Drop texts shorter than min_chars, then exact duplicates (first occurrence kept)."""
    texts = [str(t).strip() for t in raw.frame[column]]
    long_enough = [t for t in texts if len(t) >= min_chars]
    kept = list(dict.fromkeys(long_enough))
    return kept, {"short": len(texts) - len(long_enough), "duplicate": len(long_enough) - len(kept)}


def build(params: CalibrateParams, tokenizer: Tokenizer, out_dir: Path, sources: Sources | None = None) -> dict:
    """Validate, tokenize and split; write shards, eval sets, data report and card. Returns metrics."""
    p = params
    corpora = list(p.corpora)
    if not corpora or len(set(corpora)) != len(corpora):
        raise DataError(f"calibrate.corpora must list distinct corpora, got {corpora}")
    if p.crows_docs < len(CROWS_BIAS_TYPES):
        raise DataError(f"calibrate.crows_docs={p.crows_docs}: need at least {len(CROWS_BIAS_TYPES)} "
                        "(one pair per CrowS-Pairs bias type)")
    sources = sources or Sources.default()
    validator = Validator()
    report: dict[str, Any] = {"params": p.model_dump(), "inputs": {}}

    docs: dict[str, list[str]] = {}
    for name in corpora:
        raw = read(name, sources)
        checks = validator.check(raw, rules_for(name, p))
        docs[name], dropped = keep_texts(raw, TEXT_COLUMN[name], p.min_chars)
        if not docs[name]:
            raise DataError(f"{raw.source.show()}: no documents left after dropping those under "
                            f"min_chars={p.min_chars} and duplicates")
        report["inputs"][name] = _entry(raw, checks, len(docs[name]), dropped)

    # every input is read and validated before any tokenizing, so a bad file fails fast
    evals, eval_report = _eval_sets(p, sources, validator, Overlap([d for n in corpora for d in docs[n]]), report)

    sizes = {s: getattr(p, f"{s}_seqs") for s in SPLITS}  # only train_seqs may be None: every document left
    quotas = {s: [None] * len(corpora) if n is None else share(n, len(corpora)) for s, n in sizes.items()}
    parts: dict[str, list] = {s: [] for s in SPLITS}
    used: dict[str, dict[str, int]] = {}
    for i, name in enumerate(corpora):
        arrs, used[name] = pack_corpus(name, docs[name], tokenizer, {s: quotas[s][i] for s in SPLITS},
                                       p.seq_len, p.seed, report["inputs"][name]["path"])
        for s in SPLITS:
            parts[s].append(arrs[s])
    shards = {s: merge_split(parts[s], p.seed, s, p.seq_len) for s in SPLITS}

    with _staged(Path(out_dir)) as tmp:
        meta = {"seq_len": str(p.seq_len), "seed": str(p.seed), "corpora": ",".join(corpora)}
        report["shards"] = {}
        for s in ("train", "val", "calib"):
            write_shard(tmp / f"{s}.safetensors", shards[s], {**meta, "split": s})
            os.chmod(tmp / f"{s}.safetensors", 0o644)  # safetensors writes 0600
            report["shards"][s] = {"seqs": int(shards[s].shape[0]), "tokens": int(shards[s].size),
                                   "docs": {n: used[n][s] for n in corpora},
                                   "seqs_by_corpus": {n: int(parts[s][i].shape[0]) for i, n in enumerate(corpora)},
                                   "sha256": sha256_file(tmp / f"{s}.safetensors")}
        (tmp / "eval").mkdir()
        for fname, rows in evals.items():
            _write_jsonl(tmp / "eval" / f"{fname}.jsonl", rows)
            eval_report[fname]["sha256"] = sha256_file(tmp / "eval" / f"{fname}.jsonl")
        report["eval"] = eval_report
        report["tokenizer"] = {"class": type(tokenizer).__name__, "eos_token_id": tokenizer.eos_token_id,
                               "vocab_size": getattr(tokenizer, "vocab_size", None)}
        (tmp / "data_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "DATA_CARD.md").write_text(render_card(report))

    return {f"{s}_tokens": report["shards"][s]["tokens"] for s in ("train", "val", "calib")} | {
        "n_docs": {n: sum(used[n].values()) for n in corpora},
        "eval_sizes": {k: len(v) for k, v in evals.items()},
        "validation_s": round(validator.seconds, 3),
    }


def _eval_sets(p: CalibrateParams, sources: Sources, validator: Validator, overlap: Overlap,
               report: dict[str, Any]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Seeded subsets of wiki (held out from the corpora), PIQA and CrowS-Pairs (stratified by bias type)."""
    out: dict[str, list[dict]] = {}
    info: dict[str, dict] = {}

    raw = read("wiki", sources)
    checks = validator.check(raw, rules_for("wiki", p))
    texts, dropped = keep_texts(raw, "text", p.min_chars)
    idx, checked, dropped["overlap"] = pick_held_out(texts, p.ppl_docs, p.seed, overlap)
    report["inputs"]["wiki"] = _entry(raw, checks, len(texts) - dropped["overlap"], dropped)
    if len(idx) < p.ppl_docs:
        raise DataError(f"{raw.source.show()}: {len(idx)} held-out sentences left after min_chars, duplicates "
                        f"and overlap with the corpora; calibrate.ppl_docs asks for {p.ppl_docs}")
    out["wiki"] = [{"text": texts[i]} for i in idx]
    info["wiki"] = {"rows": len(idx), "checked_for_overlap": checked}

    raw = read("piqa", sources)
    checks = validator.check(raw, rules_for("piqa", p))
    piqa = parse_piqa(raw)
    report["inputs"]["piqa"] = _entry(raw, checks, len(piqa), {})
    if len(piqa) < p.piqa_docs:
        raise DataError(f"{raw.source.show()}: {len(piqa)} rows, calibrate.piqa_docs asks for {p.piqa_docs}")
    out["piqa"] = [{"goal": r.goal, "sol1": r.sol1, "sol2": r.sol2, "label": int(r.label)}
                   for r in piqa.iloc[pick(len(piqa), p.piqa_docs, p.seed, "eval:piqa")].itertuples()]
    info["piqa"] = {"rows": len(out["piqa"])}

    raw = read("crows", sources)
    checks = validator.check(raw, rules_for("crows", p))
    df = raw.frame
    report["inputs"]["crows"] = _entry(raw, checks, len(df), {})
    if len(df) < p.crows_docs:
        raise DataError(f"{raw.source.show()}: {len(df)} pairs, calibrate.crows_docs asks for {p.crows_docs}")
    rows = df.iloc[stratified(list(df["bias_type"]), p.crows_docs, p.seed, "eval:crows")]
    cols = ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]
    out["crows_pairs"] = [dict(zip(cols, r, strict=True)) for r in rows[cols].itertuples(index=False)]
    info["crows_pairs"] = {"rows": len(rows), "per_bias_type": rows["bias_type"].value_counts().sort_index().to_dict()}

    for name in evalsets.EXTRA_SETS:  # whole sets: evaluate subsets them per profile
        src_name = "boolq_dev" if name == "boolq" else name
        if getattr(sources, src_name).skip:
            continue
        raw = read(src_name, sources)
        checks = validator.check(raw, rules_for(src_name, p))
        out[name] = evalsets.rows_of(name, raw)
        report["inputs"][src_name] = _entry(raw, checks, len(out[name]), {})
        info[name] = {"rows": len(out[name])} | ({"per_group": g} if (g := evalsets.group_counts(name, out[name])) else {})
    return out, info


def _entry(raw: Raw, checks: list[dict], kept: int, dropped: dict[str, int]) -> dict[str, Any]:
    m = META[raw.name]
    files = [{"path": raw.source.show(f), "sha256": sha256_file(f)} for f in raw.files]
    digest = files[0]["sha256"] if len(files) == 1 else hashlib.sha256(
        "".join(f"{f['sha256']}  {Path(f['path']).name}\n" for f in files).encode()).hexdigest()
    return {"title": m.title, "role": m.role, "use": m.use, "license": m.license,
            "license_source": m.license_source, "path": raw.source.show(), "package": raw.source.package,
            "sha256": digest, "files": files, "rows": int(len(raw.frame)), "rows_kept": int(kept),
            "dropped": dropped, "validation": checks}


def render_card(report: dict[str, Any]) -> str:
    """DATA_CARD.md from the template beside this file and the data report."""
    inputs = report["inputs"]
    table = "\n".join(
        f"| {n} | {e['title']} | {e['role']} | {e['package'] or 'local file'} | `{e['path']}` | "
        f"{e['license']} | {e['rows']} | {e['rows_kept']} | `{e['sha256'][:12]}` | {e['use']} |"
        for n, e in inputs.items())
    sources = "\n".join(f"- **{n}**: {e['license']} ({e['license_source']})" for n, e in inputs.items())
    shards = "\n".join(f"| {s} | {v['seqs']} | {v['tokens']} | "
                       f"{', '.join(f'{n} {d}' for n, d in v['docs'].items())} | "
                       f"{', '.join(f'{n} {k}' for n, k in (v.get('seqs_by_corpus') or {}).items()) or '-'} | "
                       f"`{v['sha256'][:12]}` |"
                       for s, v in report["shards"].items())
    evals = "\n".join(f"| {k} | {v['rows']} | `{v['sha256'][:12]}` |" for k, v in report["eval"].items())
    p = report["params"]
    tmpl = Template((Path(__file__).with_name("DATA_CARD.md")).read_text())
    shares = ("Val and calib are shared evenly by the corpora; train (calibrate.train_seqs: null) takes every "
              "document each corpus has left after them, so its shares follow the corpora's sizes."
              if report["params"].get("train_seqs", 0) is None else "Each split's size is shared evenly by the corpora.")
    return tmpl.substitute(inputs=table, licenses=sources, shards=shards, evals=evals, shares=shares,
                           seq_len=p["seq_len"], seed=p["seed"], min_chars=p["min_chars"],
                           max_chars=p["max_chars"], max_duplicate_ratio=p["max_duplicate_ratio"],
                           corpora=", ".join(p["corpora"]))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A temp dir beside `final`; renamed over it when the block succeeds, removed when it fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed output should not be
    old = final.with_name(f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        yield tmp
        if final.exists():  # move the previous output aside first, so `final` is never half old, half new
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
