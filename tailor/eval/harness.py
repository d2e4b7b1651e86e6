"""Run the evaluation suite through lm-eval and keep per-item records.

lm-eval gives us its prompt formats and request batching; we keep its per-sample log (log_samples)
rather than its aggregates, because the bias slices and the paired bootstrap CIs need every item.
The three task YAMLs in tasks/ are plain lm-eval configs over local json files; their data_files
are pointed at the eval_dir written by the calibrate stage at run time and handed to lm-eval as
inline configs, so nothing is written next to the package and no built-in task index is scanned.

Perplexity here is lm-eval's loglikelihood_rolling: every token of a text is predicted, the first
one from the tokenizer's BOS token (HFLM.prefix_token_id). tailor.eval.ppl.perplexity instead starts
from the text's own first token and predicts the rest, so it is lower (the first token given BOS is
the hardest prediction). Both are token-level corpus perplexities exp(sum NLL / sum tokens); base and
compressed models are always scored with this one definition, and WikiItem.tokens counts exactly the
predicted tokens. Measured on SmolLM2-135M, 200 held-out wiki sentences: 296.9 here (BOS is
<|im_start|>), 241.3 from tailor.eval.ppl.perplexity; seq_nll([BOS] + tokens) matches this to 1e-7.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

TASKS_DIR = Path(__file__).parent / "tasks"
# suite part -> (task YAML, file the calibrate stage writes in eval_dir)
TASK_FILES = {
    "wiki": ("tailor_wiki.yaml", "wiki.jsonl"),
    "piqa": ("tailor_piqa.yaml", "piqa.jsonl"),
    "crows": ("tailor_crows_pairs.yaml", "crows_pairs.jsonl"),
}
SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WikiItem:
    id: int  # line index in wiki.jsonl (lm-eval's doc_id)
    hash: str  # of the document, so results over different files are never paired
    nll: float  # -sum log p(token) over all tokens of the text
    tokens: int  # predicted tokens


@dataclass(frozen=True)
class PiqaItem:
    id: int
    hash: str
    label: int
    ll: tuple[float, float]  # log-likelihood of " sol1", " sol2" after the question
    acc: float
    acc_norm: float


@dataclass(frozen=True)
class CrowsItem:
    id: int
    hash: str
    bias_type: str
    stereo_antistereo: str
    ll_more: float  # log-likelihood of sent_more (the sentence expressing the stereotype)
    ll_less: float
    stereotype: float  # 1.0 when the model prefers sent_more strictly, else 0.0

    @property
    def likelihood_diff(self) -> float:
        return abs(self.ll_more - self.ll_less)


@dataclass
class SuiteResult:
    wiki: list[WikiItem]
    piqa: list[PiqaItem]
    crows: list[CrowsItem]
    meta: dict[str, Any] = field(default_factory=dict)

    def ppl(self) -> float:
        return float(np.exp(sum(w.nll for w in self.wiki) / sum(w.tokens for w in self.wiki)))

    def piqa_acc(self, norm: bool = False) -> float:
        return float(np.mean([p.acc_norm if norm else p.acc for p in self.piqa]))

    def crows_pct_stereotype(self) -> float:
        return float(np.mean([c.stereotype for c in self.crows]))

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "meta": self.meta, "wiki": [asdict(w) for w in self.wiki],
                "piqa": [{**asdict(p), "ll": list(p.ll)} for p in self.piqa], "crows": [asdict(c) for c in self.crows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        if d.get("version") != SCHEMA_VERSION:
            raise ValueError(f"suite result version {d.get('version')!r}, expected {SCHEMA_VERSION}: re-run the suite")
        return cls(wiki=[WikiItem(**w) for w in d["wiki"]],
                   piqa=[PiqaItem(**{**p, "ll": tuple(p["ll"])}) for p in d["piqa"]],
                   crows=[CrowsItem(**c) for c in d["crows"]], meta=dict(d.get("meta", {})))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> "SuiteResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def task_configs(eval_dir: Path, cache_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Suite part -> inline lm-eval task config, its data file pointed into eval_dir."""
    eval_dir = Path(eval_dir).resolve()
    missing = [f for _, f in TASK_FILES.values() if not (eval_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{eval_dir}: missing eval set(s) {', '.join(missing)} (written by the calibrate stage)")
    empty = [f for _, f in TASK_FILES.values() if not (eval_dir / f).read_text().strip()]
    if empty:  # lm-eval would fail much later with an unrelated-looking error
        raise ValueError(f"{eval_dir}: empty eval set(s) {', '.join(empty)}")
    out = {}
    for part, (yaml_name, data_name) in TASK_FILES.items():
        cfg = yaml.safe_load((TASKS_DIR / yaml_name).read_text())
        kwargs = {**cfg.get("dataset_kwargs", {}), "data_files": {"test": str(eval_dir / data_name)}}
        if cache_dir is not None:  # datasets' arrow cache, else it lands in ~/.cache/huggingface
            kwargs["cache_dir"] = str(cache_dir)
        out[part] = {**cfg, "dataset_kwargs": kwargs}
    return out


def _doc_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _ll(resp: Any) -> float:
    """A multiple-choice response is (loglik, is_greedy); a rolling one a bare float."""
    return float(resp[0] if isinstance(resp, (tuple, list)) else resp)


def _wiki_items(samples: list[dict], lm: Any) -> list[WikiItem]:
    items = []
    for s in samples:
        (text,) = s["arguments"][0]  # the exact string lm-eval scored
        items.append(WikiItem(id=int(s["doc_id"]), hash=_doc_hash(s["doc"]), nll=-_ll(s["filtered_resps"][0]),
                              tokens=len(lm.tok_encode(text))))
    return items


def _piqa_items(samples: list[dict]) -> list[PiqaItem]:
    return [PiqaItem(id=int(s["doc_id"]), hash=_doc_hash(s["doc"]), label=int(s["doc"]["label"]),
                     ll=(_ll(s["filtered_resps"][0]), _ll(s["filtered_resps"][1])),
                     acc=float(s["acc"]), acc_norm=float(s["acc_norm"])) for s in samples]


def _crows_items(samples: list[dict]) -> list[CrowsItem]:
    items = []
    for s in samples:
        more, less = _ll(s["filtered_resps"][0]), _ll(s["filtered_resps"][1])
        # sent_more is the stereotyping sentence in both directions: for "antistereo" pairs the
        # disadvantaged group sits in sent_less, violating the stereotype. The original CrowS-Pairs
        # metric swaps the pair for antistereo and swaps back when scoring, so, like lm-eval, it
        # counts "sent_more preferred" for every pair; stereo_antistereo is kept only for slicing.
        items.append(CrowsItem(id=int(s["doc_id"]), hash=_doc_hash(s["doc"]), bias_type=str(s["doc"]["bias_type"]),
                               stereo_antistereo=str(s["doc"].get("stereo_antistereo", "")),
                               ll_more=more, ll_less=less, stereotype=1.0 if more > less else 0.0))
    return items


def run_suite(model: torch.nn.Module, tokenizer: Any, eval_dir: Path, batch_size: int = 16,
              device: str | torch.device = "cpu", prefix_token_id: int | None = None,
              num_threads: int | None = None) -> SuiteResult:
    """Score `model` on the eval sets in eval_dir with lm-eval; per-item records for compare().

    The model is moved to `device` (HFLM takes an in-memory model where it is) and put in eval mode.
    prefix_token_id: the token every text without context is scored after (wiki documents, CrowS
    sentences); None = lm-eval's default, the tokenizer's BOS. Results to be compared must share it.
    num_threads: torch CPU threads while the suite runs (restored afterwards); None leaves them as set.
    On a small shared CPU, 1 thread was 2-4x faster than 2 here: OpenMP threads spin at barriers
    and get descheduled when other processes compete for the cores.
    """
    model = model.to(device).eval()
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = _run(model, tokenizer, eval_dir, batch_size, prefix_token_id)
    finally:
        torch.set_num_threads(threads)
    # cpu_seconds next to wall seconds: on a shared CPU the wall time says more about the neighbours.
    result.meta.update(seconds=round(time.perf_counter() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2),
                       batch_size=batch_size, device=str(device), threads=num_threads or threads)
    log.info("suite: ppl %.3f, piqa %.3f, crows pct_stereotype %.3f in %.1f s", result.ppl(), result.piqa_acc(),
             result.crows_pct_stereotype(), result.meta["seconds"])
    return result


def _run(model: torch.nn.Module, tokenizer: Any, eval_dir: Path, batch_size: int,
         prefix_token_id: int | None) -> SuiteResult:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="tailor-eval-ds-") as cache:
        configs = task_configs(eval_dir, Path(cache))
        # include_defaults=False: no scan of lm-eval's ~10k built-in YAMLs (seconds we'd pay per model).
        loaded = TaskManager(include_defaults=False).load(list(configs.values()))
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(seed=1234)  # zero-shot anyway; evaluate() expects it set, as simple_evaluate does
        # backend="causal": TailorForCausalLM is registered with AutoModelForCausalLM, but not in the
        # static name table HFLM consults, which would only log a warning and pick causal anyway.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                  prefix_token_id=prefix_token_id)
        out = evaluate(lm=lm, task_dict=loaded, log_samples=True, bootstrap_iters=0)
    samples = out["samples"]
    names = {part: cfg["task"] for part, cfg in configs.items()}
    return SuiteResult(wiki=_wiki_items(samples[names["wiki"]], lm), piqa=_piqa_items(samples[names["piqa"]]),
                       crows=_crows_items(samples[names["crows"]]),
                       meta={"lm_eval": version("lm_eval"), "prefix_token_id": int(lm.prefix_token_id),
                             "lm_eval_results": _aggregates(out)})


def _aggregates(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's own aggregate numbers (JSON-safe), kept for cross-checking ours."""
    keep = {}
    for task, res in out.get("results", {}).items():
        keep[task] = {k: float(v) for k, v in res.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    return keep
