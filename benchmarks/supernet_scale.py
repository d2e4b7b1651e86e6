"""Supernet training at real shapes (random weights): Llama-3.2-1B and Llama-3.1-8B, end to end (the
sandwich over whole subnets, chunked KD loss, activation checkpointing) and blockwise (one block's
sandwich against the teacher block, tailor.elastic.blockwise).

Both modes run the library's own training code: `tailor.train.train_kd` end to end, and
`tailor.elastic.blockwise.train_block` for one block (every block of a shape has the same shape, so
one block's step is each block's step; the teacher block's forward, which the teacher pass does once per
token, is timed beside it and added). Each run writes its rows to --out; the rows of the H200 calls are
merged under "scale" in reports/bench/supernet.json (with the call each came from).

FLOPs are counted from the subnets the sandwich really drew, per pass: 2 x tokens x (sum of the active
weight matrices) per kept layer, causal attention 2 x tokens x seq x heads x head_dim (QK^T and PV, half
the square), the head 2 x tokens x hidden x vocab; a trained pass is 3x its forward (the head 2x:
its frozen table needs no weight gradient), the teacher 1x. MFU counts those model FLOPs against the
H100/H200's dense bf16 peak (989 TFLOP/s, NVIDIA's sheet); HFU adds the recomputed forward of
activation checkpointing. Fake quantization, norms, RoPE and the loss's softmaxes are not counted.

    python benchmarks/supernet_scale.py --profile tiny      # CPU: a toy shape, checks the script
    python benchmarks/supernet_scale.py --profile h200      # one H200: every row below
    python benchmarks/supernet_scale.py --profile smollm2   # one H200: the 135M full profile's step
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from pathlib import Path

import torch

from tailor.arch import MATRICES, BaseArch, LayerConfig
from tailor.elastic.blockwise import BlockSpec, block_sandwich, train_block
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.model import Block, TailorConfig, TailorForCausalLM, rope_tables
from tailor.train import TrainSpec, train_kd

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, NVIDIA spec sheets
SHAPES = {  # the Hugging Face configs' numbers (Llama-3.1-8B's head is untied; tied here, same FLOPs)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, num_hidden_layers=16, rope_theta=500000.0),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, num_hidden_layers=32, rope_theta=500000.0),
    # the model the pipeline compresses: the full profile's supernet step at its own shape
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, num_hidden_layers=30, rope_theta=100000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, num_hidden_layers=2, rope_theta=10000.0),
}
S = 2048
ROWS = {
    "tiny": [dict(shape="tiny", mode="end_to_end", batch=2, seq=64, kd_chunk=0),
             dict(shape="tiny", mode="end_to_end", batch=2, seq=64, kd_chunk=48, checkpointing=True),
             dict(shape="tiny", mode="blockwise", batch=2, seq=64, profile=True),
             dict(shape="tiny", mode="kd_check", tokens=96),
             dict(shape="tiny", mode="pipeline", layers=2, seqs=4, seq=32, batch=2, block_steps=3)],
    # session 14: the 135M full profile's step (batch 32 x 512, sandwich of 4), each matrix quantized alone
    # (grouped=False, the code before) beside one quantizer call per grid (grouped=True); the integer grids
    # of the pipeline's two devices, and the K-quant grid of benchmarks/kquant_gpu.py; eager, then compiled
    "smollm2": [
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grouped=False, profile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grouped=True, profile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grid="k", grouped=False),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grid="k", grouped=True, profile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grouped=False, compile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grouped=True, compile=True, profile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=32, seq=512, grid="k", grouped=True, compile=True),
        dict(shape="smollm2-135m", mode="end_to_end", batch=64, seq=512, grouped=True, compile=True),
    ],
    "h200-3": [  # third call: the blockwise pipeline itself on the GPU, chunked-vs-plain loss there, a repeat
        dict(shape="llama-3.2-1b", mode="kd_check", tokens=8192),
        dict(shape="llama-3.1-8b", mode="pipeline", layers=2, seqs=16, seq=S, batch=8, block_steps=4),
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=16, seq=S, kd_chunk=4096, compile=True),
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=16, seq=S, kd_chunk=4096, compile=True),
    ],
    "h200-2": [  # second call: every row compiled (--compile), larger batches
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=8, seq=S, kd_chunk=4096, profile=True),
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=16, seq=S, kd_chunk=4096),
        dict(shape="llama-3.2-1b", mode="blockwise", batch=64, seq=S),
        dict(shape="llama-3.2-1b", mode="blockwise", batch=128, seq=S, profile=True),
        dict(shape="llama-3.1-8b", mode="blockwise", batch=64, seq=S, profile=True),
        dict(shape="llama-3.1-8b", mode="end_to_end", batch=16, seq=S, kd_chunk=4096, checkpointing=True, layers=4),
    ],
    "h200": [
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=8, seq=S, kd_chunk=0),  # today's path, for memory
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=8, seq=S, kd_chunk=4096),
        dict(shape="llama-3.2-1b", mode="end_to_end", batch=32, seq=S, kd_chunk=4096, checkpointing=True, profile=True),
        dict(shape="llama-3.2-1b", mode="blockwise", batch=32, seq=S, profile=True),
        dict(shape="llama-3.1-8b", mode="blockwise", batch=16, seq=S),
        dict(shape="llama-3.1-8b", mode="blockwise", batch=64, seq=S, profile=True),
        dict(shape="llama-3.1-8b", mode="end_to_end", batch=16, seq=S, kd_chunk=4096, checkpointing=True, layers=4),
    ],
}
GRIDS = {"gguf": [4, 5, 8, 16], "onnx": [2, 4, 8, 16]}
KGRID = {"gguf": ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", 8, 16]}  # params.yaml's quick-k phone


def config(shape: str, layers: int | None = None) -> TailorConfig:
    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    return TailorConfig(**kw, rms_norm_eps=1e-5, max_position_embeddings=8192)


def spaces_for(arch: BaseArch, grid: str = "int") -> dict[str, SearchSpace]:
    """The sandwich's spaces: "int" both devices' integer grids, "k" the phone's K-quant grid."""
    return {f: SearchSpace.build(arch, bits, [8, 16], 0.25, 1, 0.25, None)
            for f, bits in (KGRID if grid == "k" else GRIDS).items()}


