"""The multi-GPU benchmark's rows (benchmarks/scaling_rows.py): each 2-GPU row's efficiency is over the
1-GPU row of the same per-GPU batch and loss path; a row that timed out, ran out of memory or was skipped
still appears, named so; combining keeps scaling.json's other keys."""
import json

from benchmarks.scaling_rows import collect, combine


def _e2e(name, world, tps, kd_chunk=4096, **over):
    return {"kind": "e2e", "name": name, "shape": "llama-3.2-1b", "layers": 16, "world": world, "per_gpu_batch": 8,
            "seq": 2048, "kd_chunk": kd_chunk, "checkpointing": False, "parallel": "ddp" if world > 1 else "none",
            "student_tokens_per_s_per_gpu": tps, "step_s": 1.0, "device": "NVIDIA H200", "gpus_visible": 2,
            "torch": "2.11.0", **over}


def test_collect_pairs_rows_with_their_baseline_and_names_failures(tmp_path):
    rows = {"w1-chunk": _e2e("w1-chunk", 1, 100.0), "w1-plain": _e2e("w1-plain", 1, 80.0, kd_chunk=0),
            "ddp": _e2e("ddp", 2, 95.0), "fsdp": _e2e("fsdp", 2, 40.0, kd_chunk=0)}
    for name, r in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "8b.log").write_text("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    (tmp_path / "hang.log").write_text("step 3\n")
    (tmp_path / "status").write_text("w1-chunk 0 40\nw1-plain 0 41\nddp 0 45\nfsdp 0 50\n8b 1 90\nhang 124 200\nlast 125 0\n")
    collect(str(tmp_path), str(tmp_path / "status"), str(tmp_path / "rows.json"), quiet=True)
    got = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert (got["ddp"]["baseline"], got["ddp"]["scaling_efficiency"]) == ("w1-chunk", 0.95)
    assert (got["fsdp"]["baseline"], got["fsdp"]["scaling_efficiency"]) == ("w1-plain", 0.5)
    assert "scaling_efficiency" not in got["w1-chunk"]
    assert got["8b"]["error"] == "out of memory" and "OutOfMemoryError" in got["8b"]["log_tail"]
    assert got["hang"]["error"].startswith("timed out")
    assert got["last"]["error"].startswith("skipped")


def test_combine_adds_its_key_and_keeps_the_others(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps({"rows": [_e2e("w1", 1, 100.0), _e2e("ddp", 2, 90.0)]}))
    out = tmp_path / "scaling.json"
    out.write_text(json.dumps({"device": "H100 x2", "fsdp": {"runs": []}}))
    combine([str(tmp_path / "rows.json")], str(out), "shapes", "one call")
    res = json.loads(out.read_text())
    assert res["device"] == "H100 x2" and res["fsdp"] == {"runs": []}
    assert res["shapes"]["device"] == "NVIDIA H200 x2" and res["shapes"]["torch"] == "2.11.0"
    assert [r.get("scaling_efficiency") for r in res["shapes"]["rows"]] == [None, 0.9]
