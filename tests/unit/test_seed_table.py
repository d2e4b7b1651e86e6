"""benchmarks/seed_table.py's pure helpers: size arithmetic, the 16->8-bit budget of prune-only,
lm-eval's context/continuation split, the choice scorer and the worst-group bias delta."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("seed_table", ROOT / "benchmarks" / "seed_table.py")
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)


def test_bits_per_param_and_budgets():
    n = 134_515_008
    assert st.bits_per_param(n // 2, n) == pytest.approx(4.0, abs=1e-7)
    t = st.target_file_bytes(3.0, n)
    assert st.bits_per_param(t, n) <= 3.0 < st.bits_per_param(t + 1, n)
    assert st.weight_budget(t, 1_800_000, 1000) == t - 1_801_000


def test_prune16_budget_keeps_every_8bit_conversion_under_the_target():
    import torch

    from tailor.arch import MATRICES, BaseArch, SubnetConfig
    from tailor.elastic.space import SearchSpace
    from tailor.quant.formats import embedding_bytes, vector_bytes

    arch = BaseArch(n_layers=6, hidden=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn=384, vocab=512)
    space = SearchSpace.build(arch, [16], [4], 0.25, 1, 0.34)
    w8 = 700_000
    fixed = embedding_bytes("gguf", 4, arch.vocab, arch.hidden) + vector_bytes("gguf", arch.hidden)
    b16 = st.prune16_budget(w8, fixed, 2 * arch.n_layers * vector_bytes("gguf", arch.hidden))
    gen = torch.Generator().manual_seed(0)
    fitting, slack = 0, []
    for _ in range(300):
        cfg = space.sample(gen)
        if cfg.nbytes(arch, "gguf") > b16:
            continue
        fitting += 1
        q8 = SubnetConfig(tuple(replace(lc, bits={m: 8 for m in MATRICES}) for lc in cfg.layers), cfg.embed_bits)
        assert q8.nbytes(arch, "gguf") <= w8
        slack.append(w8 - q8.nbytes(arch, "gguf"))
    assert fitting > 20 and min(slack) < 0.1 * w8  # the bound holds and is not loose


def test_encode_pair_follows_lm_eval():
    vocab: dict[str, int] = {}

    def enc(s: str) -> list[int]:  # one token per whitespace-led word, like a BPE on these strings
        words = s.replace(" ", "\0 ").split("\0")
        return [vocab.setdefault(w, len(vocab) + 10) for w in words if w]

    ctx, cont = st.encode_pair(enc, "Question: why?\nAnswer:", " because", prefix_id=1)
    assert ctx == enc("Question: why?\nAnswer:") and cont == enc(" because")
    ctx, cont = st.encode_pair(enc, "Answer: ", "yes", prefix_id=1)  # trailing space moves to the continuation
    assert ctx == enc("Answer:") and cont == enc(" yes")
    assert st.encode_pair(enc, "", "A sentence.", prefix_id=1) == ([1], enc("A sentence."))


def test_continuation_loglik_on_a_tiny_case():
    rows = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))  # already log-probabilities
    assert st.continuation_loglik(rows, [0, 2]) == pytest.approx(np.log(0.5) + np.log(0.8))
    shifted = rows + np.array([[3.0], [-7.0]])  # logits: any per-row constant cancels
    assert st.continuation_loglik(shifted, [1, 0]) == pytest.approx(np.log(0.25) + np.log(0.1))
    with pytest.raises(ValueError, match="2 logit rows for a continuation of 1"):
        st.continuation_loglik(rows, [0])


def test_worst_group_delta_and_choice_items():
    def rows(prefs):  # (group, stereotyping sentence preferred)
        return [{"id": i, "ll": [-1.0, -2.0] if p else [-2.0, -1.0], "nbytes": [5, 5], "label": 0,
                 "fields": {"bias_type": g, "stereo_antistereo": "stereo"}} for i, (g, p) in enumerate(prefs)]

    base = st.choice_items(rows([("age", 0), ("age", 1), ("race", 1), ("race", 0)]))
    model = st.choice_items(rows([("age", 1), ("age", 1), ("race", 0), ("race", 0)]))
    w = st.worst_group_delta(model, base, "crows")
    assert (w["group"], w["delta"], w["n"], w["groups"]) == ("age", 0.5, 2, 2)
    assert st.worst_group_delta(base, base, "crows")["delta"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        st.worst_group_delta(model[:3], base[:3][::-1], "crows")


def test_row_plan_covers_every_method_at_every_budget():
    plan = st.row_plan()
    assert {k for _, k, _ in plan} == set(st.METHODS)
    for bpp in st.BUDGETS:
        assert {k for _, k, b in plan if b == bpp} == set(st.SEARCHED)
    assert len({rid for rid, _, _ in plan}) == len(plan)


_gspec = importlib.util.spec_from_file_location("seed_table_gpu", ROOT / "benchmarks" / "seed_table_gpu.py")
gpu = importlib.util.module_from_spec(_gspec)
_gspec.loader.exec_module(gpu)


def test_gpu_rows_come_back_whole_or_not_at_all(tmp_path, monkeypatch):
    """What the GPU machine packs (zstd, <= CHUNK pieces) unpacks here to the same bytes; a lost or
    damaged chunk is refused by the recorded sha256 and leaves no model.gguf behind."""
    import json

    monkeypatch.setattr(gpu, "CHUNK", 1000)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 16, 5000, dtype=np.uint8).tobytes()  # compressible, like 4-bit codes
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.gguf").write_bytes(data)
    gpu.pack(src / "model.gguf", src)
    parts = sorted(src.glob("part*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 1000 for p in parts)
    back = tmp_path / "back"
    back.mkdir()
    for p in parts:
        (back / p.name).write_bytes(p.read_bytes())
    (back / "meta.json").write_text(json.dumps({"sha256": gpu.sha256(src / "model.gguf")}))
    assert gpu.unpack(back).read_bytes() == data

    (back / "model.gguf").unlink()
    (back / parts[-1].name).unlink()
    with pytest.raises(SystemExit, match="decompress|sha256"):
        gpu.unpack(back)
    assert not (back / "model.gguf").exists() and not list(back.glob(".model*"))


def test_gpu_jobs_collect_and_gather_round_trip(tmp_path, monkeypatch, capsys):
    """collect puts every job's meta.json in one metas.json and the named parts beside it (the device
    returns at most 8 files); gather sorts them back into one folder per recipe and row; wait returns
    at once when the job's process is gone, whether or not its rows finished."""
    import json
    import subprocess
    import sys

    out = tmp_path / "jobs"
    d = out / "job0" / "tailor_4.0"
    d.mkdir(parents=True)
    meta = {"id": "tailor@4.0", "recipe": gpu.recipe_tag({"lr": 1e-4, "schedule": "cosine"}), "kl_after": 0.3,
            "torch_ppl": 240.0}
    (d / "meta.json").write_text(json.dumps(meta))
    for k in range(3):
        (d / f"part{k:02d}").write_bytes(bytes([k]) * 10)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    (out / "jobs.json").write_text(json.dumps({"jobs": [{"gpu": 0, "rows": ["tailor@4.0", "qat4"], "lr": 1e-4,
                                                         "schedule": "cosine"}], "pids": {"0": done.pid}}))
    assert not gpu.alive(done.pid)
    assert gpu.wait(out, timeout=60, every=0.1) is True  # qat4 never finished, but its process is gone

    ret = tmp_path / "ret1"
    gpu.collect(out, ret, ["cosine-1e-04/tailor@4.0:0-1", "cosine-1e-04/qat4:0-3"])
    assert sorted(p.name for p in ret.iterdir()) == ["cosine-1e-04_tailor_4.0_part00", "cosine-1e-04_tailor_4.0_part01",
                                                     "metas.json"]
    assert "qat4: not finished" in capsys.readouterr().out
    ret2 = tmp_path / "ret2"
    gpu.collect(out, ret2, ["cosine-1e-04/tailor@4.0:2-2"])  # the rest of the file, on a later call
    rows = gpu.gather([ret, ret2], tmp_path / "back")
    assert [r.name for r in rows] == ["cosine-1e-04_tailor_4.0"]
    assert sorted(p.name for p in rows[0].iterdir()) == ["meta.json", "part00", "part01", "part02"]
    assert (rows[0] / "part02").read_bytes() == bytes([2]) * 10
    assert json.loads((rows[0] / "meta.json").read_text()) == meta


def test_collected_file_names_use_only_characters_the_device_returns(tmp_path):
    """The device drops a returned file whose name has characters beyond letters, digits and `._-`: a row
    variant's "+" (tailor-k@4.0+emb) must not reach a file name, and gather must still find the row."""
    import json
    import re

    out = tmp_path / "jobs"
    d = out / "job0" / gpu.slug("tailor-k@4.0+emb")
    d.mkdir(parents=True)
    meta = {"id": "tailor-k@4.0+emb", "recipe": "kgrid", "kl_after": 0.2, "torch_ppl": 280.0}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "part00").write_bytes(b"x")
    ret = tmp_path / "ret"
    gpu.collect(out, ret, ["kgrid/tailor-k@4.0+emb:0-0"])
    names = sorted(p.name for p in ret.iterdir())
    assert len(names) == 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    rows = gpu.gather([ret], tmp_path / "back")
    assert len(rows) == 1 and json.loads((rows[0] / "meta.json").read_text())["id"] == "tailor-k@4.0+emb"
    assert (rows[0] / "part00").read_bytes() == b"x"
