"""supernet: importance-order the base model, then train it as a supernet by the sandwich rule with
in-place distillation from the base model. Resumable from its checkpoint."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from steps._common import artifact_dir, load_shard, main_for, report_dir, staged_dir, write_csv, write_json
from tailor import tracking
from tailor.arch import MATRICES, LayerConfig, SubnetConfig, round_ffn
from tailor.config import Params
from tailor.distill import mean_loss
from tailor.elastic import importance
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active, set_max
from tailor.models.base import load_base, sha256_file
from tailor.train import TrainSpec, checkpoint_dir, pick_device, train_kd


def space_for(params: Params, model, drop_order: list[int]) -> SearchSpace:
    sp = params.supernet
    embed = [b for b in sp.bits if b >= 8] or [max(sp.bits)]
    return SearchSpace.build(arch_of(model), sp.bits, embed, sp.min_ffn_frac, sp.min_kv_groups, sp.max_drop_frac,
                             drop_order)


def middle(space: SearchSpace) -> SubnetConfig:
    """A fixed subnet halfway between min and max, to watch the inside of the space train."""
    arch = space.arch
    bits = sorted(space.bits)[len(space.bits) // 2]
    ffn = round_ffn((arch.ffn + space.min_ffn) / 2, arch.ffn)
    kv = (arch.n_kv_heads + space.min_kv + 1) // 2
    drop = set(space.drop_order[: space.max_drop // 2])
    return SubnetConfig(tuple(LayerConfig(i not in drop, kv, ffn, {m: bits for m in MATRICES})
                              for i in range(arch.n_layers)), embed_bits=max(space.embed_bits))


def val_losses(model, space: SearchSpace, val: torch.Tensor, fmt: str) -> dict[str, float]:
    out = {}
    for name, cfg in (("min", space.min()), ("mid", middle(space)), ("max", space.max())):
        set_active(model, cfg, fmt)
        out[name] = mean_loss(model, val)
    set_max(model)
    return out


def run(params: Params, data_dir: Path, out_dir: Path, ckpt_dir: Path) -> dict:
    sp = params.supernet
    device = pick_device(sp.device)
    torch.manual_seed(sp.seed)
    model, tok = load_base(params.model.n_layers, device=device)
    teacher = copy.deepcopy(model).requires_grad_(False)
    calib, train, val = (load_shard(data_dir / f"{s}.safetensors") for s in ("calib", "train", "val"))
    val = val[: sp.val_seqs]

    imp = importance.measure(model, list(calib.long().split(sp.batch_size)))
    importance.permute_(model, imp)
    space = space_for(params, model, imp.drop_order())
    before = val_losses(model, space, val, sp.fmt)

    def sandwich(step: int, gen: torch.Generator):
        cfgs = [space.max(), space.min()] + [space.sample(gen) for _ in range(sp.n_random)]
        return [lambda c=c: set_active(model, c, sp.fmt) for c in cfgs]

    spec = TrainSpec(sp.steps, sp.batch_size, sp.lr, sp.kd_temperature, sp.seed, ckpt_every=max(1, sp.steps // 4),
                     fingerprint=f"supernet:{json.dumps(sp.model_dump(), sort_keys=True)}:{params.model.n_layers}:"
                                 f"{sha256_file(data_dir / 'train.safetensors')[:16]}")
    result = train_kd(model, teacher, train, spec, sandwich, checkpoint_dir(ckpt_dir, spec.fingerprint), desc="supernet")
    set_max(model)
    after = val_losses(model, space, val, sp.fmt)

    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        meta = {"drop_order": imp.drop_order(), "block_importance": imp.block, "bits": sp.bits,
                "embed_bits": list(space.embed_bits), "min_ffn_frac": sp.min_ffn_frac,
                "min_kv_groups": sp.min_kv_groups, "max_drop_frac": sp.max_drop_frac, "fmt": sp.fmt}
        write_json(tmp / "space.json", meta)
    metrics = {"val_loss_before": before, "val_loss_after": after, "steps": sp.steps,
               "resumed_from": result.resumed_from, "tokens": result.tokens, "train_seconds": round(result.seconds, 2),
               "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else 0.0,
               "device": str(device)}
    return {"metrics": metrics, "curve": result.curve}


def main() -> None:
    def stage(params: Params, _: str | None) -> None:
        with tracking.stage_run("supernet", params=params.supernet.model_dump()) as tr:
            ckpt = Path(".cache/ckpt/supernet")
            out = run(params, artifact_dir("calibrate"), artifact_dir("supernet"), ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)  # the stage output is complete: nothing to resume
            rep = report_dir("supernet")
            write_json(rep / "metrics.json", out["metrics"])
            write_csv(rep / "curve.csv", [{"step": p["step"], "loss": round(p["loss"], 6)} for p in out["curve"]])
            tr.log_metrics(out["metrics"])
            tr.log_curve(out["curve"])

    main_for("supernet", stage)


if __name__ == "__main__":
    main()