def layer_flops(arch: BaseArch, lc: LayerConfig, tokens: int, seq: int) -> float:
    """Forward FLOPs of one decoder layer at config `lc` over `tokens` tokens in sequences of `seq`."""
    lin = sum(r * c for r, c in (arch.matrix_shape(m, lc.kv_groups, lc.ffn) for m in MATRICES))
    return 2.0 * tokens * lin + 2.0 * tokens * seq * lc.kv_groups * arch.q_per_kv * arch.head_dim


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(fn, device, step_s: float) -> dict:
    """Where GPU time goes in one training step: matmul / attention / other kernels, and the kernels'
    total over the step's measured time. `fn(tick)` runs the step and calls `tick()` as it starts (the
    setup before it, e.g. moving a block's activations to the GPU, is left out)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if device.type != "cuda":
        return {}
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=1, warmup=0, active=1)) as prof:
        fn(prof.step)
        _sync(device)
    return kernel_summary(prof.key_averages(), step_s)


def kernel_summary(events, step_s: float) -> dict:
    """GPU kernel time of profiled events (`prof.key_averages()`) by kind: matmul, attention, comm (NCCL
    collectives, which run on their own stream and may overlap compute), memcpy, other; and the kernels'
    total over `step_s`, the wall time the profile covered."""
    cats: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "comm": 0.0, "memcpy": 0.0, "other": 0.0}
    other: dict[str, float] = {}
    for e in events:
        t = e.self_device_time_total
        if t <= 0:
            continue
        n = e.key.lower()
        if "nccl" in n:
            cats["comm"] += t
        elif any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas")):
            cats["matmul"] += t
        elif any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
            cats["attention"] += t
        elif "memcpy" in n:
            cats["memcpy"] += t
        else:
            cats["other"] += t
            other[e.key[:90]] = other.get(e.key[:90], 0.0) + t
    busy = sum(cats.values()) or 1.0
    return {"kernel_share": {k: round(v / busy, 3) for k, v in cats.items()},
            "kernel_time_of_step": round(busy / 1e6 / step_s, 3),
            "comm_kernel_s": round(cats["comm"] / 1e6, 4),
            "top_other_kernels": [[k, round(v / busy, 3)] for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:8]]}


def bench_end_to_end(row: dict, device, steps: int, warmup: int) -> dict:
    cfg = config(row["shape"], row.get("layers"))
    with torch.device(device):
        student = TailorForCausalLM(cfg)
        teacher = TailorForCausalLM(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    teacher.requires_grad_(False).eval()
    student.grouped_quant = row.get("grouped")  # None: the library's default (grouped on CUDA)
    arch = arch_of(student)
    spaces = spaces_for(arch, row.get("grid", "int"))
    drawn: list[list] = []

    def sandwich(step, gen):
        from tailor.elastic.space import sandwich_configs
        cfgs = sandwich_configs(spaces, step, row.get("n_random", 2), gen)
        drawn.append([c for c, _ in cfgs])
        return [lambda c=c, f=f: set_active(student, c, f) for c, f in cfgs]

    b, seq = row["batch"], row["seq"]
    data = torch.randint(0, cfg.vocab_size, (b * (steps + warmup + 1), seq), generator=torch.Generator().manual_seed(0))
    spec = TrainSpec(steps=warmup + steps, batch_size=b, lr=1e-5, temperature=1.0, seed=0, ckpt_every=10**9,
                     compile=row.get("compile", False), kd_chunk=row.get("kd_chunk", 0),
                     checkpointing=row.get("checkpointing", False))
    res = train_kd(student, teacher, data, spec, sandwich)
    timed = res.curve[warmup:]
    secs = sum(b * seq * len(drawn[p["step"] - 1]) / p["tokens_per_s"] for p in timed)
    tokens = b * seq
    model_flops, recompute = sandwich_flops(arch, drawn[warmup:], tokens, seq, spec.checkpointing)
    out = {"student_tokens_per_s": sum(tokens * len(c) for c in drawn[warmup:]) / secs,
           "model_tflops_per_s": model_flops / secs / 1e12, "hw_tflops_per_s": (model_flops + recompute) / secs / 1e12,
           "step_s": secs / len(timed), "loss_last": timed[-1]["loss"],
           "params": sum(p.numel() for p in student.parameters())}
    if row.get("profile"):
        spec1 = TrainSpec(steps=1, batch_size=b, lr=1e-5, temperature=1.0, seed=1, compile=spec.compile,
                          kd_chunk=spec.kd_chunk, checkpointing=spec.checkpointing)

        def run(tick):
            def ticking(step, gen):
                tick()
                return sandwich(step, gen)
            train_kd(student, teacher, data, spec1, ticking)
        out["profile"] = _profile(run, device, out["step_s"])
    return out


def sandwich_flops(arch: BaseArch, drawn: list[list], tokens: int, seq: int, checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, recomputed FLOPs) of end-to-end steps that drew the subnets `drawn` (one list of
    SubnetConfigs per step), each over `tokens` tokens in sequences of `seq`: the teacher's forward once
    per step, each subnet's pass 3x its forward (the frozen head 2x), activation checkpointing's
    recomputed forward of the body apart (HFU counts it, MFU does not)."""
    head = 2.0 * tokens * arch.hidden * arch.vocab
    model_flops = recompute = 0.0
    for cfgs in drawn:
        model_flops += sum(layer_flops(arch, lc, tokens, seq) for lc in SpaceMax(arch)) + head
        for c in cfgs:
            body = sum(layer_flops(arch, lc, tokens, seq) for lc in c.layers if lc.keep)
            model_flops += 3 * body + 2 * head
            recompute += body if checkpointing else 0.0
    return model_flops, recompute


