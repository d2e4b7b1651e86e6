"""Device cost model: exact bytes of a SubnetConfig in the device's format, predicted decode latency.

Decode is memory bound for models this size: every token streams every weight once, so
latency ~= bytes / bandwidth + per-layer runtime overhead + flops / compute. The overhead defaults
below are first estimates; measuring the real runtime on this machine refines them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from tailor.arch import BaseArch, SubnetConfig
from tailor.formats import backend

if TYPE_CHECKING:  # pydantic stays out of the import path of the GPU benchmarks
    from tailor.config import DeviceProfile



@dataclass(frozen=True)
class Cost:
    nbytes: int
    bits_per_param: float
    latency_s: float
    fits: bool


def base_bf16_bytes(arch: BaseArch) -> int:
    """What the budget fraction refers to: the dense base model at 2 bytes per parameter."""
    return 2 * SubnetConfig.max(arch).param_count(arch)


def budget_bytes(device: DeviceProfile, arch: BaseArch) -> int:
    return device.budget(base_bf16_bytes(arch))


def cost(cfg: SubnetConfig, arch: BaseArch, device: DeviceProfile, layer_overhead_s: float | None = None,
         type_cost_s: Mapping[str, float] | None = None) -> Cost:
    """Bytes, bits/param, predicted seconds per decoded token and whether it fits. `layer_overhead_s`
    is the per-layer overhead calibrated on the real runtime (tailor.search.latency), else the default.
    `type_cost_s` (type name -> seconds per weight, `latency.type_cost_s` of a per-type calibration)
    prices each matrix and the LM head by its type's measured decode cost instead of bytes / bandwidth
    and peak compute: a K-quant and a Q4_0 matrix of equal bytes then cost what their kernels cost."""
    nbytes = cfg.nbytes(arch, device.format)
    params = cfg.param_count(arch)
    # per kept layer, per token: the runtime's kernel launches and graph glue (its backend's default)
    overhead = backend(device.format).layer_overhead_s if layer_overhead_s is None else layer_overhead_s
    if type_cost_s is not None:
        from tailor.search.latency import type_weights

        weights = type_weights(cfg, arch, device.format)
        missing = sorted(set(weights) - set(type_cost_s))
        if missing:
            raise ValueError(f"type_cost_s has no cost for {missing} (has {sorted(type_cost_s)})")
        latency = sum(n * type_cost_s[t] for t, n in weights.items()) + len(cfg.kept) * overhead
    else:
        flops = 2 * (params - arch.vocab * arch.hidden) + 2 * arch.vocab * arch.hidden  # per decoded token
        latency = (nbytes / (device.bandwidth_gbs * 1e9) + len(cfg.kept) * overhead
                   + flops / (device.compute_tflops * 1e12))
    return Cost(nbytes, cfg.bits_per_param(arch, device.format), latency, nbytes <= budget_bytes(device, arch))
