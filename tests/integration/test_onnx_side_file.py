"""An ONNX model over protobuf's 2 GB keeps its weights in `model.onnx.data`: the artifact is both files,
and export, register and promote hash, log and check the same two (the limit is forced down on a tiny
model). Before the export seam, register hashed `model.onnx` alone and refused every such model."""
from __future__ import annotations

import json

import pytest

from tailor import promote, tracking
from tailor.arch import SubnetConfig
from tailor.elastic.supernet import export_active
from tailor.export import onnx as onnx_writer
from tailor.export import ort
from tailor.formats import backend
from tailor.models.base import build_model
from tailor.models.tiny import tiny_hf_model

pytestmark = pytest.mark.integration


def test_two_file_artifact_registers_and_promotes(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_writer, "PROTOBUF_LIMIT", 1)  # every model is "too big" for one protobuf
    monkeypatch.setenv(promote.AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    hf = tiny_hf_model("qwen2", seed=2)
    dense = build_model(hf.config.to_dict(), hf.state_dict(), "tiny-qwen2")
    from tailor.arch import BaseArch

    small = export_active(dense, SubnetConfig.uniform(BaseArch.from_hf(dense.config), 4, embed_bits=8), "onnx")
    out = tmp_path / "export"
    info = onnx_writer.export(small, None, out / "model.onnx")
    be = backend("onnx")
    files = be.files(out)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert be.sha256(out) == info["sha256"]
    assert ort.session(out / "model.onnx") is not None  # onnxruntime finds the side file

    tags = {"sha256": info["sha256"], "format": "onnx", "gates_passed": "True", "gate.ppl_increase": "pass"}
    (tmp_path / "gates.json").write_text(json.dumps({"passed": True, "gates": [{"name": "ppl_increase", "passed": True}]}))
    with tracking.stage_run("register", "laptop") as tr:
        v, created = tracking.register("tailor-laptop", tr, files, tags, "candidate",
                                       evidence={"gates": tmp_path / "gates.json"})
    assert created
    assert promote.verify("tailor-laptop", v)["sha256"] == info["sha256"]  # both files re-hashed, in order
    (out / "model.onnx.data").write_bytes(b"other weights")
    assert be.sha256(out) != info["sha256"]  # the hash covers the side file: a changed weight file shows
