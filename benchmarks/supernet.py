"""Supernet training throughput: Tailor's sandwich step beside plain Hugging Face dense training of the
same architecture, in one process, on one device. Writes reports/bench/supernet.json.

Speed does not depend on weight values, so the SmolLM2-135M architecture is random-initialised (the
GPU machine has no copy of the base model). MFU = achieved FLOP/s / peak, counting 6 x params x tokens
per trained subnet pass and 2 x params x tokens per teacher forward.

    python benchmarks/supernet.py --profile quick          # CPU, a few small steps
    python benchmarks/supernet.py --profile full           # GPU: batch 32 x 512, bf16 autocast
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import torch

from tailor.arch import BaseArch
from tailor.distill import kd_loss
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import set_active
from tailor.models.model import TailorConfig, TailorForCausalLM

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 TFLOP/s (NVIDIA spec sheets)
PROFILES = {"quick": dict(batch=2, seq=128, steps=3, warmup=1), "full": dict(batch=32, seq=512, steps=20, warmup=5)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_dense_hf(device, batch, seq, steps, warmup, dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = TailorConfig()
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                      num_attention_heads=c.num_attention_heads,
                                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                      tie_word_embeddings=True)).to(device=device, dtype=dtype)
    n = sum(p.numel() for p in hf.parameters())
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ids = torch.randint(0, c.vocab_size, (batch, seq), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        loss = hf(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    dt = time.perf_counter() - t0
    tps = batch * seq * steps / dt
    return {"tokens_per_s": tps, "flops_per_s": 6 * n * tps, "params": n}


def bench_sandwich(device, batch, seq, steps, warmup, n_random, autocast, compile_: bool = False) -> dict:
    """Tailor's supernet step: the sandwich over both export grids (gguf {4,5,8,16}, onnx {2,4,8,16})
    with learned clipping, teacher forward, KD loss, AdamW — what steps/supernet.py runs."""
    from tailor.elastic.space import sandwich_configs
    from tailor import accel

    if compile_:
        accel.enable_compile()
    torch.manual_seed(0)
    student = TailorForCausalLM(TailorConfig()).to(device)
    teacher = TailorForCausalLM(TailorConfig()).to(device).requires_grad_(False).eval()
    student.get_input_embeddings().weight.requires_grad_(False)
    student.lm_head.qclip.requires_grad_(False)
    arch = BaseArch.from_hf(student.config)
    spaces = {"gguf": SearchSpace.build(arch, [4, 5, 8, 16], [8, 16], 0.25, 1, 0.25, None),
              "onnx": SearchSpace.build(arch, [2, 4, 8, 16], [8, 16], 0.25, 1, 0.25, None)}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab, (batch, seq), device=device)
    dense = spaces["gguf"].max().param_count(arch)
    def amp():  # bf16 autocast on GPU; plain fp32 on CPU
        return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    flops = 0.0
    student.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, flops, tokens = time.perf_counter(), 0.0, 0
        cfgs = sandwich_configs(spaces, i, n_random, gen)
        with amp(), torch.no_grad():
            t_logits = teacher(ids).logits
        for cfg, fmt in cfgs:
            set_active(student, cfg, fmt)
            with amp():
                loss = kd_loss(student(ids).logits, t_logits)
            loss.backward()
            flops += 6 * cfg.param_count(arch) * ids.numel()
        flops += 2 * dense * ids.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens = (i - warmup + 1) * ids.numel() * len(cfgs)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "flops_per_s": flops / dt, "subnets_per_step": 2 + n_random}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-random", type=int, default=2)
    ap.add_argument("--batches", default=None, help="comma list of batch sizes to try (default: the profile's)")
    ap.add_argument("--out", default="reports/bench/supernet.json")
    a = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    p = PROFILES[a.profile]
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    base = bench_dense_hf(device, p["batch"], p["seq"], p["steps"], p["warmup"], torch.bfloat16 if on_gpu else torch.float32)
    peak = peak_flops(device)
    batches = [int(b) for b in a.batches.split(",")] if a.batches else [p["batch"]]
    variants = []
    # eager first: torch.compile, once switched on, stays on for the process
    for compile_ in ([False, True] if on_gpu else [False]):
        for b in batches:
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                r = bench_sandwich(device, b, p["seq"], p["steps"], p["warmup"], a.n_random, on_gpu, compile_)
            except torch.OutOfMemoryError:
                variants.append({"batch": b, "compile": compile_, "error": "out of memory"})
                continue
            variants.append({"batch": b, "compile": compile_, "tokens_per_s": round(r["tokens_per_s"], 1),
                             "mfu": round(r["flops_per_s"] / peak, 4) if peak else None,
                             "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None})
            print(json.dumps(variants[-1]), flush=True)
    ok = [v for v in variants if "error" not in v]
    best = max(ok, key=lambda v: v["tokens_per_s"] if v["mfu"] is None else v["mfu"])
    out = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "profile": a.profile, "batch": best["batch"], "seq_len": p["seq"], "steps": p["steps"],
        "torch": torch.__version__, "compile": best["compile"],
        "tokens_per_s": best["tokens_per_s"], "mfu": best["mfu"], "peak_mem_gb": best["peak_mem_gb"],
        "subnets_per_step": 2 + a.n_random,
        "variants": variants,
        "baseline_hf_dense": {"batch": p["batch"], "tokens_per_s": round(base["tokens_per_s"], 1),
                              "mfu": round(base["flops_per_s"] / peak, 4) if peak else None},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