def SpaceMax(arch: BaseArch):
    return [LayerConfig(True, arch.n_kv_heads, arch.ffn, {m: 16 for m in MATRICES})] * arch.n_layers


def bench_blockwise(row: dict, device, steps: int, warmup: int) -> dict:
    cfg = config(row["shape"])
    arch = BaseArch.from_hf(cfg)
    layer = arch.n_layers // 2
    with torch.device(device):
        student = Block(cfg, layer)
        teacher = Block(cfg, layer).to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False)
    for m in student.modules():  # the model's init (post_init does this for a whole model)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    teacher.load_state_dict({k: v for k, v in student.state_dict().items()})
    b, seq = row["batch"], row["seq"]
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b * 2, seq, arch.hidden, generator=g).to(dt)
    cos, sin = rope_tables(arch.head_dim, cfg.rope_theta, torch.arange(seq), torch.float32)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    # the teacher pass: one forward of the teacher block per token (timed here, done once per epoch)
    with torch.no_grad(), amp():
        xs = x.to(device)
        cd, sd = cos.to(device), sin.to(device)
        y = teacher(xs[:b].float(), cd, sd)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            y = teacher(xs[:b].float(), cd, sd)
        _sync(device)
        t_teacher = (time.perf_counter() - t0) / 3
        y = torch.cat([teacher(xs[i: i + b].float(), cd, sd) for i in range(0, len(xs), b)]).to(dt).cpu()
        del xs
    spaces = spaces_for(arch)
    spec = BlockSpec(steps=warmup + steps, batch_size=b, lr=1e-5, seed=0, ckpt_every=10**9)
    drawn: list[list] = []
    inner = block_sandwich(spaces, layer, row.get("n_random", 2))

    def sandwich(step, gen):
        cfgs = inner(step, gen)
        drawn.append([lc for lc, _ in cfgs])
        return cfgs

    stamps: list[float] = []

    def on_step(step, loss):
        _sync(device)
        stamps.append(time.perf_counter())

    res = train_block(student, x, y, cos, sin, spec, sandwich, device=device, on_step=on_step, index=layer)
    secs_train = stamps[-1] - stamps[warmup - 1]
    n = len(stamps) - warmup
    tokens = b * seq
    secs = secs_train + n * t_teacher
    model_flops = n * layer_flops(arch, SpaceMax(arch)[0], tokens, seq)
    model_flops += sum(3 * layer_flops(arch, lc, tokens, seq) for cfgs in drawn[warmup:] for lc in cfgs)
    student_tokens = sum(tokens * len(c) for c in drawn[warmup:])
    out = {"student_tokens_per_s": student_tokens / secs / arch.n_layers,  # the whole model: L blocks in turn
           "block_student_tokens_per_s": student_tokens / secs,
           "model_tflops_per_s": model_flops / secs / 1e12, "hw_tflops_per_s": model_flops / secs / 1e12,
           "step_s": secs / n, "teacher_share": round(n * t_teacher / secs, 3), "loss_last": res.curve[-1]["loss"],
           "block_params": sum(p.numel() for p in student.parameters())}
    if row.get("profile"):
        spec1 = BlockSpec(steps=1, batch_size=b, lr=1e-5, seed=1, ckpt_every=10**9)

        def run(tick):
            def ticking(step, gen):
                tick()
                return inner(step, gen)
            train_block(student, x, y, cos, sin, spec1, ticking, device=device)
        out["profile"] = _profile(run, device, secs_train / n)
    return out


