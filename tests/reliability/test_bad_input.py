"""Bad input anywhere in the pipeline: each case runs the real stage entry point (`python -m
steps.<stage>`, what DVC and the nightly flow run) and checks the exit code, the one line naming the
input and the problem, and that the stage left no artifact, report or registry entry behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reliability_harness import copy_project, make_project, one_line_error, outputs, registry, run_stage

pytestmark = pytest.mark.integration


@pytest.fixture
def proj(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


def nothing_left(root: Path, stage: str, device: str | None = None) -> None:
    assert outputs(root, stage, device) == []
    assert registry(root) == []


# --- data inputs: Great Expectations suites and strict readers in the calibrate stage -----------------

def _crows_header() -> str:
    return ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"


def _cases(cases: dict, fast: set[str]) -> list:
    """Every case for `make test-all`; in `make test` only `fast` (one per kind of check). The stage's way of
    failing (one line, exit 2, nothing left behind) is the same code for every case of a kind, and each
    case's check itself runs in-process in tests/unit (test_data.py, test_model_files.py, test_config.py)."""
    assert fast <= set(cases), fast - set(cases)
    return [pytest.param(c, marks=() if c in fast else pytest.mark.slow) for c in cases]


DATA_CASES = {
    # name: (source overridden, file name, bytes, expected message after the file name)
    "empty_corpus": ("boolq", "boolq.jsonl", b"", "boolq.jsonl: is empty (no rows)"),
    "invalid_utf8": ("boolq", "boolq.jsonl", b'{"question": "q?", "passage": "caf\xe9 au lait"}\n',
                     "boolq.jsonl: not valid UTF-8"),
    "one_line_repeated": ("boolq", "boolq.jsonl",
                          b'{"question": "q?", "passage": "The same passage, over and over again."}\n' * 200,
                          "boolq.jsonl: 100% of rows are duplicates"),
    "bias_missing_column": ("crows", "crows.csv",
                            ",sent_more,sent_less,stereo_antistereo\n0,He is a.,She is a.,stereo\n".encode(),
                            "crows.csv: missing required column 'bias_type'"),
    "bias_unknown_group": ("crows", "crows.csv",
                           (_crows_header() + "0,He is a.,She is a.,stereo,martians,[],a,[]\n").encode(),
                           "crows.csv: column bias_type has values outside the 9 CrowS-Pairs types: ['martians']"),
}


@pytest.mark.parametrize("case", _cases(DATA_CASES, {"empty_corpus", "bias_unknown_group"}))
def test_bad_data_input(proj, tmp_path, case):
    source, name, data, expected = DATA_CASES[case]
    bad = tmp_path / name
    bad.write_bytes(data)
    proc = run_stage(proj, "calibrate", **{f"TAILOR_SOURCE_{source.upper()}": str(bad)})
    line = one_line_error(proc)
    assert line.startswith("tailor calibrate: ") and str(bad.parent) in line and expected in line, line
    nothing_left(proj, "calibrate")


# --- model files: safetensors only, finite weights, whole files, a matching tokenizer -----------------

def _tiny_dir(d: Path) -> Path:
    from tailor.models.tiny import tiny_model

    tiny_model().save_pretrained(d, safe_serialization=True)
    return d


def _nan(d: Path) -> None:
    f = d / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(state, str(f), metadata={"format": "pt"})


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _pickle(d: Path) -> None:
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")


def _other_tokenizer(d: Path) -> None:
    from tailor.models.base import base_dir

    for f in base_dir().glob("tokenizer*"):  # SmolLM2's 49152-token tokenizer beside a 320-token model
        shutil.copy(f, d / f.name)


MODEL_CASES = {
    "nan_inf_weights": (_nan, "artifacts/finetune/phone/model.safetensors: NaN/Inf in model.layers.0.mlp.down_proj.weight"),
    "truncated_safetensors": (_truncate, "artifacts/finetune/phone/model.safetensors: unreadable safetensors"),
    "pickled_model": (_pickle, "artifacts/finetune/phone: pickled weights (pytorch_model.bin) are refused, use safetensors"),
    "tokenizer_of_another_model": (_other_tokenizer, "artifacts/finetune/phone: tokenizer does not match the model "
                                                     "(49152 tokens, model vocab_size 320)"),
}


@pytest.mark.parametrize("case", _cases(MODEL_CASES, {"nan_inf_weights", "tokenizer_of_another_model"}))
def test_bad_model_file(proj, case):
    spoil, expected = MODEL_CASES[case]
    model_dir = _tiny_dir(proj / "artifacts" / "finetune" / "phone")
    spoil(model_dir)
    proc = run_stage(proj, "export", "phone")
    line = one_line_error(proc)
    assert line == f"tailor export@phone: {expected}" or line.startswith(f"tailor export@phone: {expected}"), line
    nothing_left(proj, "export", "phone")


