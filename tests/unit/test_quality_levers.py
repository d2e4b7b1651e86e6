"""benchmarks/quality_levers.py: each lever reads the two rows it names from the measured tables, its verdict
follows their numbers, and the targets are computed against the base and llama.cpp's Q4_K_M of the same table."""
import json

import pytest

from benchmarks import quality_levers as ql


def _tables(tmp_path, k_wiki=236.0, k_passages=18.1):
    row = lambda rid, wiki, passages, kl, **kw: {"id": rid, "bits_per_param": 4.0, "ppl_wiki": wiki,  # noqa: E731
                                                 "ppl_boolq_passages": passages, **kw}
    seed = {"recipes": [{"id": r, "recipe": rec, "kl_after": kl, "torch_ppl_wiki": w}
                        for r in ("tailor@4.0", "tailor@3.0") for rec, kl, w in (("constant-1e-05", 0.4, 240.0),
                                                                                  ("cosine-3e-04", 0.3, 238.0))],
            "rows": [row("tailor@4.0", 238.0, 18.7, 0.3, build={"kl_after": 0.3}),
                     row("tailor@3.0", 270.0, 23.6, 0.6, build={"kl_after": 0.6}),
                     row("qat4", 223.0, 17.8, 0.12, build={"kl_after": 0.12})],
            "piqa_all": {"tailor@4.0": {"ratio": 0.95, "ci95": [0.92, 0.98]}}}
    k11 = {"rows": [row("base", 250.0, 17.5, None), row("q4_k_m", 257.0, 18.4, None),
                    row("tailor-k@4.0", 237.0, 18.5, None, gpu={"kl_after": 0.22}),
                    row("tailor-k@3.0", 260.0, 22.0, None, gpu={"kl_after": 0.5}),
                    row("iq4nl-qat", 238.0, 17.7, None, gpu={"kl_after": 0.10})],
           "piqa_all": {"tailor-k@4.0": {"vs_base": {"ratio": 0.96, "ci95": [0.93, 0.99]}}}}
    k = {"rows": [row("base", 250.0, 17.5, None), row("q4_k_m", 258.0, 18.5, None),
                  row("tailor-k@4.0", 240.0, 18.3, None, gpu={"kl_after": 0.21}),
                  row("tailor-k@4.0+emb", k_wiki, k_passages, None, gpu={"kl_after": 0.20}),
                  row("tailor-k@4.0+emb+bw", 230.0, 17.9, None, gpu={"kl_after": 0.21}),
                  row("tailor-k@4.0+emb+sn", 231.0, 18.0, None, gpu={"kl_after": 0.22}),
                  row("tailor-k@4.0+emb+data+bw", 229.0, 17.8, None, gpu={"kl_after": 0.20}),
                  row("tailor-k@4.0+emb+gen+bw", 232.0, 18.2, None, gpu={"kl_after": 0.215}),
                  row("tailor-k@3.0+emb", 255.0, 21.0, None, gpu={"kl_after": 0.49}),
                  row("tailor-k@3.0+emb+sn", 254.0, 19.0, None, gpu={"kl_after": 0.48}),
                  row("tailor-k@3.0+emb+data+bw", 252.0, 20.5, None, gpu={"kl_after": 0.47})],
         "piqa_all": {"tailor-k@4.0+emb": {"vs_base": {"ratio": 0.99, "ci95": [0.97, 1.01]}},
                      "tailor-k@4.0+emb+bw": {"vs_base": {"ratio": 0.97, "ci95": [0.94, 1.0]}}}}
    for name, t in (("seed_table_gpu", seed), ("kquant_table_s11", k11), ("kquant_table", k)):
        (tmp_path / f"{name}.json").write_text(json.dumps(t))
    return ql.load(tmp_path)


