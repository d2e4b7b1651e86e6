"""The base model's evaluate suite scored once however many processes ask (steps.evaluate.base_suite's lock),
`--base-only` obeying runner.base_eval, and the flow's early run of it (flows.nightly.EarlyBaseEval)."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from steps import evaluate as stage
from tailor.config import EvaluateParams, RunnerParams


def _params(base_eval: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(source=None, n_layers=None), evaluate=EvaluateParams(),
                           runner=RunnerParams(base_eval=base_eval))


class _Suite:
    def __init__(self, n: int):
        self.n = n

    def to_dict(self) -> dict:
        return {"n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "_Suite":
        return cls(d["n"])


def _fake_scoring(monkeypatch, tmp_path: Path, seconds: float = 0.0) -> list[int]:
    calls: list[int] = []

    def run_suite(*a, **k):
        calls.append(1)
        time.sleep(seconds)  # long enough that a second caller arrives while the first still scores
        return _Suite(len(calls))

    monkeypatch.setattr(stage, "_base_cache", lambda params, eval_dir: tmp_path / "cache" / "abc.json")
    monkeypatch.setattr(stage, "run_suite_sharded", run_suite)
    monkeypatch.setattr(stage, "SuiteResult", _Suite)
    return calls


def test_callers_at_once_score_the_base_once_and_all_read_that_result(monkeypatch, tmp_path):
    calls = _fake_scoring(monkeypatch, tmp_path, seconds=0.5)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(stage.base_suite(_params(), tmp_path, "cpu").n))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [1, 1, 1]
    assert (tmp_path / "cache" / "abc.json").is_file() and not (tmp_path / "cache" / "abc.tmp").exists()


def test_an_unreadable_cached_result_is_scored_again(monkeypatch, tmp_path):
    calls = _fake_scoring(monkeypatch, tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "abc.json").write_text('{"n": 7')  # cut short
    assert stage.base_suite(_params(), tmp_path, "cpu").n == 1 and calls == [1]
    assert stage.base_suite(_params(), tmp_path, "cpu").n == 1 and calls == [1]  # now read, not scored


def test_base_only_scores_now_only_where_runner_base_eval_says_so(monkeypatch, tmp_path):
    calls = _fake_scoring(monkeypatch, tmp_path)
    monkeypatch.setattr(stage, "artifact_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(stage, "validate_eval_dir", lambda *a: None)
    monkeypatch.setattr(stage, "suite_parts", lambda *a: ())
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    params = _params
    assert "left to the evaluate stage" in stage.base_only(params("in-stage")) and calls == []
    assert "left to the evaluate stage" in stage.base_only(params("auto")) and calls == []  # a CPU: no
    assert "base suite cached" in stage.base_only(params("early")) and calls == [1]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert "base suite cached" in stage.base_only(params("auto")) and calls == [1]  # cached: not scored again


def test_runner_base_eval_refuses_an_unknown_mode_by_name():
    with pytest.raises(ValueError, match="base_eval"):
        RunnerParams(base_eval="sometimes")


def test_the_flow_starts_it_only_when_an_evaluate_stage_may_run():
    from flows.nightly import wants_early_base_eval

    todo = ["calibrate", "supernet", "search", "finetune@phone", "evaluate@phone", "export@phone"]
    assert wants_early_base_eval(todo, "auto") and wants_early_base_eval(todo, "early")
    assert not wants_early_base_eval(todo, "in-stage")
    assert not wants_early_base_eval([t for t in todo if not t.startswith("evaluate")], "early")


def test_a_failed_early_run_is_a_warning_and_a_skipped_row_not_a_failed_flow(monkeypatch, tmp_path, caplog):
    from flows import nightly

    monkeypatch.setattr(nightly, "EARLY_BASE_EVAL", ["-c", "import sys; print('tailor evaluate: no eval sets'); sys.exit(2)"])
    run = nightly.EarlyBaseEval(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        row = run.finish(logging.getLogger("t"))
    assert row["target"] == "base-eval (early)" and row["skipped"] is True
    assert "exit 2" in caplog.text and "tailor evaluate: no eval sets" in caplog.text

    # its last line, whatever came before: megabytes of progress bars, bytes that are not UTF-8
    monkeypatch.setattr(nightly, "EARLY_BASE_EVAL", ["-c", "import sys; sys.stdout.buffer.write(b'\\xff\\xfe' * 2_000_000);"
                                                     " print(); print('evaluate --base-only: base suite cached')"])
    run = nightly.EarlyBaseEval(str(tmp_path))
    while run.proc.poll() is None:
        time.sleep(0.02)
    exited = time.perf_counter() - run.t0
    time.sleep(2)  # the flow collects it long after it ended: the row gives the child's own time, not the wait
    row = run.finish(logging.getLogger("t"))
    assert row["skipped"] is False and row["seconds"] <= round(exited, 1) + 0.1

    # the flow failed: the child ends now, even one that ignores SIGTERM
    monkeypatch.setattr(nightly, "EARLY_BASE_EVAL", ["-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                                     "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"])
    monkeypatch.setattr(nightly.EarlyBaseEval, "STOP_WAIT_S", 1)
    run = nightly.EarlyBaseEval(str(tmp_path))
    while b"ready" not in Path(f"/proc/{run.proc.pid}/fd/1").read_bytes():  # its handler is in place
        time.sleep(0.05)
    t0 = time.perf_counter()
    run.stop()
    assert run.proc.returncode is not None and time.perf_counter() - t0 < 30


def test_the_base_only_command_exits_2_with_one_line_on_bad_params_and_0_when_left_to_the_stage(tmp_path):
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    run = lambda f: subprocess.run([sys.executable, "-m", "steps.evaluate", "--base-only", "--params", str(f)],  # noqa: E731
                                   cwd=root, capture_output=True, text=True, timeout=300)
    raw["runner"]["base_eval"] = "sooner"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    bad = run(tmp_path / "bad.yaml")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "runner.base_eval" in lines[0], bad.stderr
    raw["runner"]["base_eval"] = "in-stage"
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw))
    ok = run(tmp_path / "ok.yaml")
    assert ok.returncode == 0 and "left to the evaluate stage" in ok.stderr + ok.stdout, ok.stderr
