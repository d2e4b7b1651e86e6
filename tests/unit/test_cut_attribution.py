"""benchmarks/cut_attribution.py: a subnet with one kind of cut restored keeps everything else as searched."""
import pytest

from benchmarks import cut_attribution as ca

CFG = {"version": 1, "embed_bits": 4, "layers": [
    {"keep": True, "kv_groups": 2, "ffn": 768, "bits": {"q": "IQ4_NL", "down": "Q3_K"}},
    {"keep": False, "kv_groups": 1, "ffn": 512, "bits": {"q": 8, "down": "Q2_K"}}]}


def test_each_kind_restores_only_its_own_cut():
    kv, ffn, both = (ca.restored(CFG, k, 3, 1536) for k in ("kv", "ffn", "structure"))
    assert [lc["kv_groups"] for lc in kv["layers"]] == [3, 3] and [lc["ffn"] for lc in kv["layers"]] == [768, 512]
    assert [lc["ffn"] for lc in ffn["layers"]] == [1536, 1536] and [lc["kv_groups"] for lc in ffn["layers"]] == [2, 1]
    assert [(lc["kv_groups"], lc["ffn"]) for lc in both["layers"]] == [(3, 1536), (3, 1536)]
    for c in (kv, ffn, both):  # bits, dropped layers and the embedding stay as searched
        assert [(lc["keep"], lc["bits"]) for lc in c["layers"]] == [(lc["keep"], lc["bits"]) for lc in CFG["layers"]]
        assert c["embed_bits"] == 4
    assert ca.restored(CFG, "searched", 3, 1536) == CFG
    assert CFG["layers"][0]["kv_groups"] == 2  # the caller's config is not changed
    with pytest.raises(ValueError, match="kind 'bits'"):
        ca.restored(CFG, "bits", 3, 1536)


def test_per_mb_is_kl_removed_per_restored_megabyte_and_none_without_a_cut():
    kl = {"searched": {"all": 0.6, "weight_bytes": 10_000_000}, "kv": {"all": 0.5, "weight_bytes": 12_000_000},
          "ffn": {"all": 0.6, "weight_bytes": 10_000_000}}
    assert ca.per_mb(kl) == {"kv": pytest.approx(0.05), "ffn": None}