def test_each_lever_reads_its_two_rows_and_the_targets_use_base_and_q4_k_m(tmp_path):
    src = _tables(tmp_path)
    rows = ql.ablation(src)
    grid4 = rows[1]
    assert (grid4["before"]["wiki"], grid4["after"]["wiki"], grid4["after"]["kl"]) == (238.0, 237.0, 0.22)
    assert grid4["after"]["source"] == "kquant_table_s11.json tailor-k@4.0"
    assert (grid4["before"]["piqa1500"], grid4["after"]["piqa1500"]) == (0.95, 0.96)
    assert grid4["verdict"] == "better"
    assert rows[0]["before"]["wiki_torch"] == 240.0 and rows[0]["verdict"] == "better"
    search4, emb4 = rows[2], rows[3]  # session 15's: the old table's row against the rebuilt one, then +emb
    assert (search4["before"]["kl"], search4["after"]["kl"], search4["verdict"]) == (0.22, 0.21, "mixed")
    assert (emb4["before"]["source"], emb4["after"]["source"]) == ("kquant_table.json tailor-k@4.0",
                                                                  "kquant_table.json tailor-k@4.0+emb")
    data4, gen4 = rows[6], rows[7]  # session 17's: each against +bw (same subnet, start and tokens)
    assert (data4["before"]["source"], data4["after"]["source"]) == ("kquant_table.json tailor-k@4.0+emb+bw",
                                                                    "kquant_table.json tailor-k@4.0+emb+data+bw")
    assert (data4["verdict"], gen4["verdict"]) == ("better", "worse")
    assert rows[12]["after"]["source"] == "kquant_table.json tailor-k@3.0+emb+data+bw"
    both3, iq4 = rows[10], rows[-1]
    assert both3["after"]["passages"] == 21.0 and both3["verdict"] == "better"
    assert iq4["verdict"] == "mixed"  # IQ4_NL: KL and passages better, wiki worse
    targets = ql.targets(src, rows)
    t = {(x["row"].split()[-1], x["target"].split(" (")[0]): x for x in targets}
    # every latest-table row a <= 4.0 lever ends on, once each and in lever order; none of session 11's table
    assert list(dict.fromkeys(x["row"].split()[-1] for x in targets if x["budget"] == "<= 4.0")) == [
        "tailor-k@4.0", "tailor-k@4.0+emb", "tailor-k@4.0+emb+bw", "tailor-k@4.0+emb+sn", "tailor-k@4.0+emb+data+bw",
        "tailor-k@4.0+emb+gen+bw"]
    assert t[("tailor-k@4.0+emb", "wiki perplexity within +3% of base")]["got"] == pytest.approx(236 / 250 - 1, abs=1e-4)
    assert t[("tailor-k@4.0+emb", "passages perplexity within +3% of base")]["met"] is False  # 18.1 / 17.5: +3.4%
    assert t[("tailor-k@4.0+emb+bw", "passages perplexity within +3% of base")]["met"] is True  # 17.9: +2.3%
    assert t[("tailor-k@4.0+emb", "PIQA")]["met"] is True
    assert t[("tailor-k@4.0+emb+bw", "PIQA")]["met"] is False and t[("tailor-k@4.0+emb+bw", "PIQA")]["gap"] == 0.01
    assert t[("tailor-k@4.0+emb+sn", "PIQA")]["met"] is None  # no PIQA-1500 run: not judged
    assert t[("tailor-k@4.0+emb", "passages perplexity below llama.cpp Q4_K_M's")]["met"] is True  # 18.1 < 18.5
    assert t[("tailor-k@3.0+emb", "passages perplexity within +10% of base")]["got"] == pytest.approx(21 / 17.5 - 1, abs=1e-4)
    assert ("tailor-k@3.0+emb+sn", "passages perplexity within +10% of base") in t
    md = ql.fmt_md({"sources": ["a"], "base": ql.base(src), "ablation": rows, "targets": targets,
                    "not_measured": ql.NOT_MEASURED})
    assert "236.00 (-5.6%)" in md and "0.990 [0.970, 1.010]" in md
    assert "| tailor-k@4.0+emb+bw | -8.0% **met** | +2.3% **met** | 0.970 (misses by 0.010) |" in md


def test_a_lever_whose_after_row_is_worse_everywhere_says_so_and_a_missing_row_is_named(tmp_path):
    src = _tables(tmp_path, k_wiki=300.0, k_passages=20.0)
    src["k"]["rows"][3]["gpu"]["kl_after"] = 0.5
    src["k"]["piqa_all"]["tailor-k@4.0+emb"]["vs_base"]["ratio"] = 0.9
    assert ql.ablation(src)[3]["verdict"] == "worse"
    src["k"]["rows"] = [r for r in src["k"]["rows"] if r["id"] != "tailor-k@3.0+emb+sn"]
    with pytest.raises(KeyError, match="kquant_table.json: no row tailor-k@3.0"):
        ql.ablation(src)


def test_pre_finetune_levers_compare_the_kl_each_subnet_starts_from():
    pre = {"tailor-k@4.0": {"s11_search_60_step_supernet": 0.8, "s14_search_331_step_supernet": 0.7},
           "tailor-k@3.0": {"s11_search_60_step_supernet": 1.9, "s14_search_331_step_supernet": 2.1}, "what": "..."}
    rows = ql.pre_finetune({"pre": pre})
    assert [(r["budget"], r["before"], r["after"], r["verdict"]) for r in rows] == [
        ("<= 4.0", 0.8, 0.7, "better"), ("<= 3.0", 1.9, 2.1, "worse")]
    assert ql.pre_finetune({"pre": None}) == []


def test_session_16_starts_compare_each_search_runs_starting_kl_by_weights():
    rows = lambda k4, k3: {"rows": {"tailor-k@4.0": {"kl_before_from": k4},  # noqa: E731
                                    "tailor-k@3.0": {"kl_before_from": k3}}}
    s16 = {"A_base_weights": rows({"base": 0.69, "supernet": 0.69}, {"base": 1.91, "supernet": 1.91}),
           "B_supernet": rows({"base": 0.80, "supernet": 0.63}, {"base": 2.08, "supernet": 1.47}),
           "C_base_weights_kv3": rows({"base": 0.71, "supernet": 0.71}, {"base": 2.08, "supernet": 2.08})}
    got = [(r["budget"], r["before"], r["after"], r["verdict"]) for r in ql.pre_finetune({"pre": None, "s16": s16})]
    assert got == [("<= 4.0", 0.80, 0.69, "better"), ("<= 3.0", 2.08, 1.91, "better"),  # base-ranked vs supernet's
                   ("<= 4.0", 0.69, 0.71, "worse"), ("<= 3.0", 1.91, 2.08, "worse"),  # KV groups held
                   ("<= 4.0", 0.80, 0.63, "better"), ("<= 3.0", 2.08, 1.47, "better")]  # +sn's start
