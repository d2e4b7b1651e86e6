"""Run an exported ONNX file in onnxruntime (CPU): perplexity, greedy generation, decode speed.

The file maps input_ids [batch, seq] -> logits [batch, seq, vocab] with no KV cache, so every step
recomputes the whole prefix. Perplexity goes through `tailor.eval.ppl` itself (an adapter makes the
session look like a torch model), so torch and runtime numbers share one definition.
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch

from tailor.eval import ppl
from tailor.export import runtime_threads

SPEED_PROMPT = "The history of the city begins"


@lru_cache(maxsize=4)
def _cached_session(path: str, mtime_ns: int, size: int, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # the process's share of the cores (runtime_threads), not all of them
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types; name the file
        raise RuntimeError(f"{path}: onnxruntime cannot load it ({e})") from None


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """One session per file version (path, mtime, size) and thread count (`threads`, or
    `tailor.export.runtime_threads()` read at each call): re-exporting to the same path reloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    st = path.stat()
    return _cached_session(str(path.resolve()), st.st_mtime_ns, st.st_size, threads or runtime_threads())


def logits(sess: ort.InferenceSession, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[batch, seq, vocab] float32 logits of equal-length token lists."""
    return sess.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]


class _SessionLM:
    """Callable like a Tailor model: model(ids).logits, which is all `tailor.eval.ppl` asks for."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess

    def __call__(self, ids: torch.Tensor) -> Any:
        return SimpleNamespace(logits=torch.from_numpy(logits(self.sess, ids.cpu().tolist())))


def perplexity(path: Path, seqs: list[list[int]]) -> float:
    """exp(total NLL / predicted tokens), each sequence scored alone (tailor.eval.ppl's definition)."""
    return ppl.perplexity(_SessionLM(session(path)), seqs)  # type: ignore[arg-type]


def _greedy(sess: ort.InferenceSession, ids: list[int], n_tokens: int, eos: int | None) -> list[int]:
    out: list[int] = []
    for _ in range(n_tokens):
        nxt = int(np.argmax(logits(sess, [ids + out])[0, -1]))
        out.append(nxt)
        if nxt == eos:
            break
    return out


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return ids


def generate(path: Path, tokenizer: Any, prompt: str, n_tokens: int) -> str:
    """Greedy continuation of `prompt` (the new text only), stopping early at the EOS token."""
    sess = session(path)
    new = _greedy(sess, _prompt_ids(tokenizer, prompt), n_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True)


def tokens_per_s(path: Path, tokenizer: Any, n_tokens: int = 32) -> float:
    """Greedy decode speed: exactly `n_tokens` steps (EOS ignored) after one untimed warm-up step;
    each step recomputes the full prefix, as this export has no KV cache."""
    sess = session(path)
    ids = _prompt_ids(tokenizer, SPEED_PROMPT)
    _greedy(sess, ids, 1, None)  # warm-up: first run allocates and prepacks
    t = time.perf_counter()
    _greedy(sess, ids, n_tokens, None)
    return n_tokens / (time.perf_counter() - t)


def seconds_per_token(path: Path, tokenizer: Any, n_tokens: int = 32, n_threads: int | None = None) -> float:
    """For the latency model: the fastest single-token forward. The export has no KV cache: one decode
    step is one forward of a single token, which streams every weight once just as a cached step does
    (attention over a short cache is negligible); the minimum is the timing least disturbed by other work."""
    sess = session(path, n_threads)
    ids = np.array([[tokenizer.bos_token_id or 1]], dtype=np.int64)
    sess.run(["logits"], {"input_ids": ids})  # warm-up: allocation and weight prepacking
    times = []
    for _ in range(n_tokens):
        t = time.perf_counter()
        sess.run(["logits"], {"input_ids": ids})
        times.append(time.perf_counter() - t)
    return float(np.min(times))