def bench_pipeline(row: dict, device, steps: int, warmup: int) -> dict:
    """`train_blocks` itself on the device: a model of the shape's width with `layers` layers kept on the
    CPU (fp32 student, bf16 teacher), teacher pass to disk, each block trained on the GPU in turn with
    checkpoints, then a second call that finds every block done (resume)."""
    import copy
    import tempfile

    from tailor.elastic.blockwise import load_trained, train_blocks

    cfg = config(row["shape"], row["layers"])
    torch.manual_seed(0)
    student = TailorForCausalLM(cfg)
    teacher = copy.deepcopy(student).to(torch.bfloat16).requires_grad_(False)
    spaces = spaces_for(arch_of(student))
    data = torch.randint(0, cfg.vocab_size, (row["seqs"], row["seq"]), generator=torch.Generator().manual_seed(0))
    spec = BlockSpec(steps=row["block_steps"], batch_size=row["batch"], lr=1e-5, seed=0, ckpt_every=2)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        res = train_blocks(student, teacher, data, spec, spaces, 2, Path(work), device, act_batch=row["batch"])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = train_blocks(student, teacher, data, spec, spaces, 2, Path(work), device, act_batch=row["batch"])
        second = time.perf_counter() - t0
        fresh = TailorForCausalLM(cfg)
        missing = load_trained(fresh, Path(work), spec)
        same = all(torch.equal(a, b) for a, b in zip(fresh.model.layers.state_dict().values(),
                                                      student.model.layers.state_dict().values()))
    on_gpu = [n for n, p in student.named_parameters() if p.device.type != "cpu"]
    return {"first_call_s": first, "resumed_call_s": second, "blocks_resumed_at": [r.resumed_from for r in again],
            "block_loss_first_last": [[r.curve[0]["loss"], r.curve[-1]["loss"]] for r in res],
            "unfinished_after": missing, "reloaded_equal": same, "student_params_left_on_gpu": len(on_gpu)}


