"""Deterministic splits: token shards (train/val/calib) from documents, seeded eval subsets.

Token shards: each corpus's documents are shuffled with the seed and consumed in order, val first,
then calib, then train. Every split is packed from its own documents (doc + EOS + doc + EOS ...) cut
into `seq_len` windows; the tail of the last document is dropped, so no document straddles two splits.
Taking val first keeps val and calib identical when only `train_seqs` changes, so runs stay comparable.
Each split's quota is shared evenly by the corpora; within a split the sequences are shuffled. A train quota
of None takes every document a corpus has left (its whole tail, cut into windows), so the corpora's shares are
then as uneven as their sizes.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tailor.data.sources import DataError

SPLITS = ("val", "calib", "train")  # consumption order, see the module docstring
TOKENIZE_BATCH = 64


class Tokenizer(Protocol):
    """What we need of a Hugging Face tokenizer (tests pass a tiny one)."""
    eos_token_id: int | None

    def __call__(self, texts: list[str], add_special_tokens: bool = ...) -> dict: ...


def rng(seed: int, purpose: str) -> random.Random:
    # string seeds hash with sha512: stable across processes and Python versions, unlike hash()
    return random.Random(f"tailor.data:{seed}:{purpose}")


def share(n: int, k: int) -> list[int]:
    """n items over k parts as evenly as possible, larger parts first."""
    return [n // k + (i < n % k) for i in range(k)]


def _token_stream(docs: Sequence[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Tokenize lazily in small batches: a build needs a small prefix of each shuffled corpus."""
    for i in range(0, len(docs), TOKENIZE_BATCH):
        yield from tokenizer(list(docs[i:i + TOKENIZE_BATCH]), add_special_tokens=False)["input_ids"]


def pack_corpus(name: str, docs: Sequence[str], tokenizer: Tokenizer, quotas: dict[str, int | None], seq_len: int,
                seed: int, where: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Split one corpus into {split: int32 [quota, seq_len]}; also returns documents used per split. A quota
    of None (train only: it comes last) takes every document left, [len(tokens) // seq_len, seq_len].
    DataError naming the corpus when it cannot fill a quota, or None finds less than one window left."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token_id (documents are joined with EOS)")
    order = list(range(len(docs)))
    rng(seed, f"docs:{name}").shuffle(order)
    stream = _token_stream([docs[i] for i in order], tokenizer)
    out: dict[str, np.ndarray] = {}
    used: dict[str, int] = {}
    for split in SPLITS:
        rest = quotas[split] is None  # every document left: only the last split can take them
        if rest and split != SPLITS[-1]:
            raise DataError(f"corpus {name}: only {SPLITS[-1]} can take every document left, not {split}")
        need = math.inf if rest else quotas[split] * seq_len
        buf: list[int] = []
        n_docs = 0
        while len(buf) < need:
            ids = next(stream, None)
            if ids is None:
                if rest:
                    break
                raise DataError(f"corpus {name} ({where}): {len(buf)} tokens left for {split}, need {need} "
                                f"({quotas[split]} seqs x seq_len {seq_len}); lower calibrate.*_seqs or seq_len")
            buf += ids
            buf.append(eos)
            n_docs += 1
        n = len(buf) // seq_len if rest else quotas[split]  # an int quota may be 0: fewer seqs than corpora
        if rest and n == 0:
            raise DataError(f"corpus {name} ({where}): {len(buf)} tokens left for {split} after val and calib, less "
                            f"than one sequence of seq_len {seq_len}; lower calibrate.val_seqs, calib_seqs or seq_len, "
                            f"or drop {name} from calibrate.corpora")
        out[split] = np.asarray(buf[:n * seq_len], dtype=np.int32).reshape(n, seq_len)  # (N, T)
        used[split] = n_docs
    return out, used


def merge_split(parts: list[np.ndarray], seed: int, split: str, seq_len: int) -> np.ndarray:
    """Concatenate the corpora's sequences of one split and shuffle them (seeded)."""
    arr = np.concatenate(parts) if parts else np.zeros((0, seq_len), np.int32)
    order = list(range(len(arr)))
    rng(seed, f"split:{split}").shuffle(order)
    return arr[order]


def write_shard(path: Path, ids: np.ndarray, meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file  # same file format torch's load_file reads

    # one metadata key: safetensors writes several keys in hash order, and the bytes must repeat
    save_file({"input_ids": np.ascontiguousarray(ids, dtype=np.int32)}, str(path),
              metadata={"tailor.calibrate": json.dumps(meta, sort_keys=True)})


# ---- eval subsets -------------------------------------------------------------------------------

_PUNCT = {i: " " for i in range(128) if not chr(i).isalnum()}


def normalize(text: str) -> str:
    """Lowercase words, ASCII punctuation gone: the wiki sentences have their commas stripped, the corpora
    do not. (str.translate: twice as fast as a regex over the ~15 MB of corpora.)"""
    return " ".join(text.lower().translate(_PUNCT).split())


class Overlap:
    """Substring test of normalized sentences against the normalized training corpora."""

    def __init__(self, docs: Sequence[str]) -> None:
        self._text = " | " + " | ".join(normalize(d) for d in docs) + " | "  # "|" never survives normalize

    def __contains__(self, sentence: str) -> bool:
        s = normalize(sentence)
        return not s or f" {s} " in self._text


def pick(n_rows: int, k: int, seed: int, purpose: str) -> list[int]:
    """k of n row indices, seeded, returned in file order (subsets read like the source)."""
    order = list(range(n_rows))
    rng(seed, purpose).shuffle(order)
    return sorted(order[:k])


def pick_held_out(texts: Sequence[str], k: int, seed: int, overlap: Overlap) -> tuple[list[int], int, int]:
    """k sentences not found in the corpora: walk a seeded order, skip overlaps.

    Returns (indices in file order, sentences checked, sentences dropped for overlap)."""
    order = list(range(len(texts)))
    rng(seed, "eval:wiki").shuffle(order)
    chosen: list[int] = []
    dropped = 0
    for i in order:
        if len(chosen) == k:
            break
        if texts[i] in overlap:
            dropped += 1
        else:
            chosen.append(i)
    return sorted(chosen), len(chosen) + dropped, dropped


def stratified(groups: Sequence[str], k: int, seed: int, purpose: str) -> list[int]:
    """k row indices, every group present, the rest proportional to group size (largest remainder)."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    names = sorted(by)
    if k < len(names):
        raise ValueError(f"{k} rows cannot cover {len(names)} groups")
    k = min(k, len(groups))
    quota = {g: 1 for g in names}  # one each first, so every group appears
    rest = k - len(names)
    pool = {g: len(by[g]) - 1 for g in names}
    total = sum(pool.values())
    exact = {g: rest * pool[g] / total if total else 0.0 for g in names}
    for g in names:
        quota[g] += int(exact[g])
    left = k - sum(quota.values())
    ranked = sorted(names, key=lambda g: (-(exact[g] - int(exact[g])), g))
    while left > 0:  # hand out what rounding left, largest remainders first, never beyond a group's size
        for g in ranked:
            if left and quota[g] < len(by[g]):
                quota[g] += 1
                left -= 1
    chosen: list[int] = []
    for g in names:
        idx = list(by[g])
        rng(seed, f"{purpose}:{g}").shuffle(idx)
        chosen += idx[:quota[g]]
    return sorted(chosen)
