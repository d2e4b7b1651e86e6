"""Token-level perplexity, defined once so torch and every runtime are compared on the same footing.

ppl = exp(total NLL / total predicted tokens), each sequence scored on its own from position 0 (the
first token is context only). Runtimes (llama.cpp, onnxruntime) implement the same definition.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def seq_nll(model: torch.nn.Module, seq: Sequence[int], device: str | torch.device = "cpu") -> tuple[float, int]:
    """(sum of NLL over positions 1..n-1, number of predicted tokens) of one sequence."""
    ids = torch.tensor([list(seq)], device=device)
    logits = model(ids).logits[0, :-1].float()  # (T-1, V)
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), len(seq) - 1


def perplexity(model: torch.nn.Module, seqs: Sequence[Sequence[int]], device: str | torch.device = "cpu") -> float:
    total, n = 0.0, 0
    for s in seqs:
        if len(s) < 2:
            continue
        a, b = seq_nll(model, s, device)
        total, n = total + a, n + b
    if n == 0:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(total / n)
