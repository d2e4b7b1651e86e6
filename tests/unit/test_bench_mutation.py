"""benchmarks/mutation.py --merge: a re-run over part of the scope replaces only the files it checked."""
from benchmarks.mutation import _module, merge


def _report(files: dict, survivors: list[str], run: str) -> dict:
    return {"version": "mutmut 3.8.1", "scope": {}, "files": files, "survivors": survivors, "run": {"label": run}}


def test_module_of_a_mutant_name():
    assert _module("tailor.quant.fake.x_clip_slot__mutmut_2") == "tailor/quant/fake.py"
    assert _module("tailor.arch.xǁSubnetConfigǁuniform__mutmut_8") == "tailor/arch.py"


def test_later_run_wins_only_where_it_checked():
    old = _report({"tailor/a.py": {"killed": 6, "survived": 4, "total": 10, "kill_rate": 0.6},
                   "tailor/b.py": {"killed": 9, "survived": 1, "total": 10, "kill_rate": 0.9}},
                  ["tailor.a.x_f__mutmut_1", "tailor.b.x_g__mutmut_2"], "old")
    new = _report({"tailor/a.py": {"killed": 9, "survived": 1, "total": 10, "kill_rate": 0.9},
                   "tailor/b.py": {"not checked": 10, "total": 10, "kill_rate": None}},
                  ["tailor.a.x_f__mutmut_7"], "new")
    m = merge([old, new])
    assert m["files"]["tailor/a.py"]["kill_rate"] == 0.9 and m["files"]["tailor/a.py"]["measured_in"] == 1
    assert m["files"]["tailor/b.py"]["kill_rate"] == 0.9 and m["files"]["tailor/b.py"]["measured_in"] == 0
    assert m["survivors"] == ["tailor.a.x_f__mutmut_7", "tailor.b.x_g__mutmut_2"]
    assert (m["killed"], m["checked"], m["kill_rate"], m["below_80pct"]) == (18, 20, 0.9, [])
    assert [r["label"] for r in m["runs"]] == ["old", "new"] and m["complete"]
