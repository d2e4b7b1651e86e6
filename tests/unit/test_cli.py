"""The CLI refuses bad params in one line naming the key, before any stage runs."""
from pathlib import Path

from typer.testing import CliRunner

from tailor.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _params(tmp_path: Path, old: str = "", new: str = "") -> Path:
    p = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))
    return p


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_unknown_device(tmp_path):
    line = _one_line_error(runner.invoke(app, ["run", "--devices", "phone,watch", "--params", str(_params(tmp_path))]))
    assert "unknown device 'watch'" in line


def test_negative_budget(tmp_path):
    p = _params(tmp_path, "budget_fraction: 0.30", "budget_fraction: -0.30")
    line = _one_line_error(runner.invoke(app, ["run", "--params", str(p)]))
    assert "devices.phone" in line and "budget_fraction" in line


def test_misspelled_key(tmp_path):
    p = _params(tmp_path, "  n_candidates: 48", "  n_candidatez: 48")
    assert "search.n_candidatez: unknown key" in _one_line_error(runner.invoke(app, ["run", "--params", str(p)]))


def test_unknown_profile(tmp_path):
    line = _one_line_error(runner.invoke(app, ["run", "--profile", "huge", "--params", str(_params(tmp_path))]))
    assert "unknown profile 'huge'" in line
