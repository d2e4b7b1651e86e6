"""benchmarks/kquant_gpu.py and kquant_table.py, the parts the K-grid rows rely on: the profile the GPU run
trains and searches (the phone on the K-quant grid, no Gumbel), each row's search under its byte budget
(bits-only keeps the whole structure; a budget under the space's floor is reported, not searched), the
constants the budgets are computed from, and the table's comparisons."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import kquant_gpu as kg
from benchmarks import kquant_table as kt
from steps.supernet import space_for
from tailor.distill import teacher_logits
from tailor.elastic.space import SearchSpace
from tailor.models.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_k_params_put_the_phone_on_the_k_grid_at_the_full_budget():
    p = kg.k_params("full")
    phone = p.device("phone")
    assert phone.allowed_types == kg.GRID and phone.embed_bits == 4
    assert set(p.supernet_formats()) == {"gguf"}  # the laptop's ONNX grid is not trained here
    assert set(map(str, p.supernet_formats()["gguf"])) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "8", "16"}
    assert "gumbel" not in p.search.strategies
    assert (p.finetune.steps, p.finetune.batch_size, p.calibrate.seq_len) == (1000, 32, 512)  # seed_table_gpu's budget
    tiny = kg.k_params("tiny")
    assert tiny.model.n_layers == 2 and tiny.finetune.steps < 10
    assert kg.k_params("full", 200, 0, 1e-4).finetune.lr == 1e-4  # Qwen's rows: a lower peak than SmolLM2's


def test_budget_constants_are_smollm2s():
    from tailor.arch import SubnetConfig
    from tailor.elastic.supernet import arch_of
    from tailor.models.base import load_base

    base, _ = load_base(None)
    arch = arch_of(base)
    assert SubnetConfig.max(arch).param_count(arch) == kg.N_PARAMS
    seed = json.loads((ROOT / "reports" / "bench" / "seed_table.json").read_text())
    row = next(r for r in seed["rows"] if r["id"] == "base")
    assert row["file_bytes"] - row["build"]["weight_bytes"] == kg.OVERHEAD
    # a file of the weight budget plus the non-weight bytes stays under the bits/param target, 64 KiB spare
    for bpp in (4.0, 3.0):
        file_bytes = kg.weight_budget(bpp) + kg.OVERHEAD
        assert 8 * file_bytes / kg.N_PARAMS <= bpp
        assert 8 * (file_bytes + 2 * kg.SIZE_MARGIN) / kg.N_PARAMS > bpp


def _search() -> kg.Search:
    s = object.__new__(kg.Search)
    s.params = kg.k_params("full")
    model = tiny_model(n_layers=3, intermediate_size=512)  # ffn_down 512 wide: K-quants fit, widths 256 / 512
    s.model, s.teacher = model, copy.deepcopy(model).eval()
    p = s.params
    s.space = space_for(p, model, [2, 1, 0], p.supernet_formats()["gguf"])
    s.search_space = SearchSpace.build(s.space.arch, list(s.space.bits), [kg.EMBED_BITS], p.supernet.min_ffn_frac,
                                       p.supernet.min_kv_groups, p.supernet.max_drop_frac, [2, 1, 0])
    s.val = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    s.t_val = teacher_logits(s.teacher, s.val)
    s.n_params, s.overhead, s.tables = 10**6, 0, {}
    return s


def test_joint_search_fits_its_budget_and_cuts_something():
    s = _search()
    res = s.search_row({"id": "j", "kind": "joint", "frac": 0.7})
    from tailor.arch import SubnetConfig

    a = s.space.arch
    budget = int(0.7 * SubnetConfig.max(a, embed_bits=4).nbytes(a, "gguf"))
    cfg = SubnetConfig.from_dict(res["config"])
    assert res["budget_bytes"] == budget and res["weight_bytes"] == cfg.nbytes(a, "gguf") <= budget
    assert cfg.embed_bits == 4
    assert any(b != 16 for lc in cfg.layers for b in lc.bits.values())
    assert res["search_kl"] == min(c["kl"] for c in res["candidates"] if c["bytes"] <= budget)


def test_search_min_kv_groups_holds_every_layers_attention_and_refuses_an_impossible_floor():
    import argparse

    from tailor.arch import SubnetConfig

    s = _search()
    a = s.space.arch
    s.args = argparse.Namespace(search_min_kv_groups=a.n_kv_heads)
    s.search_space = s.joint_space([2, 1, 0])
    assert s.search_space.min_kv == a.n_kv_heads
    res = s.search_row({"id": "j", "kind": "joint", "frac": 0.7})
    cfg = SubnetConfig.from_dict(res["config"])
    assert all(lc.kv_groups == a.n_kv_heads for lc in cfg.layers if lc.keep)
    assert cfg.nbytes(a, "gguf") <= res["budget_bytes"]
    s.args = argparse.Namespace(search_min_kv_groups=None)  # the profile's floor: cuts allowed
    assert s.joint_space([2, 1, 0]).min_kv == s.params.supernet.min_kv_groups < a.n_kv_heads
    s.args = argparse.Namespace(search_min_kv_groups=a.n_kv_heads + 1)
    with pytest.raises(SystemExit, match="KV groups a layer"):
        s.joint_space([2, 1, 0])


def test_zero_supernet_steps_leave_the_weights_as_they_are():
    import argparse

    s = _search()
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.args = argparse.Namespace(profile="full", supernet_steps=0, supernet_s=60.0, supernet_compile=False)
    res = s.supernet()
    assert res["steps"] == 0 and res["val_kl_before"] == res["val_kl_after"]
    assert res["val_kl_after"]["max"] < 1e-6 < res["val_kl_after"]["min"]  # the base itself at max; cuts cost
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in before.items())


def test_bits_only_keeps_the_structure_and_reports_a_budget_below_its_floor():
    from tailor.arch import SubnetConfig

    s = _search()
    a = s.space.arch
    res = s.search_row({"id": "b", "kind": "bits", "frac": 0.6})
    cfg = SubnetConfig.from_dict(res["config"])
    assert all(lc.keep and lc.ffn == a.ffn and lc.kv_groups == a.n_kv_heads for lc in cfg.layers)
    assert cfg.nbytes(a, "gguf") <= res["budget_bytes"]
    low = s.search_row({"id": "b", "kind": "bits", "frac": 0.2})  # under every all-layers subnet
    assert "config" not in low
    assert low["infeasible"][0]["infeasible"].startswith("smallest subnet of the space")


def _row(rid: str, bpp: float, wiki: float, boolq: float, piqa: float, tps: float, source: str) -> dict:
    return {"id": rid, "bits_per_param": bpp, "ppl_wiki": wiki, "ppl_boolq_passages": boolq, "piqa": piqa,
            "tokens_per_s": tps, "source": source}


def test_kgrid_effects_compare_each_k_row_with_its_q4_0_row():
    rows = [_row("tailor-k@4.0", 4.0, 236.2, 18.54, 0.517, 110, "Tailor K-grid (kquant_gpu)"),
            _row("seed:tailor@4.0", 4.0, 237.9, 18.70, 0.483, 197, "Tailor (seed_table_gpu)"),
            _row("iq4nl-qat", 4.61, 237.9, 17.68, 0.5, 101, "Tailor K-grid (kquant_gpu)")]  # its seed:qat4 missing
    out = kt.kgrid_effects(rows)
    assert len(out) == 1
    assert "wiki ppl 237.9 -> 236.2 (-0.7%)" in out[0] and "(-0.9%)" in out[0] and "PIQA 0.483 -> 0.517" in out[0]


def test_speed_verdict_says_who_is_faster():
    res = {"base_tokens_per_s": 40.0, "seed_base": {"tokens_per_s": 80.0},
           "rows": [_row("base", 16, 1, 1, 0, 40, "base"), _row("q4_k_m", 6, 1, 1, 0, 60, "llama.cpp"),
                    _row("tailor-k@4.0", 4, 1, 1, 0, 100, "Tailor K-grid (kquant_gpu)"),
                    _row("seed:qat4", 4.6, 1, 1, 0, 120, "Tailor (seed_table_gpu)")]}
    v = kt.speed_verdict(res)
    assert "llama.cpp mixes 1.50-1.50x" in v and "tailor-k@4.0 2.50x" in v and "seed:qat4 1.50x" in v  # seed: its own base
    assert "every Tailor file decodes faster" not in v  # seed:qat4 1.50x is not faster than q4_k_m 1.50x
    res["rows"][1]["tokens_per_s"] = 50
    assert "every Tailor file decodes faster than every llama.cpp mix" in kt.speed_verdict(res)


@pytest.mark.parametrize("lc", [300.18, "RuntimeError: no llama.cpp"])
def test_gpu_run_notes_state_the_grid_check_and_parity(tmp_path, lc):
    run = {"search": {"gpu": "H200", "supernet": {"steps": 60, "student_tokens": 3932160, "seconds": 240.8,
                                                   "val_kl_before": {"min": 6.27, "mid": 1.97, "max": 0.0003},
                                                   "val_kl_after": {"min": 3.65, "mid": 1.65, "max": 0.0537}}},
           "rows": {"tailor-k@4.0": {"train_seconds": 1080.3, "tokens_per_s": 15167, "compile": "on", "kl_before": 0.8,
                                     "kl_after": 0.22, "file_holds_model_grid": True, "ppl_docs": 500,
                                     "torch_ppl": 300.59, "llamacpp_ppl": lc}}}
    path = tmp_path / "kquant_gpu.json"
    path.write_text(json.dumps(run))
    notes = kt.gpu_run(path)
    assert notes[0].startswith("K-grid supernet: 60 sandwich steps (3,932,160 student tokens) in 241 s")
    assert "bit for bit: True" in notes[1]
    assert ("300.18 (-0.14%)" in notes[1]) if isinstance(lc, float) else ("RuntimeError" in notes[1])
    assert kt.gpu_run(tmp_path / "missing.json") == []


def test_a_solution_over_the_budget_is_never_chosen(monkeypatch):
    """The dense max subnet has the least KL of all: offered beside one that fits, the fitting one wins."""
    from tailor.arch import SubnetConfig
    from tailor.search import mip

    s = _search()
    a = s.space.arch
    small = SubnetConfig.uniform(a, "IQ4_NL", embed_bits=4)
    monkeypatch.setattr(mip, "solutions", lambda *args, **kw: [SubnetConfig.max(a, embed_bits=4), small])
    res = s.search_row({"id": "j", "kind": "joint", "frac": 0.5})
    assert SubnetConfig.from_dict(res["config"]).hash == small.hash
    assert len(res["candidates"]) == 2


def test_piqa_all_pairs_each_row_with_the_base_and_refuses_a_changed_file(tmp_path):
    from tailor.hashing import sha256_file

    f = tmp_path / "k.gguf"
    f.write_bytes(b"trained file")
    ids = list(range(8))
    base = {"file": str(tmp_path / "base.gguf"), "sha256": "0", "acc": 0.5, "n": 8, "seconds": 1.0, "ids": ids,
            "correct": [1, 1, 1, 1, 0, 0, 0, 0]}
    row = {"file": str(f), "sha256": sha256_file(f), "acc": 0.375, "n": 8, "seconds": 1.0, "ids": ids,
           "correct": [1, 1, 1, 0, 0, 0, 0, 0]}
    for name, run in (("base", base), ("k", row)):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    files = {"base": str(tmp_path / "base.json"), "k": str(tmp_path / "k.json")}
    out = kt.piqa_all(files, [{"id": "k"}])
    assert out["k"]["vs_base"]["ratio"] == pytest.approx(0.75)  # 3 of 8 against 4 of 8
    lo, hi = out["k"]["vs_base"]["ci95"]
    assert lo < 0.75 < hi <= 1.0  # paired: the row is never right where the base is wrong
    assert "vs_base" not in out["base"]
    f.write_bytes(b"another file")
    with pytest.raises(SystemExit, match="changed since its PIQA run"):
        kt.piqa_all(files, [{"id": "k"}])
    with pytest.raises(SystemExit, match="needs base"):
        kt.piqa_all({"k": files["k"]}, [{"id": "k"}])
    assert kt.piqa_all({}, []) == {}


def test_carried_rows_keep_what_was_not_rebuilt_only_when_the_base_reproduces(tmp_path):
    def row(rid, wiki, src="llama.cpp"):
        return {"id": rid, "source": src, "ppl_wiki": wiki, "ppl_boolq_passages": 17.5, "piqa": 0.5, "tokens_per_s": 9.0}

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"base_tokens_per_s": 20.0, "rows": [
        row("base", 245.7, "base"), row("q4_k_m", 258.5), row("tailor-k@4.0", 236.2, "Tailor K-grid"),
        row("seed:qat4", 223.2, "Tailor (seed_table_gpu)")]}))
    built = [row("base", 245.7, "base"), row("tailor-k@4.0", 230.0, "Tailor K-grid")]
    got = kt.carried_rows(old, built)
    assert [r["id"] for r in got] == ["q4_k_m"]  # the rebuilt row wins; seed: rows are re-read elsewhere
    assert got[0]["carried_from"] == str(old) and got[0]["base_tokens_per_s_then"] == 20.0
    assert kt.speedup(got[0], {"base_tokens_per_s": 30.0, "seed_base": None}) == pytest.approx(9.0 / 20.0)
    assert got[0]["base_then"]["ppl_wiki"] == 245.7
    built[0]["ppl_wiki"] = 245.7 * (1 + 2e-4)  # another CPU's float sums: still the same base
    assert [r["id"] for r in kt.carried_rows(old, built)] == ["q4_k_m"]
    built[0]["ppl_wiki"] = 245.7 * (1 + 1e-2)  # another base: the old rows no longer compare
    with pytest.raises(SystemExit, match="base ppl_wiki .* is not reproduced"):
        kt.carried_rows(old, built)
    with pytest.raises(SystemExit, match="need their base row"):
        kt.carried_rows(old, built[1:])
    # carried again from a table that itself carried it: it keeps where it was measured and its base's speed
    built[0]["ppl_wiki"] = 245.7
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"base_tokens_per_s": 34.0, "rows": [row("base", 245.7, "base"), *got]}))
    again = kt.carried_rows(newer, built)
    assert [(r["id"], r["carried_from"], r["base_tokens_per_s_then"]) for r in again] == [("q4_k_m", str(old), 20.0)]


def test_carried_piqa_runs_only_beside_the_same_base_file(tmp_path):
    old = tmp_path / "old.json"
    run = {"acc": 0.6, "n": 1500, "sha256": "b1", "seconds": 1.0}
    old.write_text(json.dumps({"piqa_all": {"base": run, "tailor-k@3.0": {**run, "sha256": "t3"},
                                            "tailor-k@4.0": {**run, "sha256": "old4"}}}))
    rows = [{"id": "tailor-k@3.0", "carried_from": str(old)}, {"id": "tailor-k@4.0"}]  # 4.0 rebuilt here
    here = {"base": run, "tailor-k@4.0": {**run, "sha256": "new4"}}
    got = kt.carried_piqa(old, here, rows)
    assert set(got) == {"base", "tailor-k@3.0", "tailor-k@4.0"}
    assert got["tailor-k@3.0"]["carried_from"] == str(old) and got["tailor-k@4.0"]["sha256"] == "new4"
    with pytest.raises(SystemExit, match="another base file"):
        kt.carried_piqa(old, {**here, "base": {**run, "sha256": "b2"}}, rows)
    with pytest.raises(SystemExit, match="needs base=JSON"):
        kt.carried_piqa(old, {"tailor-k@4.0": here["tailor-k@4.0"]}, rows)
    assert kt.carried_piqa(old, here, rows[1:]) == here  # nothing carried, nothing added


def test_rows_by_id_pick_kind_and_budget_and_refuse_an_unknown_one():
    plan = kg.rows_plan(False, ["tailor-k@4.0", "bits-k@3.0", "bits-k", "iq4nl-qat"])
    assert [(r["kind"], r.get("bpp")) for r in plan] == [("joint", 4.0), ("bits", 3.0), ("bits", None), ("uniform", None)]
    assert [r["id"] for r in kg.rows_plan(False)] == ["iq4nl-qat", "tailor-k@4.0", "tailor-k@3.0", "bits-k"]
    for bad in ("tailor-k", "bits-k@four", "q4_k_m"):
        with pytest.raises(SystemExit, match=bad.split("@")[-1]):
            kg.rows_plan(False, [bad])


@pytest.fixture(scope="module")
def twin_setup(tmp_path_factory):
    """A tiny Llama with 256-multiple rows, a pruned K-quant config, and its 'trained' file: the same
    config exported from weights that moved (as a fine-tune moves them)."""
    from transformers import AutoTokenizer

    from tailor.arch import LayerConfig, SubnetConfig
    from tailor.elastic.supernet import export_active
    from tailor.export.gguf import export
    from tailor.models.base import base_dir

    tok = AutoTokenizer.from_pretrained(base_dir())
    base = tiny_model(vocab=49152, n_layers=2, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=32, intermediate_size=768, seed=5)
    cfg = SubnetConfig((
        LayerConfig(True, 4, 512, {"q": "Q4_K", "k": "Q5_K", "v": "Q6_K", "o": "Q3_K", "gate": "Q2_K",
                                   "up": "IQ4_NL", "down": "Q2_K"}),
        LayerConfig(False, 4, 768, {m: 16 for m in ("q", "k", "v", "o", "gate", "up", "down")}),
    ), embed_bits=8)
    trained = copy.deepcopy(base)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("twin")
    export(export_active(trained, cfg, "gguf"), tok, d / "trained.gguf")
    meta = {"id": "tailor-k@4.0", "config": cfg.to_dict(), "types": kt.tensor_types(d / "trained.gguf"),
            "file_bytes": (d / "trained.gguf").stat().st_size}

    class Ctx:
        made: dict = {}  # config hash -> a file exported before (each export packs K-quants: seconds)

        def export_rtn(self, c, path):
            if c.hash not in self.made:
                export(export_active(base, c, "gguf"), tok, d / f"{c.hash}.gguf")
                self.made[c.hash] = d / f"{c.hash}.gguf"
            shutil.copyfile(self.made[c.hash], path)

    return Ctx(), meta, d


def test_layout_twin_has_the_trained_files_types_and_bytes_not_its_values(twin_setup, tmp_path):
    ctx, meta, d = twin_setup
    kt.layout_twin(ctx, meta, tmp_path / "twin.gguf")
    twin, trained = (tmp_path / "twin.gguf").read_bytes(), (d / "trained.gguf").read_bytes()
    assert len(twin) == len(trained) and twin != trained  # same layout, other weights: not a copy
    other = copy.deepcopy(meta)
    other["config"]["layers"][0]["bits"]["down"] = "Q3_K"  # trained at Q2_K, twin asked at Q3_K: refused
    with pytest.raises(SystemExit, match="layout twin differs"):
        kt.layout_twin(ctx, other, tmp_path / "twin2.gguf")
    assert not (tmp_path / "twin2.gguf").exists()  # nothing half-right left to time


def test_a_row_scored_on_the_gpu_machine_is_read_and_timed_on_its_twin(twin_setup, tmp_path, monkeypatch):
    ctx, meta, _ = twin_setup
    evalset = {"wiki": [[1, 2, 3]], "passages": [[4, 5]], "tasks": {"piqa": []}}
    scored = {"file_bytes": meta["file_bytes"], "ppl_wiki": 250.5, "ppl_boolq_passages": 21.5, "piqa": 0.55,
              "items": {"piqa": []}, "limits": {}}
    rd = tmp_path / "rows" / meta["id"]
    rd.mkdir(parents=True)
    full = {**meta, "llamacpp_eval": scored, "evalset_sha256": kt.evalset_sha256(evalset), "gpu": "H200",
            "finetune": {"steps": 150, "batch_size": 32, "lr": 3e-4, "schedule": "cosine", "warmup_steps": 15}}
    (rd / "gpu_meta.json").write_text(json.dumps(full))
    ctx.work, ctx.tok, ctx.n_params = tmp_path, None, 10_000_000
    monkeypatch.setattr(kt.st, "tokens_per_s", lambda path, tok: 42.0 if path == rd / "twin.gguf" else 0.0)
    other = {**evalset, "wiki": [[1, 2, 4]]}
    with pytest.raises(SystemExit, match="other items"):
        kt.gpu_rows(ctx, other)
    (row,) = kt.gpu_rows(ctx, evalset)
    assert (row["ppl_wiki"], row["piqa"], row["tokens_per_s"]) == (250.5, 0.55, 42.0)
    assert "twin" in row["scored_on"] and kt.row_file(tmp_path, meta["id"]) == rd / "twin.gguf"


def test_running_sees_a_finished_child_as_ended_even_unreaped():
    import subprocess
    import time

    sleeper = subprocess.Popen(["sleep", "30"])
    done = subprocess.Popen(["true"])
    time.sleep(0.5)  # `done` has exited; nobody reaped it: a zombie
    try:
        assert kg.running(sleeper.pid) and not kg.running(done.pid)
        assert not kg.running(2 ** 22 + 12345)  # no such process
    finally:
        sleeper.kill()
        sleeper.wait()
        done.wait()


def _start_rows(tmp_path, monkeypatch, rids, **args) -> tuple[kg.Search, list[list[str]]]:
    """Search.start for each row id on a tiny subnet, its fine-tune processes faked: (the search, each
    started command line; pids 1000, 1001, ...)."""
    import argparse

    from tailor.arch import SubnetConfig
    from tailor.elastic.supernet import arch_of

    started = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            self.pid = 1000 + len(started)
            started.append(cmd)

    monkeypatch.setattr(kg.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(kg.Search, "repo_copy", lambda self: ROOT)
    s = kg.Search(argparse.Namespace(**{**dict(profile="tiny", ft_steps=None, kd_chunk=0, overhead=0, dest=tmp_path,
                                                out=tmp_path, ft_eager=True, ft_checkpointing=False, max_jobs=0,
                                                ft_lr=None), **args}))
    cfg = SubnetConfig.max(arch_of(tiny_model()))
    for rid in rids:
        s.start(rid, cfg, tmp_path, tmp_path)
    return s, started


def test_max_jobs_queues_each_later_row_behind_the_job_that_many_back(tmp_path, monkeypatch):
    _, started = _start_rows(tmp_path, monkeypatch, ("a", "b", "c", "d"), max_jobs=2, ft_lr=5e-5)
    after = [c[c.index("--after") + 1] if "--after" in c else None for c in started]
    assert after == [None, None, "1000", "1001"]
    assert all("--eager" in c and "--checkpointing" not in c for c in started)
    assert all(c[c.index("--lr") + 1] == "5e-05" for c in started)


def _device_dir(tmp_path, eos: str) -> Path:
    """SmolLM2's converted base as another transformers would leave it: its end token `eos`."""
    from tailor.models.base import base_dir

    d = tmp_path / "converted"
    d.mkdir()
    for f in base_dir(None).iterdir():
        (d / f.name).symlink_to(f) if f.name == "model.safetensors" else shutil.copyfile(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": eos}))
    return d


@pytest.mark.parametrize("carried_eos", ["<|im_end|>", "<|im_start|>", None])
def test_convert_base_uses_the_carried_tokenizer_only_where_the_devices_conversion_refuses(tmp_path, monkeypatch,
                                                                                           carried_eos):
    from tailor.models import base as mb
    from tailor.models.base import base_dir
    from tailor.models.families._common import ModelFileError

    d = _device_dir(tmp_path, "<|im_start|>")  # what the device's conversion produced: the wrong end token
    check = mb.check_tokenizer

    def fake_base_dir(src):
        if mb.check_tokenizer is check:  # the real conversion checks its tokenizer
            mb.load_tokenizer(d, mb.load_model_dir(d))
        return d

    monkeypatch.setattr(mb, "base_dir", fake_base_dir)
    tok = tmp_path / "tok"
    if carried_eos:
        tok.mkdir()
        for f in kg.TOKENIZER_FILES:
            shutil.copyfile(base_dir(None) / f, tok / f)
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": carried_eos}))
    if carried_eos == "<|im_end|>":  # the config's end token: accepted, and now in the converted folder
        assert kg.convert_base(tmp_path / "x.gguf", tok) == d
        assert json.loads((d / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    else:  # none carried, or one that does not fit either: the refusal stands
        with pytest.raises(ModelFileError, match="tokenizer does not match"):
            kg.convert_base(tmp_path / "x.gguf", tok)


def test_disable_compile_returns_the_quantizer_and_kd_loss_to_eager():
    from tailor import accel, distill
    from tailor.quant import fake

    accel.enable_compile()  # wraps lazily: nothing compiles until a CUDA tensor passes
    try:
        assert fake._compiled is not None and distill._compiled is not None
    finally:
        accel.disable_compile()
    assert (fake._compiled, distill._compiled, distill._kd_chunk_compiled) == (None, None, None)


def test_row_variants_reuse_their_base_rows_subnet_and_change_only_the_recipe(tmp_path, monkeypatch):
    """`tailor-k@4.0+emb+2x` is issue 19's lever on the subnet `tailor-k@4.0` found: its fine-tune gets the
    embedding QAT flag and twice the steps; `+sn` starts from the saved supernet; an unknown variant is
    refused by name."""
    plan = kg.rows_plan(False, ["tailor-k@4.0", "tailor-k@4.0+emb+2x", "tailor-k@4.0+sn"])
    assert [(r["kind"], r.get("of"), r.get("variants")) for r in plan] == [
        ("joint", None, None), ("variant", "tailor-k@4.0", ["emb", "2x"]), ("variant", "tailor-k@4.0", ["sn"])]
    with pytest.raises(SystemExit, match="'fast'"):
        kg.rows_plan(False, ["tailor-k@4.0+fast"])
    s, started = _start_rows(tmp_path, monkeypatch, ("tailor-k@4.0", "tailor-k@4.0+emb+2x", "tailor-k@4.0+sn",
                                                     "tailor-k@4.0+gen", "tailor-k@4.0+data"))
    steps = s.params.finetune.steps
    plain, varied, from_sn, with_gen, all_data = started
    assert not {"--steps", "--train-embeddings", "--from-supernet", "--generated", "--train-file"} & set(plain)
    assert with_gen[with_gen.index("--generated") + 1] == str(tmp_path / "kq" / kg.GENERATED)
    assert all_data[all_data.index("--train-file") + 1] == kg.TRAIN_ALL
    assert "--generated" not in varied + from_sn + all_data and "--train-file" not in with_gen
    assert varied[varied.index("--steps") + 1] == str(2 * steps) and "--train-embeddings" in varied
    assert from_sn[from_sn.index("--from-supernet") + 1].endswith("supernet.safetensors") and "--steps" not in from_sn
    k = kg.k_params("tiny", None, 0, None, True)
    assert k.finetune.train_embeddings and not kg.k_params("tiny").finetune.train_embeddings


def test_a_seed_variant_fine_tunes_the_same_recipe_on_another_seed(tmp_path, monkeypatch):
    """`+s2` is the row's recipe again on finetune.seed 2 (the spread across fine-tunes, issue 19): only
    `--seed` differs from the row without it, and the fine-tune's params carry that seed; two seeds in one
    id and `+s0` (the default's own seed) are refused by name."""
    plan = kg.rows_plan(False, ["tailor-k@4.0", "tailor-k@4.0+emb+data+s2"])
    assert plan[1]["variants"] == ["emb", "data", "s2"] and kg.seed_of(plan[1]["id"]) == 2
    assert kg.seed_of("tailor-k@4.0+emb") is None
    for bad, match in (("tailor-k@4.0+s1+s2", "more than one seed"), ("tailor-k@4.0+s0", "'s0'"),
                       ("tailor-k@4.0+s12", "'s12'")):
        with pytest.raises(SystemExit, match=match):
            kg.rows_plan(False, [bad])
    _, (plain, seeded) = _start_rows(tmp_path, monkeypatch, ("tailor-k@4.0+emb", "tailor-k@4.0+emb+s3"))
    assert "--seed" not in plain and seeded[seeded.index("--seed") + 1] == "3"
    rest = seeded[: seeded.index("--seed")] + seeded[seeded.index("--seed") + 2:]
    assert [a.replace("+s3", "") for a in rest] == [a.replace("job0", "job1") for a in plain]
    assert kg.k_params("tiny", ft_seed=3).finetune.seed == 3 and kg.k_params("tiny").finetune.seed == 0


def test_finetune_picks_which_searched_rows_train_and_refuses_a_row_not_listed(tmp_path, monkeypatch):
    """`--finetune` trains a chosen few of the rows (a `+sn` variant without its plain base row); an id that
    is not a row stops the run before the base is even unpacked."""
    rids = ("tailor-k@4.0", "tailor-k@4.0+emb+sn", "bits-k@4.25")
    s, started = _start_rows(tmp_path, monkeypatch, rids, finetune=["tailor-k@4.0+emb+sn", "bits-k"])
    assert [c[c.index("--row") + 1] for c in started] == ["tailor-k@4.0+emb+sn", "bits-k@4.25"]
    assert any("tailor-k@4.0: searched only" in m for m, _ in s.res["timeline"])
    _, everything = _start_rows(tmp_path / "all", monkeypatch, rids, id_suffix="+bw")
    assert [c[c.index("--row") + 1] for c in everything] == [r + "+bw" for r in rids]
    spec = json.loads((tmp_path / "all" / "kq" / "jobs" / "jobs.json").read_text())  # what `wait` looks for
    assert [j["rows"] for j in spec["jobs"]] == [[r + "+bw"] for r in rids]
    s.args.rows, s.args.finetune = list(rids[:2]), ["tailor-k@3.0+emb"]
    monkeypatch.setattr(kg.bq, "unpack", lambda *a: pytest.fail("unpacked before the rows were checked"))
    with pytest.raises(SystemExit, match=r"--finetune tailor-k@3.0\+emb: not among the rows"):
        s.main()


def test_a_data_row_without_its_train_split_stops_before_setup(tmp_path, monkeypatch):
    s, _ = _start_rows(tmp_path, monkeypatch, ())
    s.args.rows, s.args.finetune, s.args.gguf, s.args.src = ["tailor-k@4.0", "tailor-k@4.0+data"], None, None, tmp_path
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(kg.bq, "unpack", lambda src, dest: dest / "base")
    monkeypatch.setattr(kg.Search, "setup", lambda *a: pytest.fail("set up without the +data row's train split"))
    with pytest.raises(SystemExit, match=r"\+data row needs .*train_all.safetensors: `pack-data`"):
        s.main()


def test_pack_data_packs_only_a_null_build_that_matches_the_shard_in_all_else(tmp_path, monkeypatch):
    """+data rows are scored against the same held-out split as every other row: calibrate_all must be the
    full shard's build with train_seqs null and nothing else changed (params, val and calib bytes); a missing
    --calib is named before anything is built."""
    import tarfile

    from tailor import data as tdata

    calib, calib_all = tmp_path / "full", tmp_path / "all"
    params = {"seq_len": 512, "seed": 0, "val_seqs": 256}
    for d, train_seqs in ((calib, 3600), (calib_all, None)):
        d.mkdir()
        (d / "val.safetensors").write_bytes(b"v1")
        (d / "calib.safetensors").write_bytes(b"c1")
        (d / "data_report.json").write_text(json.dumps({"params": {**params, "train_seqs": train_seqs},
                                                        "shards": {"train": {"seqs": 9, "docs": {"boolq": 3}}}}))
    (calib_all / "train.safetensors").write_bytes(b"every document")
    out = kg.pack_data(calib, calib_all, tmp_path / "c")
    with tarfile.open(out) as tar:
        assert tar.getnames() == [f"data/{kg.TRAIN_ALL}"]
        assert tar.extractfile(f"data/{kg.TRAIN_ALL}").read() == b"every document"
    assert [f.name for f in (tmp_path / "c").iterdir()] == ["train_all.tar.xz"]

    def report(**change):
        (calib_all / "data_report.json").write_text(json.dumps({"params": {**params, "train_seqs": None, **change}}))

    report(train_seqs=3600)
    with pytest.raises(SystemExit, match="built with train_seqs 3600, not null"):
        kg.pack_data(calib, calib_all, tmp_path / "c2")
    report(seed=1)
    with pytest.raises(SystemExit, match="differs from .* in seed: only train_seqs may differ"):
        kg.pack_data(calib, calib_all, tmp_path / "c2")
    report()
    (calib_all / "calib.safetensors").write_bytes(b"c2")
    with pytest.raises(SystemExit, match="calib.safetensors differs"):
        kg.pack_data(calib, calib_all, tmp_path / "c2")
    assert not (tmp_path / "c2").exists()
    monkeypatch.setattr(tdata, "build", lambda *a, **k: pytest.fail("built before --calib was checked"))
    with pytest.raises(SystemExit, match="--calib .*nowhere: no val.safetensors"):
        kg.pack_data(tmp_path / "nowhere", tmp_path / "fresh", tmp_path / "c3")


def test_search_rows_read_a_search_json_or_a_device_record_and_refuse_anything_else(tmp_path):
    rows = {"tailor-k@4.0": {"config": {"layers": []}}}
    for name, doc in (("s.json", {"rows": rows}), ("rec.json", {"what": "x", "search": {"rows": rows}})):
        (tmp_path / name).write_text(json.dumps(doc))
        assert kg.search_rows(tmp_path / name) == rows
    (tmp_path / "bad.json").write_text(json.dumps({"what": "x"}))
    with pytest.raises(SystemExit, match="bad.json: neither"):
        kg.search_rows(tmp_path / "bad.json")


def test_gen_speed_times_every_dtype_and_batch_and_writes_them(tmp_path, monkeypatch):
    import argparse

    import torch
    from safetensors.torch import save_file

    from tailor.models import base as mb
    from tailor.models.tiny import tiny_model

    (tmp_path / "data").mkdir()
    save_file({"input_ids": torch.randint(0, 300, (6, 8), dtype=torch.int32)}, str(tmp_path / "data" / "train.safetensors"))
    monkeypatch.setattr(kg.bq, "unpack", lambda src, dest: dest / "base")
    monkeypatch.setattr(mb, "load_model_dir", lambda d: tiny_model(seed=1, n_layers=2, num_attention_heads=4,
                                                                    num_key_value_heads=2, head_dim=16))
    args = argparse.Namespace(src=tmp_path, dest=tmp_path, out=tmp_path / "out", dtypes=["fp32", "bf16"],
                              batches=[2, 3], seq_len=5)
    clock = iter(range(100))  # every reading 1 s after the last: each timed batch takes 1 s
    monkeypatch.setattr(kg.time, "time", lambda: float(next(clock)))
    res = kg.gen_speed(args)
    assert [(r["dtype"], r["batch"]) for r in res["rows"]] == [("fp32", 2), ("fp32", 3), ("bf16", 2), ("bf16", 3)]
    assert [r["tokens_per_s"] for r in res["rows"]] == [10, 15, 10, 15] and res["rows"][0]["ms_per_step"] == 200.0
    assert json.loads((tmp_path / "out" / "gen_speed.json").read_text())["rows"] == res["rows"]
