"""`tailor run --model DIR` on Hugging Face directories a user would bring (tiny random Qwen2 with q/k/v
biases and an untied head; tiny Llama with an untied head): the whole nightly flow on the `test` profile,
both exports verified in their runtimes, the registry recording which base model each version came from."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from test_flow_e2e import _project  # noqa: E402 (tests/integration is on sys.path under pytest)

from tailor.models.base import base_dir
from tailor.models.source import resolve
from tailor.models.tiny import save_tiny_hf_dir

pytestmark = pytest.mark.integration
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)


# `make test` runs one user model through the whole flow, its GGUF branch; `make test-all` adds the ONNX
# branch and a Llama directory. What those add is covered faster elsewhere: each family's GGUF and ONNX export
# of an untied, biased, pruned subnet in tests/integration/test_families_export.py, two devices in one flow
# in test_flow_e2e.py, and the Llama family's seam in the end-to-end flow (SmolLM2) and tests/unit/test_families.py.
@pytest.mark.parametrize("family, devices", [("qwen2", "phone"),
                                             pytest.param("qwen2", "phone,laptop", marks=pytest.mark.slow),
                                             pytest.param("llama", "phone", marks=pytest.mark.slow)])
def test_tailor_run_on_a_model_directory(family, devices, tmp_path, monkeypatch, prefect_harness):
    from tailor import tracking
    from tailor.cli import app

    root = _project(tmp_path)
    model_dir = save_tiny_hf_dir(tmp_path / "models" / f"tiny-{family}", family, base_dir(None), seed=1, **SHAPE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("TAILOR_ROOT", str(root))
    monkeypatch.chdir(root)
    res = CliRunner().invoke(app, ["run", "--model", str(model_dir), "--devices", devices,
                                   "--params", str(root / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["source"] == str(model_dir)

    src = resolve(str(model_dir))
    recorded = json.loads((root / "artifacts/calibrate/model.json").read_text())
    assert recorded["sha256"] == src.sha256 and recorded["name"] == f"tiny-{family}"
    c = tracking.client()
    for d in devices.split(","):
        ex = json.loads((root / f"reports/export/{d}/metrics.json").read_text())
        assert ex["ppl_rel_diff"] <= 0.02 and ex["weight_bytes"] == ex["predicted_bytes"]
        mv = c.get_model_version_by_alias(f"tailor-{d}", "candidate")
        assert mv.tags["base_model"] == f"tiny-{family}" and mv.tags["base_model_sha256"] == src.sha256
    # the fine-tuned model kept its own head and (Qwen2) its biases
    cfg = json.loads((root / f"artifacts/finetune/{devices.split(',')[0]}/config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["family"] == family
    assert cfg["attention_bias"] is (family == "qwen2")


def test_run_refuses_a_bad_model_in_one_line(tmp_path, monkeypatch):
    from tailor.cli import app

    root = _project(tmp_path)
    before = (root / "params.yaml").read_text()
    res = CliRunner().invoke(app, ["run", "--model", str(tmp_path / "nowhere"), "--params", str(root / "params.yaml")])
    assert res.exit_code == 2 and "--model: model source" in res.output and "not a built-in" in res.output
    assert (root / "params.yaml").read_text() == before  # nothing changed
