"""benchmarks/pipeline_gpu/measured.py: the whole run's stage times read back from the flow's log."""
import io
import json
import tarfile

import pytest
import yaml

from benchmarks.pipeline_gpu import measured as m

LOG = """\
23:59:50.000 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8875
23:59:58.956 | INFO    | Flow run 'x' - Beginning flow run 'x' for flow 'tailor-nightly'
00:00:40.002 | INFO    | Task run 'calibrate' - calibrate: done in 38.5 s
00:03:10.010 | INFO    | Task run 'supernet' - supernet: done in 150.0 s
00:04:00.010 | INFO    | Task run 'search@phone' - search@phone: done in 50.0 s
00:04:20.010 | INFO    | Task run 'search@laptop' - search@laptop: unchanged, skipped
00:05:00.012 | INFO    | Flow run 'x' - base-eval (early): base suite scored (250.0 s)
00:05:00.020 | INFO    | Flow run 'x' - latency (early): search --latency-only: latency subnets: phone 6 subnets timed (19.6 s) (94.0 s)
00:05:30.997 | INFO    | Flow run 'x' - Finished in state Completed()
"""


def test_log_places_each_stage_where_it_ran_across_midnight():
    got = m.parse_log(LOG, "23:59:48")
    by = {s["target"]: s for s in got["stages"]}
    assert by["calibrate"] == {"target": "calibrate", "start_s": 13.5, "end_s": 52, "seconds": 38.5}
    assert by["supernet"]["end_s"] == 202 and by["supernet"]["start_s"] == 52
    # logged at the end when collected; it started as calibrate ended
    assert by["base-eval (early)"] == {"target": "base-eval (early)", "start_s": 52.0, "end_s": 302.0, "seconds": 250.0}
    assert by["latency (early)"] == {"target": "latency (early)", "start_s": 52.0, "end_s": 146.0, "seconds": 94.0}
    assert got["skipped"] == ["search@laptop"]
    assert got["last_line_s"] == 342 and not got["failed"]


def test_a_failed_stage_marks_the_log_failed():
    bad = LOG + "00:06:00.000 | ERROR   | Task run 'finetune@phone' - finetune@phone failed (exit 1): boom\n"
    assert m.parse_log(bad, "23:59:48")["failed"]
    crashed = LOG.replace("Finished in state Completed()", "Finished in state Failed('x')")
    assert m.parse_log(crashed, "23:59:48")["failed"]
    # an early side job's failure is a warning: the stages did its work, the flow went on
    early = LOG + ("00:05:01.000 | WARNING | Flow run 'x' - latency (early) failed (exit 1): boom; "
                   "the search stages timed their subnets themselves\n")
    assert not m.parse_log(early, "23:59:48")["failed"]
    # Dask's shutdown logs a traceback of a closed connection in a run that completed
    assert not m.parse_log(LOG + "Traceback (most recent call last):\ndistributed.comm.core.CommClosedError\n",
                           "23:59:48")["failed"]


def test_gpu_load():
    csv = "2026/11/30 10:00:00.000, 80 %, 1000 MiB\n2026/11/30 10:00:05.000, 20 %, 3000 MiB\nbroken line\n"
    g = m.gpu_load(csv)
    assert g["samples"] == 2 and g["mean_util_pct"] == 50.0 and g["share_above_50pct"] == 0.5
    assert g["peak_memory_gb"] == round(3000 * 2**20 / 1e9, 1)
    assert m.gpu_load("") is None


def _files(rc: int = 0, t1: bool = True, log: str = LOG) -> dict:
    params = {"profile": "full", "devices": {"phone": {}, "laptop": {}}}
    f = {"t0": b"1000 23:59:48", "params.yaml": yaml.safe_dump(params).encode(), "tailor_run.log": log.encode(),
         "rc": str(rc).encode(), "reports/search/phone/metrics.json": json.dumps(
             {"bits_per_param": 4.2, "phase_seconds": {"sensitivity": 30.2}, "latency_mape": 0.4}).encode()}
    f["reports/search/laptop/metrics.json"] = json.dumps({"bits_per_param": 5.0}).encode()  # search@laptop: skipped
    if t1:
        f["t1"] = b"2200 00:19:48"
    return f


def test_summary_marks_missing_stages_and_judges_the_target():
    run = m.summarize(_files(), "h200")
    assert run["total_s"] == 1200 and run["total_minutes"] == 20.0
    assert "finetune@phone" in run["missing_stages"] and "search@laptop" not in run["missing_stages"]
    assert not run["complete"] and not run["met"]  # stages never finished: not a measured total
    # search@phone finished in this log; metrics of a stage that did not (stale, from the working copy) are left out
    assert run["results"]["phone"]["bits_per_param"] == 4.2
    # the stage's own account of its seconds comes along; what a stage did not report is left out, not None
    assert run["results"]["phone"]["timings"] == {"search": {"sensitivity": 30.2}, "latency_mape": 0.4}
    assert m.summarize(_files(), "h200")["results"]["laptop"]["bits_per_param"] is None


def test_summary_complete_run(monkeypatch):
    monkeypatch.setattr(m, "expected_targets", lambda dvc, devs: ["calibrate", "supernet", "search@phone", "search@laptop"])
    assert m.summarize(_files(), "h200")["met"]  # 20.0 min: at the target
    assert not m.summarize(_files(rc=1), "h200")["complete"]
    unfinished = _files(t1=False, log=LOG.replace("Finished in state Completed()", "Task run 'x' - running"))
    assert not m.summarize(unfinished, "h200")["complete"]
    assert m.summarize(unfinished, "h200")["total_s"] == 342  # no poll stamp: the last log line
    unfinished["tpoll"] = b"1900 00:14:48"
    assert m.summarize(unfinished, "h200")["total_s"] == 900  # the poll saw it still running at 15 min
    # no exit seen, but the flow logged its completion: complete, ending at the flow's last line, not the poll
    seen = _files(t1=False)
    del seen["rc"]
    seen["tpoll"] = b"1900 00:14:48"
    run = m.summarize(seen, "h200")
    assert run["complete"] and run["ended_by"] == "flow log" and run["total_s"] == 342 and run["exit_code"] is None
    seen["rc"] = b"1"  # an exit code other than 0 is never overruled by the log
    assert not m.summarize(seen, "h200")["complete"]
    late = _files()
    late["t1"] = b"2201 00:19:49"
    assert m.summarize(late, "h200")["complete"] and not m.summarize(late, "h200")["met"]


def test_cli_refuses_an_archive_that_is_not_a_poll(tmp_path, capsys):
    p = tmp_path / "r.tgz"
    with tarfile.open(p, "w:gz") as t:
        data = b"x"
        info = tarfile.TarInfo("other.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    assert m.main(["--tgz", str(p), "--label", "x"]) == 2
    assert "lacks t0, params.yaml, tailor_run.log" in capsys.readouterr().err
    assert m.main(["--tgz", str(tmp_path / "none.tgz"), "--label", "x"]) == 2
