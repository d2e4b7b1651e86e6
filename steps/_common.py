"""What every stage's main() shares: arguments, paths, atomic writes, one-line errors.

Outputs are all-or-nothing per stage: `staged_dir`, `write_json`, `write_csv` and `copy_file` write to
a temp path beside the output and rename it when complete. Inside `main_for` the previous outputs are
kept aside until the whole stage succeeded, so a stage that fails (bad input, disk full) leaves none
of its new outputs behind; a stage killed at any point leaves only temp paths (removed by the next
run) and no dvc.lock entry, so DVC runs it again.

Two test hooks, read from the environment (both inert unless set):
- TAILOR_FAULT_WRITE=<substring>: writing an output whose path contains it fails with ENOSPC.
- TAILOR_CRASH_AT=<point>: the process kills itself with SIGKILL at `crash_point(<point>)`.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from tailor import distributed
from tailor.config import ConfigError, Params, load_params

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
FAULT_WRITE_ENV = "TAILOR_FAULT_WRITE"
CRASH_ENV = "TAILOR_CRASH_AT"

# Outputs the running stage has put in place: (final path, the previous output moved aside or None).
_journal: list[tuple[Path, Path | None]] | None = None
_open_dirs: list[Path] = []  # staged dirs being filled: files written inside them are not journaled


def base_model_tags() -> dict[str, str]:
    """{"base_model", "base_model_sha256"}: which base model the calibrate shards (and so every later
    stage) were made for; empty before calibrate has run."""
    try:
        src = json.loads((artifact_dir("calibrate") / "model.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"base_model": str(src.get("name")), "base_model_sha256": str(src.get("sha256"))}


def artifact_dir(stage: str, device: str | None = None) -> Path:
    return ARTIFACTS / stage / device if device else ARTIFACTS / stage


def report_dir(stage: str, device: str | None = None) -> Path:
    return REPORTS / stage / device if device else REPORTS / stage


def writes_outputs(nproc: int, module: str, train_share: Callable[[Path], Any]) -> bool:
    """Multi-process training stages (`nproc` > 1): start `module` again under torchrun and exit with its
    code, or, in a torchrun child, join the process group. True in the process that writes the stage's
    outputs (rank 0, or the only one); other ranks call `train_share(temp dir)` to train their part, with
    outputs going to a throwaway directory, and get False."""
    code = distributed.relaunch(nproc, module, sys.argv[1:])
    if code is not None:  # the torchrun children did the work (and printed any error)
        sys.exit(code)
    rank, _world = distributed.init_from_env()
    if rank == 0:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        train_share(Path(tmp))
    distributed.finish()
    return False


def crash_point(name: str) -> None:
    """Die here like a killed run (SIGKILL: no cleanup, no finally) when TAILOR_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def check_write(path: Path) -> None:
    """Fault injection: a write to `path` fails as on a full disk when TAILOR_FAULT_WRITE matches it."""
    pattern = os.environ.get(FAULT_WRITE_ENV)
    if pattern and pattern in Path(path).as_posix():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


_new_dirs: list[Path] = []  # directories the running stage created (removed again if it fails)


def _mkdirs(path: Path) -> None:
    """`mkdir -p path`, remembering the directories that did not exist."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    if _journal is not None:
        _new_dirs.extend(reversed(missing))


def _inside_open_dir(path: Path) -> bool:
    p = Path(path).resolve()
    return any(p.is_relative_to(d.resolve()) for d in _open_dirs)


def _aside(final: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{os.getpid()}-")) / final.name


def _finish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` over `final`. While a stage runs, the previous output is kept aside
    until the stage succeeds, so a failing stage can put everything back as it was."""
    if _journal is None or _inside_open_dir(final):
        _replace(tmp, final)
        return
    backup = None
    if final.exists():
        backup = _aside(final)
        os.replace(final, backup)
    os.replace(tmp, final)
    _journal.append((final, backup))


