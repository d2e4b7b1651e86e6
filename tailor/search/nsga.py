"""Strategy (b): NSGA-II (Optuna's sampler) over quality x bytes x latency, every trial scored on the
supernet, the population seeded with the MIP's solutions (AMQ's recipe, with structure in the genome).

The genome is per layer: kept (droppable layers only), KV groups, FFN width (the space's grid: steps of 64,
of 256 with K-quants) and one choice per matrix among those that fit it at every width
(`SearchSpace.choices_for`), so every genome is a valid subnet and Optuna's categories never change. Over-budget genomes are infeasible through Optuna's constraints (bytes - budget,
dropped layers - cap), which NSGA-II ranks below every feasible one.
"""
from __future__ import annotations

import logging
from typing import Callable

import optuna

from tailor.arch import MATRICES, LayerConfig, SubnetConfig
from tailor.elastic.space import SearchSpace


def _genome(space: SearchSpace, trial: optuna.Trial, embed_bits: int) -> SubnetConfig:
    arch = space.arch
    ffns = space.ffn_widths()
    per_matrix = {m: list(space.choices_for(m)) for m in MATRICES}
    layers = []
    for i in range(arch.n_layers):
        keep = bool(trial.suggest_categorical(f"keep{i}", [1, 0])) if i in space.droppable else True
        kv = trial.suggest_categorical(f"kv{i}", list(range(space.min_kv, arch.n_kv_heads + 1)))
        ffn = trial.suggest_categorical(f"ffn{i}", ffns)
        bits = {m: trial.suggest_categorical(f"b{i}{m}", per_matrix[m]) for m in MATRICES}
        layers.append(LayerConfig(keep, kv, ffn, bits))
    return SubnetConfig(tuple(layers), embed_bits=embed_bits)


def _params(space: SearchSpace, cfg: SubnetConfig) -> dict:
    out = {}
    for i, lc in enumerate(cfg.layers):
        if i in space.droppable:
            out[f"keep{i}"] = int(lc.keep)
        out.update({f"kv{i}": lc.kv_groups, f"ffn{i}": lc.ffn})
        out.update({f"b{i}{m}": b for m, b in lc.bits.items()})
    return out


def run(space: SearchSpace, embed_bits: int, evaluate: Callable[[SubnetConfig], tuple[float, int, float]],
        budget: int, n_trials: int, seed: int, seeds: list[SubnetConfig], population: int = 16) -> list[tuple]:
    """Evaluate `n_trials` genomes; returns [(config, kl, bytes, latency)] in trial order.

    `evaluate(cfg)` -> (kl, bytes, latency_s). Deterministic for a seed (one worker, seeded sampler)."""
    optuna.logging.set_verbosity(logging.WARNING)
    results: dict[int, tuple] = {}

    def constraints(t: optuna.trial.FrozenTrial) -> list[float]:
        return t.user_attrs["constraints"]

    sampler = optuna.samplers.NSGAIISampler(population_size=max(2, min(population, n_trials)), seed=seed,
                                            constraints_func=constraints)
    study = optuna.create_study(directions=["minimize", "minimize", "minimize"], sampler=sampler)
    for cfg in seeds:
        study.enqueue_trial(_params(space, cfg))

    def objective(trial: optuna.Trial):
        cfg = _genome(space, trial, embed_bits)
        dropped = sum(not lc.keep for lc in cfg.layers)
        nbytes_est = None
        if dropped > space.max_drop:  # outside the space: not worth a forward pass
            kl, nbytes, lat = 1e3, 10**12, 1e3
        else:
            kl, nbytes, lat = evaluate(cfg)
            nbytes_est = nbytes
        trial.set_user_attr("constraints", [float(nbytes - budget), float(dropped - space.max_drop)])
        results[trial.number] = (cfg, kl, nbytes_est, lat)
        return kl, float(nbytes), lat

    study.optimize(objective, n_trials=n_trials, n_jobs=1, show_progress_bar=False)
    return [results[k] for k in sorted(results) if results[k][2] is not None]
