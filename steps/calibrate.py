"""calibrate: validate the pinned corpora and eval/bias sets, tokenize, split into shards."""
from __future__ import annotations

from pathlib import Path

from steps._common import artifact_dir, base_model_tags, copy_file, main_for, report_dir, staged_dir, write_json
from tailor import tracking
from tailor.config import Params


def run(params: Params, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from tailor.data import build
    from tailor.models.base import base_dir

    base = base_dir(params.model.source)  # converts the source once (cached by its content hash)
    tok = AutoTokenizer.from_pretrained(base)
    metrics = build(params.calibrate, tok, out_dir)  # build() writes to a temp dir and renames when complete
    # which base model the shards were tokenized for: downstream stages depend on this directory, so a
    # different model (or the same path with new contents) re-runs everything after calibrate
    copy_file(base / "source.json", out_dir / "model.json")
    return metrics


def main() -> None:
    def stage(params: Params, _: str | None) -> None:
        with tracking.stage_run("calibrate", params=params.calibrate.model_dump()) as tr:
            with staged_dir(artifact_dir("calibrate")) as tmp:
                metrics = run(params, tmp)
            rep = report_dir("calibrate")
            write_json(rep / "metrics.json", metrics)
            copy_file(artifact_dir("calibrate") / "data_report.json", rep / "data_report.json")
            copy_file(artifact_dir("calibrate") / "DATA_CARD.md", rep / "DATA_CARD.md")
            tr.log_metrics(metrics)
            tr.set_tags(base_model_tags())
            tr.log_artifact(rep / "data_report.json")

    main_for("calibrate", stage)


if __name__ == "__main__":
    main()