def _replace(tmp: Path, final: Path) -> None:
    if tmp.is_dir() and final.exists():
        # move the previous output aside first, so `final` is never half old, half new
        old = _aside(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old.parent, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def stage_outputs() -> Iterator[None]:
    """All or nothing: if the block fails, every output it wrote is removed and what was there
    before is put back; if it succeeds, the previous outputs are dropped."""
    global _journal
    outer, _journal = _journal, []
    journal, first_dir = _journal, len(_new_dirs)
    try:
        yield
    except BaseException:
        for final, backup in reversed(journal):
            _remove(final)
            if backup is not None:
                os.replace(backup, final)
                shutil.rmtree(backup.parent, ignore_errors=True)
        for d in reversed(_new_dirs[first_dir:]):  # deepest first; a directory still in use stays
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    else:
        for _, backup in journal:
            if backup is not None:
                shutil.rmtree(backup.parent, ignore_errors=True)
    finally:
        _journal = outer
        del _new_dirs[first_dir:]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(rows[0]) if rows else []
    _write_text(path, "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")


def copy_file(src: Path, dst: Path) -> None:
    """Copy atomically (temp file + rename)."""
    check_write(dst)
    _mkdirs(dst.parent)
    _remove_stale(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    _finish(tmp, dst)


def _write_text(path: Path, text: str) -> None:
    path = Path(path)
    check_write(path)
    _mkdirs(path.parent)
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _finish(tmp, path)


def _remove_stale(final: Path) -> None:
    """Temp dirs and set-aside outputs left beside `final` by killed runs (their process is gone)."""
    for p in final.parent.glob(f".{final.name}.*-*"):
        parts = p.name[len(final.name) + 2:].split("-")
        if len(parts) >= 2 and parts[0] in ("tmp", "old") and parts[1].isdigit() and not _alive(int(parts[1])):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` whole, on error it vanishes."""
    final = Path(final)
    _mkdirs(final.parent)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed output should not be
    _open_dirs.append(tmp)
    try:
        yield tmp
        check_write(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _open_dirs.remove(tmp)
    _finish(tmp, final)


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
    from tailor.eval.schema import EvalDataError
    from tailor.eval.harness import NonFiniteScore
    from tailor.export.gguf import ExportError
    from tailor.export.gguf_vocab import TokenizerGGUFError
    from tailor.models.base import ModelFileError
    from tailor.quant.f16 import PrecisionError
    from tailor.search.sampled import NoFeasibleSubnet
    from tailor.train import CheckpointError

    from steps.export import ParityError

    errs: list[type[BaseException]] = [ConfigError, ModelFileError, CheckpointError, NoFeasibleSubnet, ParityError,
                                       ExportError, TokenizerGGUFError, PrecisionError, EvalDataError, NonFiniteScore]
    from tailor.export.onnx import OnnxExportError  # the writers' refusals are bad input too

    errs.append(OnnxExportError)
    try:
        from tailor.data import DataError

        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main_for(stage: str, fn: Callable[[Params, str | None], dict], per_device: bool = False) -> None:
    """Parse `--params/--device`, run the stage, turn bad input into one line and exit code 2.

    The stage's outputs appear only if it succeeds as a whole (see `stage_outputs`)."""
    ap = argparse.ArgumentParser(prog=f"python -m steps.{stage}")
    ap.add_argument("--params", default="params.yaml")
    if per_device:
        ap.add_argument("--device", required=True)
    args = ap.parse_args()
    device = getattr(args, "device", None)
    target = f"{stage}@{device}" if device else stage  # the DVC stage name
    who = f"tailor {target}"
    try:
        params = load_params(args.params)
        if device is not None:
            params.device(device)
        with stage_outputs():
            crash_point(f"{target}:start")
            fn(params, device)
            # every output in place, the process not yet exited: a kill here is the worst case for DVC
            # (it has not recorded the stage) and for the registry (register has just run)
            crash_point(f"{target}:end")
    except known_errors() as e:
        print(f"{who}: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permissions: name the path
        print(f"{who}: {e.filename or ''}: {_one_line(e.strerror or e)}", file=sys.stderr)
        sys.exit(2)
