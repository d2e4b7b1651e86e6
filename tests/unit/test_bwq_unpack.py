"""benchmarks/blockwise_quality.unpack on a later device call: without the carried parts, the base an earlier call
rebuilt and checked on that machine serves; with neither, the error names what to carry."""
import pytest

from benchmarks import blockwise_quality as bq


def test_a_base_checked_earlier_serves_when_the_parts_are_not_carried(tmp_path):
    work, src = tmp_path / "bwq", tmp_path / "not-carried"
    (work / "base").mkdir(parents=True)
    (work / "staged").touch()
    with pytest.raises(SystemExit, match="manifest.json missing and no base rebuilt"):
        bq.unpack(src, work)  # a base folder alone was never checked: refused
    (work / "base" / ".rebuilt").write_text("afd7158cf38a8654" * 4)
    assert bq.unpack(src, work) == work / "base"
