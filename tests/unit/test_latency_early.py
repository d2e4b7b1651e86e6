"""The latency subnets are known before the supernet trains (steps.search.latency_space), so the flow's early
`--latency-only` job can time them beside the supernet; their cache entry is measured once, however many
processes ask (tailor.search.latency.measured_once)."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from steps import search
from tailor.arch import BaseArch
from tailor.config import parse_params
from tailor.search import latency
from tailor.search.sampled import seeds

ROOT = Path(__file__).resolve().parents[2]
ARCH = BaseArch(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152)


@pytest.fixture
def params(monkeypatch):
    monkeypatch.setattr(search, "arch_of", lambda model: ARCH)  # SmolLM2-135M's shape, no weights needed
    return parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()), "full")


def _timed(params, device: str, space) -> list[str]:
    prof = params.device(device)
    cfgs = latency.timed_configs(space, prof.format, params.search.latency_configs, seeds(space),
                                 prof.allowed_types is not None)
    return [c.hash for c in cfgs]


@pytest.mark.parametrize("device", ["phone", "laptop"])
def test_the_latency_subnets_do_not_depend_on_the_supernets_drop_order(params, device):
    sp = params.supernet
    order = list(range(ARCH.n_layers))
    random.Random(0).shuffle(order)  # what importance.measure might find
    meta = {"formats": params.supernet_formats(), "min_ffn_frac": sp.min_ffn_frac, "min_kv_groups": sp.min_kv_groups,
            "max_drop_frac": sp.max_drop_frac, "drop_order": order}
    early = _timed(params, device, search.latency_space(params, device, None))  # before the supernet: params only
    in_search = _timed(params, device, search.latency_space(params, device, None, meta))  # the search: space.json
    assert early == in_search and len(early) >= params.search.latency_configs
    # the importance order does change which subnets the search's own space holds: the test can tell them apart
    assert _timed(params, device, search.device_space(params, device, None, meta)) != early


def test_an_entry_is_measured_once_and_a_second_asker_waits_for_it(tmp_path):
    calls, got = [], {}

    def measure() -> list[dict]:
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # the second asker arrives while this one measures
        return [{"measured_ms": 1.5}]

    def ask(name: str) -> None:
        got[name] = latency.measured_once(tmp_path / "lat" / "k.json", measure)

    first = threading.Thread(target=ask, args=("first",), name="first")
    first.start()
    time.sleep(0.1)
    ask("second")
    first.join()
    assert calls == ["first"]
    assert got["first"] == ([{"measured_ms": 1.5}], False) and got["second"] == ([{"measured_ms": 1.5}], True)


def test_an_unreadable_entry_is_measured_again_and_a_failed_measure_leaves_none(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('[{"measured_ms": 1')  # cut short
    assert latency.measured_once(path, lambda: [{"measured_ms": 2.0}]) == ([{"measured_ms": 2.0}], False)

    def boom() -> list[dict]:
        raise RuntimeError("llama.cpp could not load the model")

    with pytest.raises(RuntimeError):
        latency.measured_once(tmp_path / "other.json", boom)
    assert not (tmp_path / "other.json").exists()


def test_a_holder_that_never_finishes_does_not_hang_the_search(tmp_path):
    """wait_s: after it the asker measures itself (the search passes what is left of its LATENCY_WAIT_S)."""
    import fcntl

    path, got = tmp_path / "k.json", []
    asker = threading.Thread(target=lambda: got.append(latency.measured_once(path, lambda: [{"measured_ms": 3.0}],
                                                                            wait_s=0.5)))
    with open(path.with_name(path.name + ".lock"), "a+") as held:  # the early job, hung on a busy CPU
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        asker.start()
        asker.join(10)
        waited = time.monotonic() - t0
        hung = asker.is_alive()
    asker.join()  # released: a blocked asker ends now instead of hanging the suite
    assert not hung and got == [([{"measured_ms": 3.0}], False)] and 0.5 <= waited < 10
    assert latency.measured_once(path, lambda: pytest.fail("measured again"))[1] is True


def test_the_latency_only_command_refuses_an_unknown_device_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "steps.search", "--latency-only", "--params", str(ROOT / "params.yaml"),
                           "--devices", "phone,watch"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("tailor search: ") and "watch" in lines[0]


def test_a_device_choice_the_supernet_did_not_train_is_refused_by_name(params):
    """dvc.yaml's supernet does not depend on `devices`: a choice added after it trained must not vanish from the
    search silently."""
    from tailor.config import ConfigError

    sp = params.supernet
    meta = {"formats": params.supernet_formats(), "min_ffn_frac": sp.min_ffn_frac, "min_kv_groups": sp.min_kv_groups,
            "max_drop_frac": sp.max_drop_frac, "drop_order": list(range(ARCH.n_layers))}
    assert search.device_space(params, "phone", None, meta).arch == ARCH
    fmt = params.device("phone").format
    dropped = params.device("phone").choices[0]
    stale = {**meta, "formats": {**meta["formats"], fmt: [c for c in meta["formats"][fmt] if c != dropped]}}
    with pytest.raises(ConfigError, match=rf"devices\.phone\.allowed_\w+: \[{dropped!r}\] not trained"):
        search.device_space(params, "phone", None, stale)
