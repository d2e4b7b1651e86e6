"""The HTML audit report: written from pipeline outputs, self-contained, rendered in headless Chromium."""
from __future__ import annotations

import html
import json
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _suite(seed: int):
    from tailor.eval.harness import ChoiceItem, SuiteResult, WikiItem

    g = np.random.default_rng(seed)

    def item(i, k, label, fields, p):
        ll = tuple(float(v) for v in -10 * g.random(k))
        return ChoiceItem(id=i, hash=f"{p}{i}", ll=ll, nbytes=(10,) * k, label=label,
                          acc=float(int(np.argmax(ll)) == label), acc_norm=0.0, fields=fields)

    return SuiteResult(
        wiki=[WikiItem(id=i, hash=f"w{i}", nll=float(30 + g.random()), tokens=10) for i in range(40)],
        tasks={"piqa": [item(i, 2, i % 2, {}, "p") for i in range(40)],
               "crows": [item(i, 2, 0, {"bias_type": ["age", "religion"][i % 2], "stereo_antistereo": "stereo"}, "c")
                         for i in range(40)],
               "winogender": [item(i, 2, i % 2, {"gender": ["female", "male"][i % 2]}, "g") for i in range(40)]},
        meta={"prefix_token_id": 1})


@pytest.fixture
def root(tmp_path):
    from tailor.config import Gates
    from tailor.eval.gates import check
    from tailor.eval.slices import compare

    metrics, slices = compare(_suite(0), _suite(1), n_boot=200, seed=0)
    ev = tmp_path / "reports" / "evaluate" / "phone"
    ev.mkdir(parents=True)
    for name, obj in (("metrics", metrics), ("slices", slices), ("gates", check(metrics, slices, Gates()))):
        (ev / f"{name}.json").write_text(json.dumps(obj))
    s = tmp_path / "reports" / "search" / "phone"
    s.mkdir(parents=True)
    (s / "candidates.csv").write_text("config_hash,nbytes,kl\na,80000000,2.5\nb,70000000,3.1\nc,90000000,2.0\n")
    (s / "pareto.csv").write_text("nbytes,kl\n70000000,3.1\n80000000,2.5\n")
    (s / "metrics.json").write_text(json.dumps({"bytes": 80000000, "kl": 2.5, "budget_bytes": 81000000}))
    bits = {m: 4 for m in ("q", "k", "v", "o", "gate", "up", "down")}
    cfg = {"version": 1, "embed_bits": 8, "layers": [
        {"keep": True, "kv_groups": 3, "ffn": 1536, "bits": bits | {"v": 8}},
        {"keep": False, "kv_groups": 1, "ffn": 384, "bits": bits}]}
    from tailor.arch import SCHEMA_VERSION

    cfg["version"] = SCHEMA_VERSION
    a = tmp_path / "artifacts" / "search" / "phone"
    a.mkdir(parents=True)
    (a / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "reports" / "calibrate").mkdir(parents=True)
    (tmp_path / "reports" / "calibrate" / "DATA_CARD.md").write_text(
        "# Data card\n\n| input | license |\n|---|---|\n| crows | CC-BY-SA 4.0 |\n")
    (tmp_path / "reports" / "register" / "phone").mkdir(parents=True)
    (tmp_path / "reports" / "register" / "phone" / "metrics.json").write_text(json.dumps({"version": 3}))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    return tmp_path


def test_report_is_self_contained_and_complete(root):
    from tailor.report import ReportError, write_report

    path = write_report(root, "phone")
    assert path == root / "reports" / "audit" / "phone" / "v3.html"
    text = path.read_text()
    assert text.count("<svg") == 4  # CrowS-Pairs and Winogender group bars, Pareto front, bits heatmap
    for needle in ("Release gates", "group_worsening", "CC-BY-SA 4.0", "dvc.lock md5", "git checkout",
                   "tailor evaluate --model", "religion", "piqa"):
        assert needle in text, needle
    # each gate with its interval, its rule and the change it can detect; groups with theirs
    gates = json.loads((root / "reports/evaluate/phone/gates.json").read_text())
    for g in gates["gates"]:
        assert html.escape(g["rule"]) in text and html.escape(g["reason"]) in text, g["name"]
    acc = next(g for g in gates["gates"] if g["name"] == "accuracy_retention")
    assert f"{acc['delta']:+.3f} [{acc['ci_low']:+.3f}, {acc['ci_high']:+.3f}]" in text
    assert "detectable change (80% power)" in text and "Gated groups: the worsening each can detect" in text
    assert gates["verdict"] == "indicative"  # 20 pairs per CrowS group cannot show a 0.10 worsening
    assert "Release gates: <span class=indicative>INDICATIVE</span>" in text
    # offline: nothing fetched (XML namespace URIs inside the SVGs are names, not requests), no JS
    assert not any(x in text for x in ('src="http', "src='http", "<link", "<script", "url(http"))
    with pytest.raises(ReportError, match="records v3"):
        write_report(root, "phone", "7")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it: .ci/run)")
def test_report_renders_plots_in_headless_chromium(root, tmp_path):
    from tailor.report import write_report

    path = write_report(root, "phone")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}"]
    dom = subprocess.run(args + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 4 and "data-plot=\"crows_pairs-pct_stereotype\"" in dom and "data-plot=\"pareto\"" in dom and "data-plot=\"bits\"" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1100,2400", path.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), float)
    assert img.std() > 10 and (img < 128).mean() > 0.01  # not blank: dark pixels of plots and text


def test_report_lists_groups_too_small_to_gate(root):
    from tailor.config import Gates
    from tailor.eval.gates import check
    from tailor.report import write_report

    ev = root / "reports" / "evaluate" / "phone"
    metrics, slices = json.loads((ev / "metrics.json").read_text()), json.loads((ev / "slices.json").read_text())
    gates = check(metrics, slices, Gates(min_group_n=1000))  # every group is too small
    assert gates["ungated_groups"] and gates["failed_groups"] == []
    (ev / "gates.json").write_text(json.dumps(gates))
    text = write_report(root, "phone").read_text()
    assert f"Too small to gate: {len(gates['ungated_groups'])} group row(s) with n &lt; 1000" in text
    assert "no: n &lt; 1000" in text and "religion" in text