def bench_kd_check(row: dict, device, steps: int, warmup: int) -> dict:
    """Chunked vs plain KD loss on the device under bf16 autocast, at the shape's hidden size and vocabulary."""
    from tailor.distill import chunked_kd_loss, kd_loss

    cfg = config(row["shape"])
    g = torch.Generator(device=device).manual_seed(0)
    n, h, v = row["tokens"], cfg.hidden_size, cfg.vocab_size
    hid = torch.randn(n, h, device=device, generator=g).requires_grad_(True)
    w = (0.02 * torch.randn(v, h, device=device, generator=g)).requires_grad_(True)
    t = torch.randn(n, v, device=device, generator=g).to(torch.bfloat16)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = {}
    for name, fn in (("plain", lambda: kd_loss(torch.nn.functional.linear(hid, w), t)),
                     ("chunked", lambda: chunked_kd_loss(hid, w, t, chunk=4096))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with amp:
            loss = fn()
        gh, gw = torch.autograd.grad(loss, (hid, w))
        out[name] = (loss.float(), gh.float(), gw.float())
        if device.type == "cuda":
            out[f"{name}_extra_peak_gb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 2)
    (lp, hp, wp), (lc, hc, wc) = out.pop("plain"), out.pop("chunked")
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {**out, "loss_rel_diff": rel(lc, lp), "grad_hidden_rel_diff": rel(hc, hp), "grad_weight_rel_diff": rel(wc, wp)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=list(ROWS), default="tiny")
    ap.add_argument("--rows", default=None, help="comma list of row indices of the profile to run")
    ap.add_argument("--compile", action="store_true", help="torch.compile the quantizer and KD loss (after eager rows)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", default="reports/bench/supernet_scale.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = a.steps or (4 if device.type == "cuda" else 2)
    warmup = a.warmup or 2
    rows = ROWS[a.profile]
    if a.rows:
        rows = [rows[int(i)] for i in a.rows.split(",")]
    if a.compile:
        from tailor import accel
        accel.enable_compile()
        rows = [dict(r, compile=True) for r in rows]
    peak = PEAK.get(next((k for k in PEAK if device.type == "cuda" and k in torch.cuda.get_device_name(device)), ""), None)
    results = []
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            fn = {"end_to_end": bench_end_to_end, "blockwise": bench_blockwise, "pipeline": bench_pipeline,
                  "kd_check": bench_kd_check}[row["mode"]]
            r = fn(row, device, steps, warmup)
            r = {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in r.items()}
            if peak and "model_tflops_per_s" in r:
                r["mfu"] = round(r["model_tflops_per_s"] * 1e12 / peak, 4)
                r["hfu"] = round(r["hw_tflops_per_s"] * 1e12 / peak, 4)
        except torch.OutOfMemoryError as e:
            r = {"error": "out of memory", "detail": str(e).splitlines()[0][:200]}
        except Exception as e:  # noqa: BLE001 — one broken row must not lose the others
            r = {"error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-1500:]}
        if device.type == "cuda":
            r["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append({**{k: v for k, v in row.items() if k != "profile"}, **r})
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("trace", "profile")}), flush=True)
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "steps": steps, "warmup": warmup, "rows": results}
        out_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
