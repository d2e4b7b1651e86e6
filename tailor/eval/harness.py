"""Run the evaluation suite through lm-eval and keep per-item records.

lm-eval gives us its prompt formats and request batching; we keep its per-sample log (log_samples)
rather than its aggregates, because the bias slices and the paired bootstrap CIs need every item.
The task YAMLs in tasks/ are plain lm-eval configs over local json files; at run time the profile's
seeded subset of each eval set (written whole by the calibrate stage) goes to a temp dir, the
YAMLs' data_files are pointed there and handed to lm-eval as inline configs, so nothing is written
next to the package and no built-in task index is scanned. Items keep their line index in the
full file as id, so results over different subsets pair only where they share documents.

Perplexity here is lm-eval's loglikelihood_rolling: every token of a text is predicted, the first
one from the tokenizer's BOS token (HFLM.prefix_token_id). tailor.eval.ppl.perplexity instead starts
from the text's own first token and predicts the rest, so it is lower (the first token given BOS is
the hardest prediction). Both are token-level corpus perplexities exp(sum NLL / sum tokens); base and
compressed models are always scored with this one definition, and WikiItem.tokens counts exactly the
predicted tokens. Measured on SmolLM2-135M, 200 held-out wiki sentences: 296.9 here (BOS is
<|im_start|>), 241.3 from tailor.eval.ppl.perplexity; seq_nll([BOS] + tokens) matches this to 1e-7.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tailor.eval.bootstrap import rng_for
from tailor.eval.schema import EvalDataError, check_dir

TASKS_DIR = Path(__file__).parent / "tasks"
# part -> (data file the calibrate stage writes in eval_dir, doc fields kept on each item for slicing,
#          columns a per-group limit stratifies by; None = a plain seeded subset)
PARTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]] = {
    "wiki": ("wiki.jsonl", (), None),
    "piqa": ("piqa.jsonl", (), None),
    "boolq": ("boolq.jsonl", (), None),
    "openbookqa": ("openbookqa.jsonl", (), None),
    "commonsense_qa": ("commonsense_qa.jsonl", (), None),
    "siqa": ("siqa.jsonl", (), None),
    "mmlu": ("mmlu.jsonl", ("subject",), None),
    "crows": ("crows_pairs.jsonl", ("bias_type", "stereo_antistereo"), ("bias_type",)),
    "bbq": ("bbq.jsonl", ("category", "context_condition", "question_polarity", "biased", "unknown"),
            ("category", "context_condition")),
    "stereoset": ("stereoset.jsonl", ("bias_type",), ("bias_type",)),
    "winogender": ("winogender.jsonl", ("gender",), ("gender",)),
}
ACCURACY_TASKS = ("piqa", "boolq", "openbookqa", "commonsense_qa", "siqa", "mmlu")
BIAS_TASKS = ("crows", "bbq", "stereoset", "winogender")
YAML = {p: f"tailor_{'crows_pairs' if p == 'crows' else p}.yaml" for p in PARTS}
SCHEMA_VERSION = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WikiItem:
    id: int  # line index in wiki.jsonl
    hash: str  # of the document, so results over different files are never paired
    nll: float  # -sum log p(token) over all tokens of the text
    tokens: int  # predicted tokens


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: the log-likelihood of every choice, as lm-eval scored it."""
    id: int  # line index in the eval set file (stable whatever subset a profile picks)
    hash: str
    ll: tuple[float, ...]  # log-likelihood of each choice's continuation
    nbytes: tuple[int, ...]  # UTF-8 bytes of each continuation (length-normalised comparisons)
    label: int  # gold choice (CrowS-Pairs / StereoSet: 0 = the stereotyping sentence)
    acc: float  # lm-eval's: argmax ll == label
    acc_norm: float
    fields: dict[str, Any] = field(default_factory=dict, compare=True)  # PARTS' doc fields, for slicing

    @property
    def pred(self) -> int:
        return int(np.argmax(self.ll))


