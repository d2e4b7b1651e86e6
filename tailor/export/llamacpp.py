"""llama.cpp runtime checks through llama-cpp-python: perplexity, greedy generation, decode speed.

Token ids go in directly (no BOS added, no llama.cpp tokenization) so the runtime sees exactly the
sequences torch saw; perplexity uses the definition of `tailor.eval.ppl`.

Threads default to `tailor.export.runtime_threads()` (torch's thread count: the process's share of the
cores). On a CPU shared with other busy processes llama.cpp's spinning thread barriers collapse (measured
here on 2 busy cores: 1 thread 1,760 tokens/s, 2 threads 2.3 tokens/s for a tiny model).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tailor.export import runtime_threads

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())  # quiet unless the application configures logging
# ggml's levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continue the previous message.
# llama-cpp-python 0.3.36 maps them with an older enum (3 -> ERROR), so its verbose=False still prints
# warnings such as "padding V cache" for per-layer KV sizes; we route them to logging ourselves.
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_state = {"level": logging.DEBUG, "callback": None}


def _route_logs() -> None:
    import llama_cpp

    if _state["callback"] is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != 5:
            _state["level"] = _LEVELS.get(level, logging.DEBUG)
        log.log(_state["level"], "%s", text.decode("utf-8", "replace").rstrip("\n"))

    _state["callback"] = callback  # keep a reference: ctypes does not, and llama.cpp calls it later
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _llama(path: Path, n_ctx: int, logits_all: bool, n_threads: int | None) -> Iterator[Any]:
    from llama_cpp import Llama  # imported here: a heavy native library only export needs

    _route_logs()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    n_ctx = max(32, n_ctx)
    n_threads = n_threads or runtime_threads()
    try:
        batch = min(n_ctx, 512)  # bounds the logits_all buffer (batch x vocab floats) for long inputs
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, logits_all=logits_all,
                    n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    except ValueError as e:  # llama-cpp-python reports every load failure as "Failed to load model"
        raise ValueError(f"{path}: llama.cpp could not load the model ({e})") from None
    try:
        yield llm
    finally:
        llm.close()


def _last_logits(llm: Any) -> np.ndarray:
    """Logits of the last evaluated token (llama-cpp-python only keeps all rows with logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _nll(scores: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(scores)[t, targets[t]] per row, float64 (T,), from float32 logits (T, V): torch's
    cross-entropy, as tailor.eval.ppl scores the PyTorch side; float32, on torch's threads, 5.8x a float64 numpy
    log-softmax on 400-token rows (benchmarks/llamacpp_nll.py; the export's own documents are short, so there
    it saves seconds, not minutes)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    return F.cross_entropy(x, torch.as_tensor(np.asarray(targets), dtype=torch.long), reduction="none").double().numpy()


def logits(path: Path, seq: Sequence[int], n_threads: int | None = None) -> np.ndarray:
    """float32 logits (len(seq), vocab) of one sequence from position 0, for parity checks."""
    with _llama(path, len(seq), logits_all=True, n_threads=n_threads) as llm:
        llm.eval(list(seq))
        return np.array(llm.scores[: len(seq)], dtype=np.float32)


def token_nlls(path: Path, seqs: Sequence[Sequence[int]], n_threads: int | None = None) -> list[np.ndarray]:
    """Next-token NLL (nats) of every sequence of two or more tokens, each scored alone from position 0:
    element t of a sequence's array is -log p(token t+1 | tokens 0..t), shape (T-1,). ValueError if none."""
    seqs = [list(s) for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    out = []
    with _llama(path, max(len(s) for s in seqs), logits_all=True, n_threads=n_threads) as llm:
        for s in seqs:
            llm.reset()  # position 0 again; eval() drops the stale KV cells
            llm.eval(s)
            out.append(_nll(llm.scores[: len(s) - 1], s[1:]))  # logits (T-1, V) -> (T-1,)
    return out


def perplexity(path: Path, seqs: Sequence[Sequence[int]], n_threads: int | None = None) -> float:
    """exp(total NLL / predicted tokens), each sequence scored alone from position 0."""
    nll = token_nlls(path, seqs, n_threads)
    return math.exp(float(sum(float(x.sum()) for x in nll)) / sum(len(x) for x in nll))


def _greedy(llm: Any, ids: list[int], n_tokens: int, eos: int | None) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n_tokens):
        tok = int(np.argmax(_last_logits(llm)))
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
    return out


def generate(path: Path, tokenizer: Any, prompt: str, n_tokens: int, n_threads: int | None = None) -> str:
    """Greedy continuation of `prompt` (tokenized by `tokenizer`, as torch would), at most n_tokens."""
    ids = tokenizer.encode(prompt)
    with _llama(path, len(ids) + n_tokens + 1, logits_all=False, n_threads=n_threads) as llm:
        out = _greedy(llm, ids, n_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(out)


def _step_seconds(path: Path, tokenizer: Any, n_tokens: int, n_threads: int | None) -> list[float]:
    """Seconds of each of `n_tokens` one-token decode steps after a short prompt (the prompt not timed; no EOS
    stop), each timed alone by llama.cpp's own counter (llama_perf_context, reset before the step: decode calls
    only, not Python's loop); a build without counters: Python's clock around the call."""
    import llama_cpp

    ids = tokenizer.encode("The history of the city begins")
    steps = []
    with _llama(path, len(ids) + n_tokens + 1, logits_all=False, n_threads=n_threads) as llm:
        llm.reset()
        llm.eval(ids)
        tok = int(np.argmax(_last_logits(llm)))
        for _ in range(n_tokens):
            llama_cpp.llama_perf_context_reset(llm.ctx)
            t = time.perf_counter()
            llm.eval([tok])
            wall = time.perf_counter() - t
            perf = llama_cpp.llama_perf_context(llm.ctx)
            steps.append(perf.t_eval_ms / 1000.0 if perf.n_eval == 1 and perf.t_eval_ms > 0 else wall)
            tok = int(np.argmax(_last_logits(llm)))
    return steps


def seconds_per_token(path: Path, tokenizer: Any, n_tokens: int = 32, n_threads: int | None = None) -> float:
    """For the latency model: the fastest of `n_tokens` decode steps (`_step_seconds`). Other work on the
    machine only ever slows a step down, so the minimum is the estimate least disturbed by it. Per step, not
    per run: on session 21's H200 run one subnet's three 16-step runs all averaged 2.2 s a token beside the
    supernet (its neighbours 6-12 ms), and the phone's fit missed by 4,800% (reports/search/phone/latency.csv)."""
    return min(_step_seconds(path, tokenizer, n_tokens, n_threads))


def tokens_per_s(path: Path, tokenizer: Any, n_tokens: int = 64, n_threads: int | None = None) -> float:
    """Decode speed: tokens per second over `n_tokens` one-token steps after a short prompt (`_step_seconds`)."""
    return n_tokens / sum(_step_seconds(path, tokenizer, n_tokens, n_threads))
