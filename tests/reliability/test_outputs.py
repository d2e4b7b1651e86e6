"""steps/_common's output writers: temp path + rename, all or nothing per stage, stale temp cleanup."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from steps._common import copy_file, stage_outputs, staged_dir, write_json


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_failed_stage_puts_previous_outputs_back(tmp_path):
    art, rep = tmp_path / "artifacts" / "search" / "phone", tmp_path / "reports" / "search" / "phone"
    with stage_outputs():
        with staged_dir(art) as d:
            (d / "config.json").write_text("old")
        write_json(rep / "metrics.json", {"v": "old"})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with pytest.raises(OSError), stage_outputs():
        with staged_dir(art) as d:
            (d / "config.json").write_text("new")
        write_json(rep / "metrics.json", {"v": "new"})
        write_json(rep / "extra.json", {"v": "new"})
        assert (art / "config.json").read_text() == "new"  # in place (and readable) while the stage runs
        raise OSError(errno.ENOSPC, "No space left on device", str(rep / "candidates.csv"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert _tree(tmp_path) == ["artifacts", "artifacts/search", "artifacts/search/phone",
                               "artifacts/search/phone/config.json", "reports", "reports/search",
                               "reports/search/phone", "reports/search/phone/metrics.json"]


def test_fault_injection_fails_the_matching_write_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_FAULT_WRITE", "metrics.json")
    write_json(tmp_path / "gates.json", {})
    with pytest.raises(OSError) as e:
        write_json(tmp_path / "metrics.json", {})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "metrics.json")
    with pytest.raises(OSError), staged_dir(tmp_path / "metrics.json.d"):
        pass
    assert _tree(tmp_path) == ["gates.json"]


def test_temp_paths_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".phone.tmp-{dead}-abc").mkdir()  # a killed run's staged dir
    (tmp_path / f".metrics.json.old-{dead}-abc").mkdir()  # a killed run's set-aside output
    (tmp_path / f".phone.tmp-{os.getpid()}-live").mkdir()  # a running process's: kept
    with staged_dir(tmp_path / "phone") as d:
        (d / "x").write_text("1")
    copy_file(tmp_path / "phone" / "x", tmp_path / "metrics.json")
    assert _tree(tmp_path) == [f".phone.tmp-{os.getpid()}-live", "metrics.json", "phone", "phone/x"]