@dataclass
class SuiteResult:
    wiki: list[WikiItem]
    tasks: dict[str, list[ChoiceItem]]
    meta: dict[str, Any] = field(default_factory=dict)

    def ppl(self) -> float:
        return float(np.exp(sum(w.nll for w in self.wiki) / sum(w.tokens for w in self.wiki)))

    def acc(self, task: str, norm: bool = False) -> float:
        return float(np.mean([p.acc_norm if norm else p.acc for p in self.tasks[task]]))

    def piqa_acc(self, norm: bool = False) -> float:
        return self.acc("piqa", norm)

    def crows_pct_stereotype(self) -> float:
        return float(np.mean([c.ll[0] > c.ll[1] for c in self.tasks["crows"]]))

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "meta": self.meta, "wiki": [asdict(w) for w in self.wiki],
                "tasks": {t: [asdict(x) for x in items] for t, items in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        if d.get("version") != SCHEMA_VERSION:
            raise ValueError(f"suite result version {d.get('version')!r}, expected {SCHEMA_VERSION}: re-run the suite")
        tasks = {t: [ChoiceItem(**{**x, "ll": tuple(x["ll"]), "nbytes": tuple(x["nbytes"])}) for x in items]
                 for t, items in d["tasks"].items()}
        return cls(wiki=[WikiItem(**w) for w in d["wiki"]], tasks=tasks, meta=dict(d.get("meta", {})))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> "SuiteResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def read_rows(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines() also breaks at U+2028/U+0085, which json.dumps(ensure_ascii=False)
    # leaves raw inside strings (two MMLU questions hold one), and would cut those rows in half
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def select(rows: list[dict], limit: int | None, groups: tuple[str, ...] | None, seed: int, name: str) -> list[int]:
    """Row indices (file order) of a seeded subset: `limit` rows, or `limit` per group for grouped sets.

    The order depends only on (seed, name), so a bigger limit keeps every row a smaller one picked."""
    if limit is None or limit >= len(rows) and not groups:
        return list(range(len(rows)))
    order = list(range(len(rows)))
    rng_for(seed, f"subset:{name}").shuffle(order)
    if not groups:
        return sorted(order[:limit])
    taken: dict[tuple, int] = {}
    keep = []
    for i in order:
        g = tuple(str(rows[i][c]) for c in groups)
        if taken.get(g, 0) < limit:
            taken[g] = taken.get(g, 0) + 1
            keep.append(i)
    return sorted(keep)


def task_configs(eval_dir: Path, cache_dir: Path | None = None, parts: tuple[str, ...] = tuple(PARTS),
                 data_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Suite part -> inline lm-eval task config, its data file pointed into data_dir (default eval_dir)."""
    eval_dir = Path(eval_dir).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else eval_dir
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown} (known: {', '.join(PARTS)})")
    validate_eval_dir(eval_dir, parts)  # lm-eval would fail much later, deep inside, on a bad row
    out = {}
    for part in parts:
        cfg = yaml.safe_load((TASKS_DIR / YAML[part]).read_text())
        kwargs = {**cfg.get("dataset_kwargs", {}), "data_files": {"test": str(data_dir / PARTS[part][0])}}
        if cache_dir is not None:  # datasets' arrow cache, else it lands in ~/.cache/huggingface
            kwargs["cache_dir"] = str(cache_dir)
        out[part] = {**cfg, "dataset_kwargs": kwargs}
    return out


def suite_parts(eval_dir: Path, tasks: tuple[str, ...] | None) -> tuple[str, ...]:
    """wiki plus `tasks` (default: every part whose file exists in eval_dir), as run_suite runs them."""
    if tasks is None:
        tasks = tuple(p for p in PARTS if p != "wiki" and (Path(eval_dir) / PARTS[p][0]).is_file())
    return ("wiki",) + tuple(t for t in tasks if t != "wiki")


def validate_eval_dir(eval_dir: Path, parts: tuple[str, ...]) -> dict[str, int]:
    """Every row of the eval sets `parts` read, checked against its task's schema (tailor.eval.schema):
    part -> rows, or EvalDataError naming file, row and field. Cheap: callers run it before loading models."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown} (known: {', '.join(PARTS)})")
    return check_dir(Path(eval_dir), {p: PARTS[p][0] for p in parts})


def _doc_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class NonFiniteScore(ValueError):
    """The model scored an item NaN/inf: every comparison built on it would be silently false."""


def _ll(resp: Any, where: str = "") -> float:
    """A multiple-choice response is (loglik, is_greedy); a rolling one a bare float. NaN is refused
    (`nan > x` is False: a CrowS pair would count as not stereotyped, an answer as wrong)."""
    v = float(resp[0] if isinstance(resp, (tuple, list)) else resp)
    if v != v or v == float("inf"):
        raise NonFiniteScore(f"{where}: the model's log-likelihood is {v}; its outputs are not finite")
    return v


def _wiki_items(samples: list[dict], lm: Any, ids: list[int]) -> list[WikiItem]:
    items = []
    for s in samples:
        (text,) = s["arguments"][0]  # the exact string lm-eval scored
        items.append(WikiItem(id=ids[int(s["doc_id"])], hash=_doc_hash(s["doc"]),
                              nll=-_ll(s["filtered_resps"][0], f"wiki row {ids[int(s['doc_id'])] + 1}"),
                              tokens=len(lm.tok_encode(text))))
    return items


def _choice_items(samples: list[dict], keep: tuple[str, ...], ids: list[int], part: str = "") -> list[ChoiceItem]:
    # CrowS-Pairs: sent_more is the stereotyping sentence in both directions (for "antistereo" pairs the
    # disadvantaged group sits in sent_less, violating the stereotype); like lm-eval we count "sent_more
    # preferred" for every pair and keep stereo_antistereo only for slicing.
    items = []
    for s in sorted(samples, key=lambda s: int(s["doc_id"])):
        doc = s["doc"]
        items.append(ChoiceItem(
            id=ids[int(s["doc_id"])], hash=_doc_hash(doc),
            ll=tuple(_ll(r, f"{part} row {ids[int(s['doc_id'])] + 1}") for r in s["filtered_resps"]),
            nbytes=tuple(len(a[1].encode()) for a in s["arguments"]), label=int(s["target"]),
            acc=float(s.get("acc", np.nan)), acc_norm=float(s.get("acc_norm", np.nan)),
            fields={k: doc[k] for k in keep}))
    return items


def run_suite(model: torch.nn.Module, tokenizer: Any, eval_dir: Path, batch_size: int = 16,
              device: str | torch.device = "cpu", prefix_token_id: int | None = None,
              num_threads: int | None = None, tasks: tuple[str, ...] | None = None,
              limits: dict[str, int | None] | None = None, seed: int = 0,
              max_length: int | None = None, scorer: str = "batched", batch_tokens: int = 16384,
              share_contexts: bool = True, shard: tuple[int, int] | None = None) -> SuiteResult:
    """Score `model` on the eval sets in eval_dir with lm-eval; per-item records for compare().

    tasks: the parts to run besides wiki (default: every part whose file exists in eval_dir).
    limits: part -> rows kept (per group for grouped sets, see PARTS); missing/None = all rows.
    The model is moved to `device` (HFLM takes an in-memory model where it is) and put in eval mode.
    prefix_token_id: the token every text without context is scored after (wiki documents, CrowS
    sentences); None = lm-eval's default, the tokenizer's BOS. Results to be compared must share it.
    max_length: HFLM's context window (longer inputs are cut from the left); None = the model's.
    num_threads: torch CPU threads while the suite runs (restored afterwards); None leaves them as set.
    On a small shared CPU, 1 thread was 2-4x faster than 2 here: OpenMP threads spin at barriers
    and get descheduled when other processes compete for the cores.
    scorer: "batched" (tailor.eval.scorer.BatchedHFLM, forwards of `batch_tokens` padded tokens) or "hflm"
    (lm-eval's HFLM, `batch_size` rows per forward); both give the same scores to float rounding.
    share_contexts: the batched scorer scores a context once for all its answers (Tailor models; same scores
    to float rounding); False scores each request's row whole (benchmarks/evaluate.py's baseline).
    shard: (k, n) scores only every n-th selected row of each set, from the k-th (`run_suite_sharded`); a set
    left with no row is skipped.
    """
    if scorer not in ("batched", "hflm"):
        raise ValueError(f"scorer must be 'batched' or 'hflm', got {scorer!r}")
    parts = suite_parts(eval_dir, tasks)
    validate_eval_dir(eval_dir, parts)  # before the model scores anything
    model = model.to(device).eval()
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = _run(model, tokenizer, Path(eval_dir), batch_size, prefix_token_id, parts, limits or {}, seed,
                      max_length, scorer, batch_tokens, share_contexts, shard)
    finally:
        torch.set_num_threads(threads)
    # cpu_seconds next to wall seconds: on a shared CPU the wall time says more about the neighbours.
    result.meta.update(seconds=round(time.perf_counter() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2),
                       batch_size=batch_size, device=str(device), threads=num_threads or threads, scorer=scorer,
                       batch_tokens=batch_tokens)
    _log_suite(result, "suite")
    return result


def _log_suite(result: SuiteResult, what: str) -> None:
    """One line: perplexity and each task's accuracy (a shard may hold no wiki row, or none of a task's)."""
    log.info("%s: ppl %s, %s in %.1f s", what, f"{result.ppl():.3f}" if result.wiki else "-",
             ", ".join(f"{t} {result.acc(t):.3f}" for t in result.tasks if result.tasks[t]), result.meta["seconds"])


@dataclass(frozen=True)
class ModelRef:
    """A model a suite shard's process loads itself: a saved Tailor model directory (`model_dir`), or the base
    model (`source`, `n_layers`, as tailor.models.base.load_base). Picklable, unlike the model."""
    model_dir: str | None = None
    source: str | None = None
    n_layers: int | None = None

    def load(self, device: str) -> tuple[torch.nn.Module, Any]:
        from tailor.models.base import load_base, load_model_dir, load_tokenizer

        if self.model_dir is None:
            return load_base(self.source, self.n_layers, device=device)
        model = load_model_dir(Path(self.model_dir)).to(device)
        return model, load_tokenizer(Path(self.model_dir), model)


def _exit_with(parent: int) -> None:
    """A shard's watchdog: end this process when `parent` is gone. A killed evaluate stage (the flow stops the
    base's early suite with SIGTERM) would otherwise leave its shards behind, each holding the model and a CUDA
    context, blocked on a pipe nobody writes to."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tailor-shard-watchdog").start()


def _suite_shard(ref: ModelRef, eval_dir: str, device: str, opts: dict[str, Any], k: int, n: int,
                 parent: int, t_submit: float) -> SuiteResult:
    t_start = time.time()  # wall clocks (one machine): the parent's submit time came from another process
    _exit_with(parent)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a spawned process starts unconfigured
    # the caller's share of the cores, split between the shards (each would otherwise take all of it)
    opts = {**opts, "num_threads": opts.get("num_threads") or max(1, torch.get_num_threads() // n)}
    model, tok = ref.load(device)
    t_loaded = time.time()
    result = run_suite(model, tok, Path(eval_dir), device=device, shard=(k, n), **opts)
    # where a shard's time goes before it scores: session 21's H200 run spent ~70 s of a 250-270 s suite outside
    # the shards' scoring (spawn and imports, then the model's load and CUDA context, 8 shards at once)
    result.meta.update(start_seconds=round(t_start - t_submit, 2), load_seconds=round(t_loaded - t_start, 2))
    return result


def run_suite_sharded(ref: ModelRef, eval_dir: Path, device: str = "cpu", shards: int = 1,
                      **opts: Any) -> SuiteResult:
    """`run_suite` of the model `ref` names, in `shards` spawned processes that each load the model and score
    every shards-th row of each set; the items merged back in row order.

    Why: on an H200 the full profile's suite (85,913 items) is bound by lm-eval's per-request Python (~2 ms an
    item: rendering, tokenizing, bookkeeping), one core's work while the GPU waits; shards spread it over cores
    and share the GPU. Scores equal one process's to float rounding (a row's batch neighbours differ).
    shards=1 scores in this process. The first shard to fail ends the others and its error is raised here;
    shards end with this process if it is killed."""
    if shards <= 1:
        model, tok = ref.load(device)
        return run_suite(model, tok, eval_dir, device=device, **opts)
    import multiprocessing
    import os
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    t0 = time.perf_counter()
    validate_eval_dir(Path(eval_dir), suite_parts(Path(eval_dir), opts.get("tasks")))  # once, before any spawn
    ex = ProcessPoolExecutor(shards, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [ex.submit(_suite_shard, ref, str(eval_dir), device, opts, k, shards, os.getpid(), time.time())
                   for k in range(shards)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:  # raised now: the other shards' results would block until their whole suite is scored
            raise failed[0].exception()
        results = [f.result() for f in futures]
    except BaseException:
        for proc in list(getattr(ex, "_processes", {}).values()):  # no public way to stop running work
            proc.kill()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    merged = merge_shards(results)
    merged.meta.update(seconds=round(time.perf_counter() - t0, 2), shards=shards, device=str(device),
                       shard_seconds=[r.meta["seconds"] for r in results],
                       shard_start_seconds=[r.meta["start_seconds"] for r in results],
                       shard_load_seconds=[r.meta["load_seconds"] for r in results],
                       **{k: results[0].meta.get(k) for k in ("batch_size", "scorer", "batch_tokens")})
    _log_suite(merged, f"suite ({shards} shards)")
    return merged


def merge_shards(results: list[SuiteResult]) -> SuiteResult:
    """The shards of one suite (`run_suite(shard=(k, n))` for k < n) as one result, items in row order."""
    scored = {p for r in results for p in r.tasks}
    order = [p for p in PARTS if p in scored]
    prefix = {r.meta.get("prefix_token_id") for r in results}
    if len(prefix) != 1:
        raise ValueError(f"suite shards scored after different prefix tokens {sorted(prefix)}")
    n = {p: sum(r.meta.get("n", {}).get(p, 0) for r in results) for p in ["wiki", *order]}
    return SuiteResult(wiki=sorted((w for r in results for w in r.wiki), key=lambda w: w.id),
                       tasks={p: sorted((x for r in results for x in r.tasks.get(p, [])), key=lambda x: x.id)
                              for p in order},
                       meta={"lm_eval": results[0].meta.get("lm_eval"), "prefix_token_id": prefix.pop(), "n": n,
                             "lm_eval_results": [r.meta.get("lm_eval_results") for r in results]})


def suite_options(ev: Any) -> dict[str, Any]:
    """run_suite keyword arguments from an EvaluateParams (tailor.config): one place for the stage and CLI."""
    return {"tasks": tuple(ev.tasks), "limits": dict(ev.limits), "seed": ev.seed, "max_length": ev.max_length,
            "batch_size": ev.batch_size, "scorer": ev.scorer, "batch_tokens": ev.batch_tokens}


def _run(model: torch.nn.Module, tokenizer: Any, eval_dir: Path, batch_size: int, prefix_token_id: int | None,
         parts: tuple[str, ...], limits: dict[str, int | None], seed: int, max_length: int | None,
         scorer: str = "batched", batch_tokens: int = 16384, share_contexts: bool = True,
         shard: tuple[int, int] | None = None) -> SuiteResult:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tailor.eval.scorer import BatchedHFLM, compiled_templates

    with tempfile.TemporaryDirectory(prefix="tailor-eval-ds-") as tmp:
        tmp = Path(tmp)
        ids = {}
        for part in parts:  # the profile's subset of each set (this shard's rows of it), written where lm-eval reads it
            fname, _, groups = PARTS[part]
            rows = read_rows(eval_dir / fname)
            ids[part] = select(rows, limits.get(part), groups, seed, part)
            if shard is not None:
                ids[part] = ids[part][shard[0]::shard[1]]
            (tmp / fname).write_text("".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in ids[part]),
                                     encoding="utf-8")
        if shard is not None:  # a shard may get no row of a small set
            parts = tuple(p for p in parts if ids[p])
        configs = task_configs(eval_dir, tmp / "cache", parts, data_dir=tmp)
        # include_defaults=False: no scan of lm-eval's ~10k built-in YAMLs (seconds we'd pay per model).
        loaded = TaskManager(include_defaults=False).load(list(configs.values()))
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(seed=1234)  # zero-shot anyway; evaluate() expects it set, as simple_evaluate does
        # backend="causal": TailorForCausalLM is registered with AutoModelForCausalLM, but not in the
        # static name table HFLM consults, which would only log a warning and pick causal anyway.
        kw = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                  prefix_token_id=prefix_token_id, max_length=max_length)
        if scorer == "batched":
            lm = BatchedHFLM(batch_tokens=batch_tokens, share_contexts=share_contexts, **kw)
        else:
            lm = HFLM(**kw)
        names = {part: cfg["task"] for part, cfg in configs.items()}
        with compiled_templates() if scorer == "batched" else contextlib.nullcontext(), \
                requests_built_once(loaded["tasks"].values()):
            check_requests(lm, {p: loaded["tasks"][names[p]] for p in parts if p != "wiki"}, ids, eval_dir)
            out = evaluate(lm=lm, task_dict=loaded, log_samples=True, bootstrap_iters=0)
    samples = out["samples"]
    return SuiteResult(wiki=_wiki_items(samples[names["wiki"]], lm, ids["wiki"]) if "wiki" in parts else [],
                       tasks={p: _choice_items(samples[names[p]], PARTS[p][1], ids[p], p) for p in parts if p != "wiki"},
                       meta={"lm_eval": version("lm_eval"), "prefix_token_id": int(lm.prefix_token_id),
                             "n": {p: len(ids[p]) for p in parts}, "lm_eval_results": _aggregates(out)})


@contextlib.contextmanager
def requests_built_once(tasks: Any) -> Iterator[None]:
    """lm-eval's `evaluate()` builds every task's requests (`Task.build_all_requests`) after `check_requests` has
    built them: each document's prompts rendered twice. Inside this block a task asked to build again with the
    same arguments (defaults filled in) keeps the instances it has; other arguments build anew. Restored on exit."""
    tasks = list(tasks)
    for task in tasks:
        original = task.build_all_requests
        sig = inspect.signature(original)
        built: list[dict] = []

        def build(*, _original=original, _sig=sig, _built=built, **kw: Any) -> None:
            bound = _sig.bind(**kw)
            bound.apply_defaults()
            if _built and _built[-1] == bound.arguments:
                return
            _original(**kw)
            _built.append(dict(bound.arguments))

        task.build_all_requests = build  # an instance attribute: shadows the method until deleted
    try:
        yield
    finally:
        for task in tasks:
            del task.build_all_requests


def check_requests(lm: Any, tasks: dict[str, Any], ids: dict[str, list[int]], eval_dir: Path) -> None:
    """Every multiple-choice request tokenized as HFLM.loglikelihood will, before anything is scored.

    lm-eval asserts that a continuation fits the context window (`assert len(continuation_enc) <=
    self.max_length`) and indexes the first token of a context-free one, so a long CrowS sentence under a
    small evaluate.max_length, or a sentence that tokenizes to nothing, would stop the run midway with a
    bare AssertionError/IndexError. Contexts longer than the window are fine: lm-eval cuts them from the
    left, as documented for evaluate.max_length. EvalDataError names the file, row, choice and token count.
    """
    for part, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)  # evaluate() rebuilds them from scratch
        insts = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
        encoded = lm.split_requests([inst.args for inst in insts]) if hasattr(lm, "split_requests") else \
            [_split_one(lm, *inst.args) for inst in insts]  # BatchedHFLM: batched, and remembered for scoring
        for inst, (ctx, cont) in zip(insts, encoded, strict=True):
            continuation = inst.args[1]
            where = f"{eval_dir / PARTS[part][0]}: row {ids[part][inst.doc_id] + 1}: {part} choice {inst.idx}"
            if not cont or not ctx:
                raise EvalDataError(f"{where}: {continuation!r:.60} tokenizes to no tokens; it cannot be scored")
            if len(cont) > lm.max_length:
                raise EvalDataError(f"{where} is {len(cont)} tokens, more than the context window of {lm.max_length} "
                                    f"(evaluate.max_length): it cannot be scored; raise evaluate.max_length")


def _split_one(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's (context tokens, continuation tokens) of one request (TemplateLM.loglikelihood)."""
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        return (cont[:1], cont[1:]) if cont and cont[0] == lm.prefix_token_id else ([lm.prefix_token_id], cont)
    return lm._encode_pair(context, continuation)


def _aggregates(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's own aggregate numbers (JSON-safe), kept for cross-checking ours."""
    keep = {}
    for task, res in out.get("results", {}).items():
        keep[task] = {k: float(v) for k, v in res.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    return keep
