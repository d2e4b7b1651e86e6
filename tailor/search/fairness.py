"""Fairness-aware search: a worst-group bias term measured on small CrowS-Pairs slices.

For each pair the model's preference for the stereotyped sentence is the log-likelihood difference
log P(stereotyped) - log P(anti-stereotyped); a group's soft stereotype share is the mean sigmoid of
it over the group's pairs (CrowS-Pairs' metric, made smooth so that a few pairs per group still move
continuously). A subnet's worst-group delta is the largest rise of that share over the base model's
across bias types: what the fairness-aware objective penalises, so a subnet cannot buy its size with
one group's degradation.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F


def load_pairs(path: Path, per_group: int, seed: int) -> list[dict]:
    """A seeded subset of CrowS-Pairs: up to `per_group` pairs per bias type, as (stereo, anti, group)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for r in rows:
        stereo = r["sent_more"] if r["stereo_antistereo"] == "stereo" else r["sent_less"]
        anti = r["sent_less"] if r["stereo_antistereo"] == "stereo" else r["sent_more"]
        by.setdefault(r["bias_type"], []).append({"stereo": stereo, "anti": anti, "group": r["bias_type"]})
    rng = random.Random(seed)
    out = []
    for g in sorted(by):
        items = by[g][:]
        rng.shuffle(items)
        out += items[:per_group]
    return out


def encode(tok, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of scored positions for [stereo_0, anti_0, stereo_1, ...]."""
    seqs = []
    for p in pairs:
        for s in (p["stereo"], p["anti"]):
            ids = tok(s, add_special_tokens=False)["input_ids"]
            seqs.append(([tok.bos_token_id] if tok.bos_token_id is not None else [tok.eos_token_id]) + ids)
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s) - 1] = 1
    return ids, mask


@torch.no_grad()
def group_shares(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, groups: list[str],
                 batch_size: int = 32) -> dict[str, float]:
    dev = next(model.parameters()).device
    lls = []
    for i in range(0, len(ids), batch_size):
        x = ids[i: i + batch_size].to(dev)
        logp = F.log_softmax(model(x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
        lls.append((logp * mask[i: i + batch_size].to(dev)).sum(-1).cpu())
    ll = torch.cat(lls)
    pref = torch.sigmoid(ll[0::2] - ll[1::2])
    out: dict[str, list[float]] = {}
    for g, v in zip(groups, pref.tolist()):
        out.setdefault(g, []).append(v)
    return {g: sum(v) / len(v) for g, v in out.items()}


def worst_delta(sub: dict[str, float], base: dict[str, float]) -> tuple[str, float]:
    """The group whose stereotype share rose most over the base model's, and by how much."""
    g = max(sub, key=lambda k: sub[k] - base[k])
    return g, sub[g] - base[g]