# --- params.yaml ---------------------------------------------------------------------------------------

def _params(proj: Path, mutate) -> str:
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    mutate(raw)
    (proj / "bad.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "bad.yaml"


PARAM_CASES = {
    "wrong_type": (lambda r: r["supernet"].update(steps="many"), "calibrate", None,
                   "bad.yaml: supernet.steps: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    "unknown_key": (lambda r: r["search"].update(n_candidatez=4), "calibrate", None,
                    "bad.yaml: search.n_candidatez: unknown key"),
    "negative_budget": (lambda r: r["devices"]["phone"].update(budget_fraction=-0.5), "search", "phone",
                        "bad.yaml: devices.phone: Value error, budget_fraction must be in (0, 1], got -0.5"),
    "unknown_format": (lambda r: r["devices"]["laptop"].update(format="tflite"), "search", "laptop",
                       "bad.yaml: devices.laptop.format: Value error, unknown format 'tflite' (known: gguf, onnx) (got 'tflite')"),
    "unknown_device": (lambda r: None, "search", "watch", "devices: unknown device 'watch' (known: phone, laptop)"),
}


@pytest.mark.parametrize("case", _cases(PARAM_CASES, {"unknown_key", "unknown_device"}))
def test_bad_params(proj, case):
    mutate, stage, device, expected = PARAM_CASES[case]
    proc = run_stage(proj, stage, device, params=_params(proj, mutate))
    line = one_line_error(proc)
    assert line == f"tailor {stage}{'@' + device if device else ''}: {expected}", line
    nothing_left(proj, stage, device)
    assert not (proj / "mlflow.db").exists()  # refused before any tracking


def test_impossible_budget(supernet_ref, tmp_path):
    """A budget no subnet fits: the search stage says so and writes nothing."""
    proj = copy_project(supernet_ref[0], tmp_path / "proj")

    def tiny_budget(r):
        r["profiles"]["test"]["devices"]["phone"] = {"budget_bytes": 1000}
        del r["devices"]["phone"]["budget_fraction"]
        r["devices"]["phone"]["budget_bytes"] = 1000

    proc = run_stage(proj, "search", "phone", params=_params(proj, tiny_budget))
    line = one_line_error(proc)
    assert line.startswith("tailor search@phone: devices.phone: budget 1,000 B is below the smallest subnet ("), line
    nothing_left(proj, "search", "phone")


# --- disk full in the middle of a stage ----------------------------------------------------------------

def test_disk_write_failure_mid_stage(proj):
    """The calibrate stage has put its shards, metrics.json and data_report.json in place when copying
    DATA_CARD.md fails (TAILOR_FAULT_WRITE injects ENOSPC): one line naming the file, and every output
    of the stage is gone again."""
    proc = run_stage(proj, "calibrate", TAILOR_FAULT_WRITE="reports/calibrate/DATA_CARD.md")
    line = one_line_error(proc)
    assert line == "tailor calibrate: reports/calibrate/DATA_CARD.md: No space left on device", line
    nothing_left(proj, "calibrate")


@pytest.mark.slow
def test_disk_write_failure_mid_search(supernet_ref, tmp_path):
    """The same in the search stage: artifact and metrics.json written, then candidates.csv fails."""
    proj = copy_project(supernet_ref[0], tmp_path / "proj")
    proc = run_stage(proj, "search", "phone", TAILOR_FAULT_WRITE="reports/search/phone/candidates.csv")
    line = one_line_error(proc)
    assert line == "tailor search@phone: reports/search/phone/candidates.csv: No space left on device", line
    nothing_left(proj, "search", "phone")


# --- an exported file that changed after export measured it -------------------------------------------

def test_exported_file_with_another_sha256_is_not_registered(proj):
    """register checks the file's sha256 against what export recorded before it registers anything."""
    from steps._common import write_json
    from tailor.models.base import sha256_file

    export = proj / "artifacts" / "export" / "phone"
    export.mkdir(parents=True)
    (export / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    (export / "subnet.json").write_text("{}")
    recorded = sha256_file(export / "model.gguf")
    write_json(proj / "reports/export/phone/metrics.json", {"sha256": recorded, "file_bytes": 68, "runtime_ppl": 1.0})
    write_json(proj / "reports/evaluate/phone/gates.json", {"passed": True, "gates": []})
    write_json(proj / "reports/evaluate/phone/metrics.json", {"ppl": 1.0})
    with open(export / "model.gguf", "r+b") as f:  # one byte flipped after export
        f.seek(10)
        f.write(b"\x01")
    line = one_line_error(run_stage(proj, "register", "phone"))
    assert line.startswith("tailor register@phone: artifacts/export/phone/model.gguf: sha256 ") and \
        f"differs from what export measured ({recorded[:12]})" in line, line
    nothing_left(proj, "register", "phone")
