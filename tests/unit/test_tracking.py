"""MLflow helpers: stage runs nest under the nightly run in the tailor experiment; candidates are
child runs; registering the same file twice does not create a second version."""
import os

import pytest

from tailor import tracking


def test_runs_nest_and_registry_dedupes(mlflow_uri, tmp_path, monkeypatch):
    parent = tracking.start_parent("nightly", {"tailor.profile": "test"})
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + os.urandom(64))
    with tracking.stage_run("search", "phone", params={"n": 3}) as tr:
        tr.log_metrics({"kl": 0.5, "nested": {"x": 1}, "name": "skip-me"})
        tr.log_candidates([{"config_hash": f"h{i}", "kl": float(i), "nbytes": 10 * i, "chosen": i == 0} for i in range(5)])
        search_id = tr.run_id
    with tracking.stage_run("register", "phone") as tr:
        v1, created1 = tracking.register("tailor-phone", tr, f, {"sha256": "abc", "git_sha": "g"}, "candidate")
    with tracking.stage_run("register", "phone") as tr:
        v2, created2 = tracking.register("tailor-phone", tr, f, {"sha256": "abc", "git_sha": "g"}, "candidate")
    tracking.end_parent(parent, metrics={"phone.ppl": 12.0})

    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["register@phone", "register@phone", "search@phone"]
    cands = c.search_runs([exp], f"tags.mlflow.parentRunId = '{search_id}'")
    assert len(cands) == 5 and all(r.data.tags["tailor.kind"] == "candidate" for r in cands)
    assert c.get_run(search_id).data.metrics["nested.x"] == 1.0
    assert (v1, created1, v2, created2) == ("1", True, "1", False)
    assert c.get_model_version_by_alias("tailor-phone", "candidate").tags["git_sha"] == "g"
    assert tracking.aliases("tailor-phone") == {"candidate": "1"}


def test_reregistering_a_file_brings_its_verdict_up_to_date(mlflow_uri, tmp_path):
    """The same file evaluated again (new gate policy, newer commit): one version, latest tags and
    evidence, the replaced evidence run kept."""
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + os.urandom(64))
    ev = tmp_path / "gates.json"
    runs = []
    for verdict, sha in (("False", "g1"), ("True", "g2"), ("True", "g2")):
        ev.write_text('{"passed": %s}' % verdict.lower())
        with tracking.stage_run("register", "phone") as tr:
            runs.append(tr.run_id)
            v, _ = tracking.register("tailor-phone", tr, f, {"sha256": "abc", "git_sha": sha, "gates_passed": verdict},
                                     "candidate", evidence={"gates": ev})
        assert v == "1"
    tags = tracking.version("tailor-phone", "1")["tags"]
    assert (tags["gates_passed"], tags["git_sha"]) == ("True", "g2")
    # the third run changed nothing: the evidence stays the second run's
    assert (tags["evidence_run_id"], tags["previous_evidence_run_id"]) == (runs[1], runs[0])



class _AliasStore:
    """A client whose alias write fails `fails` times with `error` first (what MLflow's SQL store raises
    when a concurrent process inserted the same new alias a moment earlier)."""

    def __init__(self, fails: int, error: str):
        self.fails, self.error, self.calls = fails, error, []

    def set_registered_model_alias(self, name, alias, version):
        self.calls.append((name, alias, version))
        if len(self.calls) <= self.fails:
            raise RuntimeError(self.error)


def test_set_alias_retries_only_the_unique_key_race():
    from tailor.tracking import _set_alias as set_alias

    race = "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.workspace, ..."
    c = _AliasStore(1, race)
    set_alias(c, "tailor-phone", "candidate", 1)
    assert c.calls == [("tailor-phone", "candidate", "1")] * 2  # the second write updates the row the other made
    with pytest.raises(RuntimeError, match="UNIQUE"):
        set_alias(_AliasStore(3, race), "tailor-phone", "candidate", 1)  # not a race that settles: raised
    other = _AliasStore(1, "RESOURCE_DOES_NOT_EXIST: Registered model version 7 not found")
    with pytest.raises(RuntimeError, match="not found"):
        set_alias(other, "tailor-phone", "candidate", 7)
    assert len(other.calls) == 1  # anything else is not retried
