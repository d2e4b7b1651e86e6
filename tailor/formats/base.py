"""What a runtime format (an export backend) is: the one place that holds its facts.

A `Backend` names its runtime, its grid (the fake quantizer that equals the format's rounding, with its
bit-widths and byte counts), its writer, its runtime runner (perplexity, generation, decode speed, used
for parity and latency), the files that make up an artifact, its per-layer runtime overhead and whether
inference should emulate the runtime's own arithmetic. Modules are named, not imported, so reading a
backend's facts (config validation, the CLI) costs no heavy import.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class Backend:
    """One export format.

    name: the format's name in params.yaml (`devices.<d>.format`); runtime: the runtime that loads it
    (`devices.<d>.runtime`); grid / writer / runner: module paths (see the module docstring); file_name:
    the artifact's main file; side_files: files the writer may add beside it (an ONNX model over 2 GB
    keeps its weights in `model.onnx.data`); layer_overhead_s: default per-layer, per-token runtime
    overhead of the cost model (seconds) until measured; runtime_emulation: an extracted model computes
    as the runtime does (llama.cpp rounds activations); needs_tokenizer_file: the writer embeds the
    model's tokenizer from its base's `tokenizer.gguf`."""

    name: str
    runtime: str
    grid_module: str
    writer_module: str
    runner_module: str
    file_name: str
    side_files: tuple[str, ...] = ()
    layer_overhead_s: float = 50e-6
    runtime_emulation: bool = False
    needs_tokenizer_file: bool = False

    @property
    def grid(self) -> ModuleType:
        return importlib.import_module(self.grid_module)

    @property
    def writer(self) -> ModuleType:
        return importlib.import_module(self.writer_module)

    @property
    def runner(self) -> ModuleType:
        return importlib.import_module(self.runner_module)

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(self.grid.BITS)

    def files(self, out_dir: Path) -> list[Path]:
        """The artifact's files in `out_dir`, main file first: what export hashes and register, promote
        and reproduce hash, log and move together."""
        out_dir = Path(out_dir)
        return [out_dir / self.file_name] + [out_dir / f for f in self.side_files if (out_dir / f).is_file()]

    def sha256(self, out_dir: Path) -> str:
        """sha256 over the artifact's files in order (of the main file alone when it is the only one)."""
        return sha256_files(self.files(out_dir))


def sha256_files(files: list[Path]) -> str:
    """One sha256 over several files' bytes in order (= sha256_file for one file)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()
