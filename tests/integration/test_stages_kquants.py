"""The stages on the K-quant phone (params.yaml profile quick-k's device, on the `test` profile's sizes):
the real model sliced to 2 layers goes through calibrate, supernet (the sandwich samples K-quants for
`ffn_down`, IQ4_NL / Q8_0 / F16 elsewhere), search (MIP + NSGA-II; every candidate eligible, costed
exactly, some putting a K-quant on `ffn_down`), then the best of those through finetune (QAT on the
K grid) and export, whose own parity check (llama.cpp's perplexity within export.max_ppl_rel_diff of the
fake-quantized model's) must pass, and whose file holds the chosen types in exactly the bytes the cost
model counted."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tailor.config import parse_params

ROOT = Path(__file__).resolve().parents[2]
# slow: ~6 min alone (17 min on a shared machine); the K-quant export path stays in `make test` through
# test_export_gguf_ktypes.py and the search through tests/unit/test_kquant_choices.py
pytestmark = [pytest.mark.integration, pytest.mark.slow]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "F16"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    test = raw["profiles"]["test"]
    test["model"]["n_layers"] = 2
    test["search"]["strategies"] = ["mip", "nsga"]
    test["devices"]["phone"].update(allowed_bits=None, allowed_types=K_TYPES)
    root = tmp_path_factory.mktemp("kstages")
    return {"root": root, "params": parse_params(raw, "test"), "art": root / "artifacts"}


def test_k_phone_stages(ws):
    from gguf import GGUFReader

    from steps import calibrate, export, finetune, search, supernet
    from tailor.arch import BaseArch
    from tailor.models.base import load_model_dir
    from tailor.quant.gguf_pack import ggml_type

    p, art = ws["params"], ws["art"]
    calibrate.run(p, art / "calibrate")
    out = supernet.run(p, art / "calibrate", art / "supernet", ws["root"] / "ckpt")
    assert out["metrics"]["formats"]["gguf"] == ["Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", 8, 16]

    s = search.run(p, "phone", art / "supernet", art / "calibrate", art / "search" / "phone")
    m = s["metrics"]
    assert m["bytes"] <= m["budget_bytes"] and set(m["strategies"]) == {"mip", "nsga"}
    arch = BaseArch.from_hf(load_model_dir(art / "supernet" / "model").config)
    for c in s["candidates"]:
        c.config.validate(arch)  # every candidate eligible (a K-quant only on whole 256s)
        assert c.nbytes == c.config.nbytes(arch, "gguf")
    k_down = lambda c: any(lc.keep and str(lc.bits["down"]).endswith("_K") for lc in c.config.layers)  # noqa: E731
    with_k = [c for c in s["candidates"] if k_down(c) and c.nbytes <= m["budget_bytes"]]
    assert with_k, "no candidate puts a K-quant on ffn_down"
    # fine-tune and export the best candidate with a K-quant (the winner may not have one at this budget)
    cfg = min(with_k, key=lambda c: c.rank_kl).config
    (art / "search" / "phone" / "config.json").write_text(cfg.to_json())

    finetune.run(p, "phone", art / "supernet", art / "search" / "phone", art / "calibrate",
                 art / "finetune" / "phone", ws["root"] / "ckpt-ft")
    e = export.run(p, "phone", art / "finetune" / "phone", art / "calibrate" / "eval", art / "export" / "phone")
    em = e["metrics"]
    print(f"\nchosen {cfg.to_json()}\nexport {json.dumps(em, default=str)[:600]}")
    tensors = {t.name: t for t in GGUFReader(e["file"]).tensors}
    assert sum(int(t.n_bytes) for t in tensors.values()) == cfg.nbytes(replace(arch, n_layers=len(cfg.layers)), "gguf")
    for i, lc in enumerate(lc for lc in cfg.layers if lc.keep):
        assert tensors[f"blk.{i}.ffn_down.weight"].tensor_type == ggml_type(lc.bits["down"])
    assert abs(em["file_bytes"] - em["predicted_file_bytes"]) <= 64
