"""tailor.eval.harness.run_suite_sharded's processes: the first failing shard ends the others at once, and
shards never outlive the process that started them (the flow stops the base's early suite with a signal)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tailor.eval.harness import ModelRef, run_suite_sharded

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class SlowOrBroken(ModelRef):
    """A model that never loads: the first shard to arrive fails at once, the others hang (pid files in `at`)."""
    at: str = ""
    n_shards: int = 1

    def load(self, device: str):
        (Path(self.at) / f"{os.getpid()}.pid").touch()
        try:
            fd = os.open(Path(self.at) / "first", os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            time.sleep(150)
        else:
            os.close(fd)
            end = time.monotonic() + 60  # fail once every shard is loading
            while len(list(Path(self.at).glob("*.pid"))) < int(self.n_shards) and time.monotonic() < end:
                time.sleep(0.1)
            raise RuntimeError("shard model broken")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _gone_within(pids: list[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def _eval_dir(tmp: Path) -> Path:
    (tmp / "eval").mkdir()
    (tmp / "eval" / "wiki.jsonl").write_text('{"text": "a short held-out sentence"}\n' * 4)
    return tmp / "eval"


def test_first_failing_shard_ends_the_others(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="shard model broken"):
        run_suite_sharded(SlowOrBroken(at=str(tmp_path), n_shards=3), _eval_dir(tmp_path), "cpu", shards=3)
    assert time.monotonic() - t0 < 120  # the hanging shards sleep 150 s
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 3 and _gone_within(pids, 10)


def test_shards_end_with_a_killed_parent(tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
              "from pathlib import Path\n"
              "from test_suite_shards import SlowOrBroken\n"
              "from tailor.eval.harness import run_suite_sharded\n"
              "if __name__ == '__main__':\n"
              f"    Path({str(tmp_path / 'first')!r}).touch()  # every shard hangs\n"
              f"    run_suite_sharded(SlowOrBroken(at={str(tmp_path)!r}), Path({str(_eval_dir(tmp_path))!r}), 'cpu', shards=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        end = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < end and parent.poll() is None:
            time.sleep(0.2)
        pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2, f"shards did not start (parent exit {parent.poll()})"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone_within(pids, 15), "shards outlived their parent"
    finally:
        parent.kill()
        for p in tmp_path.glob("*.pid"):
            try:
                os.kill(int(p.stem), signal.SIGKILL)
            except ProcessLookupError:
                pass
