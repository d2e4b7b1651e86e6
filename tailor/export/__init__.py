"""Export backends: one writer and one runtime module per format."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def runtime_versions() -> dict[str, str | None]:
    """Versions of the device runtimes on this machine (what a timing or parity result depends on)."""
    out = {}
    for pkg in ("llama-cpp-python", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
