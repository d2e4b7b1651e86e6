"""supernet: importance-order the base model, then train it as a supernet by the sandwich rule with
in-place distillation from the base model. Resumable from its checkpoint."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from steps._common import (artifact_dir, base_model_tags, load_shard, main_for, report_dir, staged_dir, write_csv, write_json,
                           writes_outputs)
from tailor import distributed, tracking
from tailor.config import Params
from tailor.distill import mean_loss
from tailor.elastic import importance
from tailor.elastic.space import SearchSpace, sandwich_configs
from tailor.elastic.supernet import arch_of, set_active, set_max
from tailor.models.base import load_base, sha256_file
from tailor.train import TrainSpec, checkpoint_dir, pick_device, train_kd


def space_for(params: Params, model, drop_order: list[int], bits: list) -> SearchSpace:
    sp = params.supernet
    widths = [b for b in bits if isinstance(b, int)]  # the table trains at bit-widths (type names: matrices)
    embed = [b for b in widths if b >= 8] or [max(widths)]
    return SearchSpace.build(arch_of(model), bits, embed, sp.min_ffn_frac, sp.min_kv_groups, sp.max_drop_frac,
                             drop_order)


def val_losses(model, spaces: dict[str, SearchSpace], val: torch.Tensor) -> dict[str, float]:
    """Val loss of the max subnet and of each format's min and middle subnets ("min", "mid" for the
    first format, "min_<fmt>", "mid_<fmt>" for the others)."""
    first = next(iter(spaces))
    out = {"max": None}
    for fmt, space in spaces.items():
        suffix = "" if fmt == first else f"_{fmt}"
        for name, cfg in ((f"min{suffix}", space.min()), (f"mid{suffix}", space.middle())):
            set_active(model, cfg, fmt)
            out[name] = mean_loss(model, val)
    set_max(model)
    out["max"] = mean_loss(model, val)
    return out


def run(params: Params, data_dir: Path, out_dir: Path, ckpt_dir: Path) -> dict:
    sp = params.supernet
    device = pick_device(sp.device)
    torch.manual_seed(sp.seed)
    # blockwise: the model waits on the CPU and one block at a time goes to the device
    model, tok = load_base(params.model.source, params.model.n_layers, device="cpu" if sp.mode == "blockwise" else device)
    teacher = copy.deepcopy(model).requires_grad_(False)
    calib, train, val = (load_shard(data_dir / f"{s}.safetensors") for s in ("calib", "train", "val"))
    val = val[: sp.val_seqs]

    imp = importance.measure(model, list(calib.long().split(sp.batch_size)))
    importance.permute_(model, imp)
    formats = params.supernet_formats()
    spaces = {f: space_for(params, model, imp.drop_order(), bits) for f, bits in formats.items()}
    before = val_losses(model, spaces, val)

    def sandwich(step: int, gen: torch.Generator):
        return [lambda c=c, f=f: set_active(model, c, f) for c, f in sandwich_configs(spaces, step, sp.n_random, gen)]

    spec = TrainSpec(sp.steps, sp.batch_size, sp.lr, sp.kd_temperature, sp.seed, ckpt_every=max(1, sp.steps // 4),
                     amp=sp.amp, compile=sp.compile, parallel=sp.parallel,  # not in the fingerprint: resumes across it
                     kd_chunk=sp.kd_chunk, checkpointing=sp.checkpointing,
                     fingerprint=f"supernet:{json.dumps(sp.model_dump(exclude={'parallel', 'nproc', 'checkpointing'}), sort_keys=True)}:{formats}:{params.model.n_layers}:"
                                 f"{sha256_file(data_dir / 'train.safetensors')[:16]}")
    ckpt = checkpoint_dir(ckpt_dir, spec.fingerprint)
    blocks = []
    if sp.mode == "blockwise":
        blocks = blockwise_phase(model, teacher, train, spec, spaces, sp, ckpt / "blocks", device)
        if sp.steps:  # the end-to-end phase trains the whole model on the device
            model.to(device)
            teacher.to(device)
    result = train_kd(model, teacher, train, spec, sandwich, ckpt, desc="supernet")
    set_max(model)
    after = val_losses(model, spaces, val)
    clip = clip_summary(model)

    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        meta = {"drop_order": imp.drop_order(), "block_importance": imp.block, "formats": formats,
                "min_ffn_frac": sp.min_ffn_frac, "min_kv_groups": sp.min_kv_groups, "max_drop_frac": sp.max_drop_frac}
        write_json(tmp / "space.json", meta)
    improved = {k: round(before[k] - after[k], 4) for k in after}
    metrics = {"val_loss_before": before, "val_loss_after": after, "val_loss_drop": improved,
               "learned_clip": clip, "formats": formats, "steps": sp.steps,
               "mode": sp.mode, "block_loss": [[round(r.curve[0]["loss"], 5), round(r.curve[-1]["loss"], 5)] if r.curve else None
                                                for r in blocks],
               "resumed_from": result.resumed_from, "tokens": result.tokens, "train_seconds": round(result.seconds, 2),
               "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else 0.0,
               "device": str(device)}
    return {"metrics": metrics, "curve": result.curve}


def blockwise_phase(model, teacher, train: torch.Tensor, spec: TrainSpec, spaces: dict[str, SearchSpace], sp,
                    work: Path, device: torch.device) -> list:
    """`supernet.mode: blockwise`: every block's elastic choices against the teacher block
    (tailor.elastic.blockwise), blocks split over the torchrun processes in contiguous shares, each
    process walking its own teacher activations; each then loads the others' blocks."""
    from tailor.elastic.blockwise import BlockSpec, train_blocks_shared

    bspec = BlockSpec(sp.block_steps, sp.batch_size, sp.block_lr, sp.seed, ckpt_every=max(1, sp.block_steps // 4),
                      amp=sp.amp, fingerprint=spec.fingerprint)
    return train_blocks_shared(model, teacher, train, bspec, spaces, sp.n_random, work, device, act_batch=sp.batch_size)


def clip_summary(model) -> dict[str, float]:
    """Mean learned clipping factor per format and choice (1.0 = the plain quantizer's range)."""
    from tailor.models.model import QLinear
    from tailor.quant.fake import FMT_INDEX, clip_slot, learns_clip
    from tailor.quant.formats import choices

    g = torch.stack([m.qclip.detach().float().cpu() for m in model.modules()
                     if isinstance(m, QLinear) and m is not model.lm_head])
    return {f"{f}:{b}": round(float(g[:, i, clip_slot(f, b)].mean()), 4) for f, i in FMT_INDEX.items()
            for b in choices(f) if learns_clip(b) and (g[:, i, clip_slot(f, b)] != 1).any()}


def main() -> None:
    def stage(params: Params, _: str | None) -> None:
        ckpt = Path(".cache/ckpt/supernet")
        if not writes_outputs(params.supernet.nproc, "steps.supernet",
                              lambda tmp: run(params, artifact_dir("calibrate"), tmp / "supernet", ckpt)):
            return
        with tracking.stage_run("supernet", params=params.supernet.model_dump(), tags=base_model_tags()) as tr:
            out = run(params, artifact_dir("calibrate"), artifact_dir("supernet"), ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)  # the stage output is complete: nothing to resume
            rep = report_dir("supernet")
            write_json(rep / "metrics.json", out["metrics"])
            write_csv(rep / "curve.csv", [{"step": p["step"], "loss": round(p["loss"], 6)} for p in out["curve"]])
            tr.log_metrics(out["metrics"])
            tr.log_curve(out["curve"])
        distributed.finish()

    main_for("supernet", stage)


if __name__ == "__main__":
    main()
