"""What every stage's main() shares: arguments, paths, atomic writes, one-line errors."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from tailor.config import ConfigError, Params, load_params

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")


def artifact_dir(stage: str, device: str | None = None) -> Path:
    return ARTIFACTS / stage / device if device else ARTIFACTS / stage


def report_dir(stage: str, device: str | None = None) -> Path:
    return REPORTS / stage / device if device else REPORTS / stage


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else []
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    os.replace(tmp, path)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` whole, on error it vanishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_shard(path: Path) -> torch.Tensor:
    try:
        return load_file(path)["input_ids"]
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (run the calibrate stage first)") from None
    except Exception as e:
        raise ConfigError(f"{path}: unreadable token shard ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: reported in one line, no traceback."""
    from tailor.models.base import ModelFileError
    from tailor.search.sampled import NoFeasibleSubnet
    from tailor.train import CheckpointError

    from steps.export import ParityError

    errs: list[type[BaseException]] = [ConfigError, ModelFileError, CheckpointError, NoFeasibleSubnet, ParityError]
    try:
        from tailor.data import DataError

        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def main_for(stage: str, fn: Callable[[Params, str | None], dict], per_device: bool = False) -> None:
    """Parse `--params/--device`, run the stage, turn bad input into one line and exit code 2."""
    ap = argparse.ArgumentParser(prog=f"python -m steps.{stage}")
    ap.add_argument("--params", default="params.yaml")
    if per_device:
        ap.add_argument("--device", required=True)
    args = ap.parse_args()
    device = getattr(args, "device", None)
    try:
        params = load_params(args.params)
        if device is not None:
            params.device(device)
        fn(params, device)
    except known_errors() as e:
        print(f"tailor {stage}{'@' + device if device else ''}: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permissions: name the path
        print(f"tailor {stage}: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
