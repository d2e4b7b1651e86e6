"""The device runtimes run on the process's share of the cores (tailor.export.runtime_threads), not on all of them:
llama.cpp and onnxruntime spin at thread barriers, and on session 21's H200 run a 16-thread llama.cpp perplexity
beside 8 evaluate shards took 310 s for what 2 idle threads do in 37 s."""
import os
import sys
import types

import pytest
import torch

from tailor.export import runtime_threads


@pytest.fixture
def threads():
    """torch's thread count set to one this machine's core count cannot be mistaken for; restored after."""
    before = torch.get_num_threads()
    n = (os.cpu_count() or 1) + 3
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


def test_runtime_threads_follows_torch(threads):
    assert runtime_threads() == threads
    torch.set_num_threads(1)
    assert runtime_threads() == 1


class _FakeLlama:
    made: list[dict] = []

    def __init__(self, model_path, **kw):
        _FakeLlama.made.append(kw)

    def close(self):
        pass


def test_llama_cpp_defaults_to_the_process_share(threads, tmp_path, monkeypatch):
    from tailor.export import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=_FakeLlama))
    monkeypatch.setattr(llamacpp, "_route_logs", lambda: None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    _FakeLlama.made.clear()
    with llamacpp._llama(tmp_path / "m.gguf", 64, logits_all=True, n_threads=None):
        pass
    with llamacpp._llama(tmp_path / "m.gguf", 64, logits_all=True, n_threads=2):  # an explicit count wins
        pass
    assert [(k["n_threads"], k["n_threads_batch"]) for k in _FakeLlama.made] == [(threads, threads), (2, 2)]


def test_onnxruntime_session_takes_the_process_share(threads, tmp_path, monkeypatch):
    from tailor.export import ort as ort_rt

    made = []
    monkeypatch.setattr(ort_rt.ort, "InferenceSession", lambda path, so, providers: made.append(so.intra_op_num_threads) or object())
    ort_rt._cached_session.cache_clear()
    f = tmp_path / "m.onnx"
    f.write_bytes(b"onnx")
    first = ort_rt.session(f)
    assert ort_rt.session(f) is first and made == [threads]  # one session per file and thread count
    torch.set_num_threads(1)
    assert ort_rt.session(f) is not first and made == [threads, 1]
    ort_rt.session(f, 3)  # an explicit count (the latency timing's) wins
    assert made == [threads, 1, 3]
    ort_rt._cached_session.cache_clear()


def test_latency_cache_key_names_the_threads(threads):
    from tailor.search.latency import cache_key

    key = cache_key("gguf", [])  # no count given: the process's share
    torch.set_num_threads(1)
    assert cache_key("gguf", []) != key  # timings on 1 thread are not timings on `threads`
    torch.set_num_threads(threads)
    assert cache_key("gguf", []) == key
    # search.latency_threads: a fixed count, whatever torch's; capped at the cores, as the timing is
    cores = len(os.sched_getaffinity(0))
    assert cache_key("gguf", [], 1) == cache_key("gguf", [], 1) != cache_key("gguf", [], 2 if cores > 1 else None)
    assert cache_key("gguf", [], cores + 5) == cache_key("gguf", [], cores)


def test_latency_timing_runs_on_the_configured_threads_capped_at_the_cores(threads, monkeypatch):
    from tailor.search import latency

    asked = []
    runner = types.SimpleNamespace(seconds_per_token=lambda path, tok, n, n_threads: asked.append(n_threads) or 0.01)
    monkeypatch.setattr(latency, "backend", lambda fmt: types.SimpleNamespace(runner=runner))
    cores = len(os.sched_getaffinity(0))
    for want in (1, cores + 5, None):
        latency.seconds_per_token("m", "gguf", None, threads=want)
    assert asked == [1, cores, threads]  # None: the process's share (torch's threads)


def test_llama_cpp_latency_is_the_fastest_single_step(monkeypatch):
    """seconds_per_token: the minimum over steps, each timed alone by llama.cpp's counter, so one stalled
    step (or a stalled stretch) does not become the subnet's latency."""
    from tailor.export import llamacpp

    step_ms = iter([9.0, 2500.0, 4.0, 6.0, 2400.0, 5.0])
    perf = types.SimpleNamespace(n_eval=0, t_eval_ms=0.0)

    class Llm:
        ctx = object()

        def reset(self):
            pass

        def eval(self, toks):
            if len(toks) == 1:  # a decode step; the prompt is not timed
                perf.n_eval, perf.t_eval_ms = perf.n_eval + 1, perf.t_eval_ms + next(step_ms)

    def reset(ctx):
        perf.n_eval, perf.t_eval_ms = 0, 0.0

    fake = types.SimpleNamespace(llama_perf_context_reset=reset, llama_perf_context=lambda ctx: perf)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.setattr(llamacpp, "_llama", lambda *a, **k: __import__("contextlib").nullcontext(Llm()))
    monkeypatch.setattr(llamacpp, "_last_logits", lambda llm: [0.0, 1.0])
    tok = types.SimpleNamespace(encode=lambda text: [1, 2, 3])
    assert llamacpp.seconds_per_token("m.gguf", tok, n_tokens=6) == pytest.approx(0.004)
