"""Blockwise vs end-to-end supernet training on the real SmolLM2-135M at equal student tokens (issue 18, item 4).

Per mode, in one process on one GPU (the two modes side by side on a two-GPU machine):
1. the permuted base (importance order on the calibration shard, as the supernet stage) becomes the
   supernet: `e2e` trains it by the end-to-end sandwich (tailor.train.train_kd); `blockwise` trains each
   block against the teacher block (tailor.elastic.blockwise.train_blocks), then a short end-to-end phase,
   the two together the same student tokens as `e2e` (a block step counts 1/L of a whole-model step);
2. validation KL to the base of the min, mid and max subnets of both export grids on held-out sequences
   (before training, after the block phase, after training);
3. the phone subnet searched on that supernet: sensitivity table + MIP (tailor.search), every MIP
   solution scored on the search's validation sequences, the least KL under the budget chosen (the
   pipeline's fairness tie-break is left out: this compares training modes);
4. that subnet extracted and fine-tuned with the full profile's recipe (QAT + KD, cosine lr), its
   held-out KL;
5. exported as GGUF; its perplexity on the held-out wiki sentences in llama.cpp (llama-cpp-python carried
   to the GPU machine; CPU), beside the fake-quantized PyTorch model's, and a check that every tensor of
   the file dequantizes (gguf-py) to the model's grid bit for bit, so that the PyTorch number is the
   file's perplexity with float32 activations.

Step counts: `--steps` whole-model sandwich steps of the full profile's batch per mode (default 200,
equal student tokens; blockwise: 80% of them in the block phase at `--block-batch` sequences per block
step, 20% end to end). The block phase's step at 135M is launch-bound (a 576-wide block), so a block
step of 4x the sequences costs little more than one of 1x: the default block batch is 4x the profile's
(128 sequences, a quarter of the steps; the same tokens). Both processes time a few steps first
(probes) and exchange them through files: the plan states the predicted seconds. After the search
they exchange again: the fine-tune gets the same step count in both, from the time both have left
before the deadline (minus the export's), and is skipped with the export when that is under
MIN_FT_STEPS (said so in the JSON).

Both modes run side by side on one GPU (`launch` on a one-GPU machine) or one per GPU (two GPUs).

The base does not fit one call's carry (its GGUF is 98 MB; a call carries at most 64 MiB with the
working tree), so it travels in two halves, two calls back to back (the machine stays warm 30 s):

    # here, once: the two carry folders .bwq/a and .bwq/b (calibrate shard at the full profile's sizes)
    python benchmarks/blockwise_quality.py pack
    # device call 1 (carry .bwq/a): half the GGUF, wheels, llama-cpp-python -> /tmp/bwq; ~15 s
    python3 benchmarks/blockwise_quality.py stage --src .bwq/a
    # device call 2 at once (carry .bwq/b): rebuild the base bit for bit, both modes (one H200: ~8 min)
    python3 benchmarks/blockwise_quality.py launch --src .bwq/b --out $OUT --budget-s 420 --steps 200
    # here: reports/bench/blockwise_quality.json + .md from the returned files
    python benchmarks/blockwise_quality.py combine --from /work/.device/...

A CPU check at toy size (SmolLM2 sliced to 2 layers, a few steps) runs every step of it:
    python benchmarks/blockwise_quality.py pack && python benchmarks/blockwise_quality.py stage --src .bwq/a --dest /tmp/bwqt \
      && python benchmarks/blockwise_quality.py launch --src .bwq/b --dest /tmp/bwqt --out /tmp/bwqt/out --profile tiny --budget-s 1400
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("e2e", "blockwise")
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "tokenizer.gguf", "source.json")
WHEELS = ("annotated_types", "diskcache", "gguf", "pydantic-", "pydantic_core", "typing_extensions",
          "typing_inspection")
SPLIT_AT = 49_000_000  # GGUF bytes in call 1's half (each call ~51 MiB + the working tree)
HELDOUT = 128  # held-out validation sequences (after the search's own) for every reported KL
E2E_SHARE = 0.2  # blockwise: share of the student tokens spent in the end-to-end phase
MIN_FT_STEPS = 20  # fewer fine-tune steps than this (or the profile's): fine-tune and export skipped (no time left)
EXPORT_S = 110.0  # the export phase (GGUF, grid check, llama.cpp and torch perplexity) on the H200 machine
_LLAMA_PY = ("__init__.py", "_ctypes_extensions.py", "_ggml.py", "_internals.py", "_logger.py", "_utils.py",
             "llama.py", "llama_cache.py", "llama_chat_format.py", "llama_cpp.py", "llama_grammar.py",
             "llama_speculative.py", "llama_tokenizer.py", "llama_types.py", "llava_cpp.py", "mtmd_cpp.py",
             "py.typed")
_LLAMA_LIBS = {"llama": "0.5.0", "ggml": "0.25.3", "ggml-base": "0.25.3", "ggml-cpu": "0.25.3"}
# llama.cpp names -> ours, inside blk.N (the q/k rows are in ggml's RoPE order: undone below)
_GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def sha256_bytes(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


# ---- the base model, rebuilt from its GGUF bit for bit -------------------------------------------------
def rope_unpermute(w, n_heads: int):
    """q/k rows from ggml's adjacent RoPE pairs back to Hugging Face's rotate-half order: the inverse of
    tailor.export.gguf.rope_permute (what the converted base holds)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def state_from_gguf(path: Path, n_heads: int, n_kv: int) -> dict:
    """The converted base's weights from the source GGUF: gguf-py dequantizes each tensor (as the
    conversion's transformers loader does) and q/k rows go back from ggml's RoPE order."""
    import numpy as np
    import torch
    from gguf import GGUFReader, quants

    state = {}
    for t in GGUFReader(path).tensors:
        shape = [int(x) for x in reversed(t.shape)] if len(t.shape) > 1 else [-1]
        w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, i, kind, _ = t.name.split(".")
            key = f"model.layers.{i}.{_GGUF_NAMES[kind]}.weight"
            w = rope_unpermute(w, n_heads) if kind == "attn_q" else rope_unpermute(w, n_kv) if kind == "attn_k" else w
        state[key] = w.contiguous()
    return state


def state_sha(state: dict) -> str:
    return sha256_bytes(f"{k}:{tuple(v.shape)}:".encode() + v.contiguous().numpy().tobytes()
                        for k, v in sorted(state.items()))


# ---- here: the two carry folders -----------------------------------------------------------------------
def llama_cpp_tar(out: Path) -> None:
    """Write `out` (.tar.xz): this venv's x86-64 llama_cpp, its Python files and the four libraries it loads.

    Any CPython on x86-64 Linux can import it (ctypes, no extension module); benchmarks/pipeline_gpu/pack.py
    carries the same file."""
    import llama_cpp

    lc = Path(llama_cpp.__file__).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for f in _LLAMA_PY:
            tar.add(lc / f, f"llama_cpp/{f}")
        for name, ver in _LLAMA_LIBS.items():
            real = f"lib{name}.so.{ver}"
            tar.add(lc / "lib" / real, f"llama_cpp/lib/{real}")
            for alias in (f"lib{name}.so", f"lib{name}.so.0"):
                info = tarfile.TarInfo(f"llama_cpp/lib/{alias}")
                info.type, info.linkname = tarfile.SYMTYPE, real
                tar.addfile(info)


def pack(dest: Path, calib: Path, wheels: list[Path]) -> None:
    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from tailor.config import parse_params
    from tailor.models.base import base_dir, gguf_path

    from transformers import AutoTokenizer

    src, base = gguf_path(), base_dir()
    if not (calib / "train.safetensors").is_file():  # what the calibrate stage writes, at the full profile's sizes
        from tailor.data import build

        build(parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()), "full").calibrate,
              AutoTokenizer.from_pretrained(base), calib)
        shutil.copyfile(base / "source.json", calib / "model.json")
    cfg = json.loads((base / "config.json").read_text())
    ref = load_file(base / "model.safetensors")
    derived = state_from_gguf(src, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    bad = [k for k, v in derived.items() if k not in ref or not torch.equal(ref[k], v)]
    if bad:
        raise SystemExit(f"blockwise_quality: {bad[0]}: the GGUF does not rebuild the converted base bit for bit")
    extra = {k: v for k, v in ref.items() if k not in derived}  # the learned-clip factors (all 1.0)
    full_sha = state_sha(ref)
    for part in ("a", "b"):
        shutil.rmtree(dest / part, ignore_errors=True)
        (dest / part).mkdir(parents=True)
    blob = src.read_bytes()
    (dest / "a" / "gguf.part0").write_bytes(blob[:SPLIT_AT])
    (dest / "b" / "gguf.part1").write_bytes(blob[SPLIT_AT:])
    (dest / "a" / "whl").mkdir()
    for w in wheels:
        shutil.copyfile(w, dest / "a" / "whl" / w.name)
    llama_cpp_tar(dest / "a" / "llama_cpp.tar.xz")
    save_file(extra, str(dest / "b" / "extra.safetensors"))
    with tarfile.open(dest / "b" / "base.tar.xz", "w:xz") as tar:
        for f in BASE_FILES:
            tar.add(base / f, f"base/{f}")
    # the held-out sentences tokenized here, by the tokenizer that made the shards: the GPU machine's
    # transformers (another version) then only checks the file's special ids
    tok = AutoTokenizer.from_pretrained(base)
    texts = [json.loads(x)["text"] for x in (calib / "eval" / "wiki.jsonl").read_text().splitlines() if x.strip()]
    (dest / "b" / "wiki_ids.json").write_text(json.dumps([tok(t)["input_ids"] for t in texts]))
    with tarfile.open(dest / "b" / "data.tar.xz", "w:xz") as tar:
        for f in ("train.safetensors", "val.safetensors", "calib.safetensors", "model.json"):
            tar.add(calib / f, f"data/{f}")
        tar.add(calib / "eval" / "wiki.jsonl", "data/wiki.jsonl")
        tar.add(dest / "b" / "wiki_ids.json", "data/wiki_ids.json")
    (dest / "b" / "wiki_ids.json").unlink()
    manifest = {"gguf_sha256": hashlib.sha256(blob).hexdigest(), "gguf_bytes": len(blob), "split_at": SPLIT_AT,
                "state_sha256": full_sha, "base_dir": base.name,
                "data_sha256": {f: hashlib.sha256((calib / f).read_bytes()).hexdigest()
                                for f in ("train.safetensors", "val.safetensors")}}
    write_json(dest / "b" / "manifest.json", manifest)
    for part in ("a", "b"):
        size = sum(f.stat().st_size for f in (dest / part).rglob("*") if f.is_file())
        log(f"pack: {dest / part}: {size / 2**20:.1f} MiB")


# ---- device call 1 -------------------------------------------------------------------------------------
def stage(src: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "gguf.part0", work / "gguf.part0")
    site = work / "site"
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())  # the wheels are for the GPU machine's Python 3.12; a CPU check elsewhere skips the others
    whl = sorted(str(p) for p in (src / "whl").glob("*.whl") if parse_wheel_filename(p.name)[3] & here)
    log("stage: wheels", [Path(w).name for w in whl])
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *whl], check=True)
    with tarfile.open(src / "llama_cpp.tar.xz") as tar:
        tar.extractall(site, filter="tar") if sys.version_info >= (3, 12) else tar.extractall(site)
    out = subprocess.run([sys.executable, "-c", "import gguf, pydantic, llama_cpp, torch; "
                          "print('gguf', gguf.__file__, 'pydantic', pydantic.VERSION, 'llama_cpp', llama_cpp.__version__, "
                          "'torch', torch.__version__, 'gpus', torch.cuda.device_count())"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    log("stage:", out.stdout.strip(), out.stderr.strip()[-2000:])
    (work / "staged").write_text("ok\n")
    log(f"stage: {work} ready ({os.cpu_count()} cpus)")


# ---- device call 2: rebuild the base, then both modes -------------------------------------------------
def unpack(src: Path, work: Path) -> Path:
    """The GGUF joined and checked, the base directory rebuilt and checked bit for bit; returns it."""
    if not (work / "staged").is_file():
        raise SystemExit(f"blockwise_quality: {work}/staged missing: run `stage` (call 1) on this machine first")
    sys.path.insert(0, str(work / "site"))
    base, done = work / "base", work / "base" / ".rebuilt"  # holds the state sha256 once checked on this machine
    if not (src / "manifest.json").is_file():  # not carried this call: an earlier call's checked base serves
        if not done.is_file():
            raise SystemExit(f"blockwise_quality: {src}/manifest.json missing and no base rebuilt in {work}: carry {src}")
        log(f"unpack: {src} not carried; the base checked earlier in {base} (state sha256 {done.read_text()[:16]}) serves")
        return base
    manifest = json.loads((src / "manifest.json").read_text())
    gguf = work / "base.gguf"
    if not gguf.is_file():
        with open(work / ".base.gguf.tmp", "wb") as out:
            for part in (work / "gguf.part0", src / "gguf.part1"):
                out.write(part.read_bytes())
        os.replace(work / ".base.gguf.tmp", gguf)
    if sha256_bytes([gguf.read_bytes()]) != manifest["gguf_sha256"]:
        raise SystemExit("blockwise_quality: the joined GGUF's sha256 differs from the packed one")
    for name in ("base.tar.xz", "data.tar.xz"):
        with tarfile.open(src / name) as tar:
            tar.extractall(work, filter="data") if sys.version_info >= (3, 12) else tar.extractall(work)
    if not (base / "model.safetensors").is_file():
        from safetensors.torch import load_file, save_file

        cfg = json.loads((base / "config.json").read_text())
        state = state_from_gguf(gguf, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        state.update(load_file(src / "extra.safetensors"))
        if state_sha(state) != manifest["state_sha256"]:
            raise SystemExit("blockwise_quality: the rebuilt base differs from the converted one")
        save_file(state, str(base / ".model.tmp"), metadata={"format": "pt"})
        os.replace(base / ".model.tmp", base / "model.safetensors")
        done.write_text(manifest["state_sha256"])
    log(f"unpack: base rebuilt bit for bit (state sha256 {manifest['state_sha256'][:16]}) in {base}")
    return base


def launch(args) -> None:
    t0 = time.time()
    base = unpack(args.src, args.dest) if args.base is None else args.base
    data = args.dest / "data" if args.data is None else args.data
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sync = args.dest / "sync"
    shutil.rmtree(sync, ignore_errors=True)
    sync.mkdir(parents=True)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    deadline = t0 + args.budget_s
    procs = {}
    for k, mode in enumerate(MODES):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.dest / "site"), str(ROOT)]),
               "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--mode", mode, "--base", str(base),
               "--data", str(data), "--out", str(out), "--sync", str(sync), "--deadline", str(deadline),
               "--profile", args.profile, "--work", str(args.dest / f"work-{mode}"),
               "--threads", str(max(1, (os.cpu_count() or 2) // len(MODES))),
               "--steps", str(args.steps), "--block-batch", str(args.block_batch)]
        procs[mode] = subprocess.Popen(cmd, env=env, stdout=open(out / f"{mode}.log", "w"), stderr=subprocess.STDOUT)
        log(f"launch: {mode} pid {procs[mode].pid} on GPU {env.get('CUDA_VISIBLE_DEVICES', '-')}")
    hard = deadline + args.grace_s
    while any(p.poll() is None for p in procs.values()) and time.time() < hard:
        time.sleep(2)
    for mode, p in procs.items():
        if p.poll() is None:
            log(f"launch: {mode} still running at the hard deadline: killed (its JSON holds the phases done)")
            p.kill()
            p.wait()
    rows = {m: json.loads((out / f"{m}.json").read_text()) if (out / f"{m}.json").is_file() else None for m in MODES}
    summary = {"wall_s": round(time.time() - t0, 1), "budget_s": args.budget_s, "profile": args.profile,
               "steps": args.steps, "block_batch": args.block_batch,
               "returncodes": {m: p.returncode for m, p in procs.items()}, "gpus": gpus,
               "device": torch.cuda.get_device_name(0) if gpus else "cpu", "torch": torch.__version__,
               "python": sys.version.split()[0], "cpus": os.cpu_count()}
    write_json(out / "launch.json", summary)
    log("launch:", json.dumps(summary))
    print(table(rows), flush=True)


# ---- one mode ------------------------------------------------------------------------------------------
def profile_params(name: str):
    """The full profile (step counts then scaled to the time budget), or `tiny`: the same recipe on
    SmolLM2 sliced to 2 layers, a few steps, for a CPU check."""
    import yaml

    from tailor.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return parse_params(raw, add_tiny(raw) if name == "tiny" else "full")


def add_tiny(raw: dict) -> str:
    """Add the toy profile to a params.yaml dict (the full recipe, SmolLM2 sliced to 2 layers, a few steps of
    everything); its name."""
    full = copy.deepcopy(raw["profiles"]["full"])
    full.update(model={"n_layers": 2}, devices={"phone": {"budget_fraction": 0.5}}, export={"ppl_docs": 6})
    full["supernet"].update(steps=5, batch_size=2, val_seqs=4)
    full["search"].update(val_seqs=4, sens_seqs=2)
    raw["search"]["sens_tokens"] = 16  # not in params.yaml's section (a default), so not a profile key
    full["finetune"].update(steps=4, batch_size=2, warmup_steps=1)
    raw["profiles"]["bwq-tiny"] = full
    return "bwq-tiny"


def seq_kls(model, seqs, teacher: list, batch_size: int = 8) -> list[float]:
    """Per-sequence mean per-token KL(base || model) (tailor.distill.mean_kl's measure, one value per
    sequence, so that two models' values pair up in a bootstrap; their mean is mean_kl's)."""
    import torch

    from tailor.distill import kd_loss

    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for j, i in enumerate(range(0, len(seqs), batch_size)):
            ids = seqs[i: i + batch_size].to(dev).long()
            logits, t = model(ids).logits, teacher[j].to(dev)  # (B, T, V)
            out += [float(kd_loss(logits[b], t[b])) for b in range(len(ids))]
    return out


def doc_nlls(model, seqs, device) -> list[float]:
    """Summed next-token NLL of each held-out sentence (tailor.eval.ppl.seq_nll): ppl = exp(sum / tokens)."""
    from tailor.eval.ppl import seq_nll

    return [seq_nll(model, s, device)[0] for s in seqs]


class OutOfTime(Exception):
    """A training phase ran past its safety deadline (the plan misjudged the speed): stopped there."""


class Run:
    """One mode's whole measurement; `self.res` is written to <out>/<mode>.json after every phase."""

    def __init__(self, args):
        import torch

        self.args, self.mode = args, args.mode
        self.t0 = time.time()
        self.deadline = args.deadline
        torch.set_num_threads(args.threads)
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.params = profile_params(args.profile)
        self.block_batch = args.block_batch or 4 * self.params.supernet.batch_size
        if self.block_batch % self.params.supernet.batch_size:
            raise SystemExit(f"--block-batch {self.block_batch}: not a multiple of the supernet batch "
                             f"{self.params.supernet.batch_size} (equal tokens)")
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.res: dict = {"mode": self.mode, "profile": args.profile, "device": str(self.dev),
                          "gpu": torch.cuda.get_device_name(0) if self.dev.type == "cuda" else None,
                          "torch": torch.__version__, "phases": {}, "timeline": []}
        self.args.work.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        write_json(self.args.out / f"{self.mode}.json", self.res)

    def mark(self, what: str) -> None:
        self.res["timeline"].append([what, round(time.time() - self.t0, 1)])
        log(f"{self.mode}: {what} at {time.time() - self.t0:.0f} s")
        self.save()

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from safetensors.torch import load_file

        from tailor.distill import teacher_logits
        from tailor.elastic import importance
        from tailor.elastic.space import SearchSpace
        from tailor.elastic.supernet import arch_of
        from tailor.models.base import load_model_dir, load_tokenizer

        p = self.params
        torch.manual_seed(p.supernet.seed)
        model = load_model_dir(self.args.base, n_layers=p.model.n_layers)
        try:  # only the GGUF writer's special-id check needs it (the held-out sentences come tokenized)
            self.tok = load_tokenizer(self.args.base, model)
        except Exception as e:  # noqa: BLE001 (another transformers version: reported, the run goes on)
            self.tok, self.res["tokenizer_error"] = None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        seq = 64 if self.args.profile == "tiny" else None  # the toy run cuts the 512-token rows
        shard = {s: load_file(self.args.data / f"{s}.safetensors")["input_ids"][:, :seq] for s in ("train", "val", "calib")}
        if self.args.profile == "tiny":
            shard["train"] = shard["train"][:32]
        self.train = shard["train"]
        nv = p.search.val_seqs
        self.search_val = shard["val"][:nv]
        self.heldout = shard["val"][nv: nv + (4 if self.args.profile == "tiny" else HELDOUT)]
        model.to(self.dev)
        imp = importance.measure(model, list(shard["calib"].long().split(p.supernet.batch_size)))
        importance.permute_(model, imp)
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self.model = model
        self.formats = p.supernet_formats()
        sp = p.supernet
        self.spaces = {f: SearchSpace.build(arch_of(model), bits, [b for b in bits if b >= 8] or [max(bits)],
                                            sp.min_ffn_frac, sp.min_kv_groups, sp.max_drop_frac, imp.drop_order())
                       for f, bits in self.formats.items()}
        self.t_held = teacher_logits(self.teacher, self.heldout)
        self.t_search = teacher_logits(self.teacher, self.search_val)
        self.res.update(formats=self.formats, drop_order=imp.drop_order(),
                        importance_sha256=hashlib.sha256(json.dumps(
                            [imp.drop_order(), [t.argsort(descending=True).tolist() for t in imp.ffn],
                             [t.argsort(descending=True).tolist() for t in imp.kv]]).encode()).hexdigest()[:16],
                        data={"train": list(self.train.shape), "search_val": list(self.search_val.shape),
                              "heldout": list(self.heldout.shape)},
                        n_layers=len(model.model.layers))
        self.res["phases"]["before"] = {"val_kl": self.val_kls("before")}
        self.mark("setup")

    def val_kls(self, phase: str) -> dict[str, float]:
        """Held-out KL to the base of each format's min and middle subnet ("min", "mid" for the first
        format, "min_<fmt>", "mid_<fmt>" for the others) and of the max subnet; the per-sequence values
        go to res["per_seq"][phase] for the paired intervals."""
        from tailor.elastic.supernet import set_active, set_max

        first = next(iter(self.spaces))
        per = {}
        for fmt, space in self.spaces.items():
            sfx = "" if fmt == first else f"_{fmt}"
            for name, cfg in ((f"min{sfx}", space.min()), (f"mid{sfx}", space.middle())):
                set_active(self.model, cfg, fmt)
                per[name] = seq_kls(self.model, self.heldout, self.t_held)
        set_max(self.model)
        per["max"] = seq_kls(self.model, self.heldout, self.t_held)
        self.res.setdefault("per_seq", {})[phase] = {k: [round(x, 7) for x in v] for k, v in per.items()}
        return {k: sum(v) / len(v) for k, v in per.items()}

    # -- probes and the plan -----------------------------------------------------------------------------
    def train_spec(self, steps: int, lr: float | None = None):
        from tailor.train import TrainSpec

        sp = self.params.supernet
        return TrainSpec(steps, sp.batch_size, lr or sp.lr, sp.kd_temperature, sp.seed, ckpt_every=max(1, steps),
                         amp=sp.amp, compile=sp.compile, kd_chunk=sp.kd_chunk, checkpointing=sp.checkpointing)

    def sandwich(self, model):
        from tailor.elastic.space import sandwich_configs
        from tailor.elastic.supernet import set_active

        n = self.params.supernet.n_random

        def activate(step, gen):
            return [lambda c=c, f=f: set_active(model, c, f) for c, f in sandwich_configs(self.spaces, step, n, gen)]
        return activate

    def ft_spec(self, steps: int):
        from tailor.train import TrainSpec

        ft = self.params.finetune
        full_warm = ft.warmup_steps  # the full profile's warm-up share of its steps, kept at the scaled count
        warm = max(1, round(full_warm * steps / self.full_ft_steps)) if full_warm else 0
        return TrainSpec(steps, ft.batch_size, ft.lr, ft.kd_temperature, ft.seed, ckpt_every=max(1, steps),
                         schedule=ft.schedule, warmup_steps=min(warm, max(0, steps - 1)),
                         train_embeddings=ft.train_embeddings)

    @staticmethod
    def _step_s(curve: list[dict], tokens_per_step: int) -> float:
        later = curve[1:] or curve  # the first step pays the warm-up
        return sum(tokens_per_step / c["tokens_per_s"] for c in later) / len(later)

    def probe(self) -> dict:
        """Seconds per end-to-end sandwich step and per fine-tune step (on copies), and for blockwise per
        block step and per layer of teacher activations (real work: x_0 and x_1 are kept)."""
        import torch

        from tailor.arch import SubnetConfig
        from tailor.elastic.supernet import arch_of, export_active
        from tailor.train import train_kd

        sp, n = self.params.supernet, 3
        tok_step = sp.batch_size * self.train.shape[1]
        subnets = 2 + sp.n_random
        m = copy.deepcopy(self.model)
        r = train_kd(m, self.teacher, self.train, self.train_spec(n), self.sandwich(m))
        out = {"t_e2e": self._step_s(r.curve, tok_step * subnets)}
        del m
        self.full_ft_steps = self.params.finetune.steps
        ft = export_active(self.model, SubnetConfig.max(arch_of(self.model), bits=4, embed_bits=4), "gguf")
        r = train_kd(ft, self.teacher, self.train, self.ft_spec(n), lambda step, gen: [lambda: None])
        out["t_ft"] = self._step_s(r.curve, self.params.finetune.batch_size * self.train.shape[1])
        del ft
        if self.mode == "blockwise":
            from tailor.elastic.blockwise import BlockSpec, TeacherActs, block_sandwich, train_block
            from tailor.models.model import rope_tables

            self.model.to("cpu")
            self.teacher.to("cpu")
            self.acts_dir = self.acts_root() / "acts-0"
            shutil.rmtree(self.acts_dir, ignore_errors=True)
            acts = TeacherActs(self.teacher, self.train, self.acts_dir, self.dev, sp.batch_size)
            t = time.time()
            x0, x1 = acts.get(0), acts.get(1)
            out["t_acts_layer"] = time.time() - t  # the embedding and one block over the shard: an over-estimate
            out["acts_on_device"] = acts.home.type != "cpu"
            del acts
            cfg = self.model.config
            cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, torch.arange(self.train.shape[1]), torch.float32,
                                   getattr(cfg, "rope_freq_scaling", None))
            blk = copy.deepcopy(self.model.model.layers[0])
            spec = BlockSpec(n, self.block_batch, sp.block_lr, sp.seed, ckpt_every=n, amp=sp.amp)
            r = train_block(blk, x0, x1, cos, sin, spec, block_sandwich(self.spaces, 0, sp.n_random), None, 0, self.dev)
            out["t_block"] = self._step_s(r.curve, self.block_batch * self.train.shape[1] * subnets)
            del blk, x0, x1
        out["t_done"] = time.time()
        return out

    def acts_root(self) -> Path:
        if getattr(self, "_acts_root", None) is None:
            self._acts_root = self._pick_acts_root()
        return self._acts_root

    def _pick_acts_root(self) -> Path:
        """Where the teacher activations and block checkpoints go: /dev/shm (memory) on the GPU machine when
        it has room for three layers of activations and the checkpoints, else the work directory."""
        shm = Path("/dev/shm")
        need = 3 * self.train.numel() * self.model.config.hidden_size * 2 + 2**31
        ok = self.dev.type == "cuda" and shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need
        return shm / f"bwq-{self.mode}" if ok else self.args.work

    def plan(self, probes: dict[str, dict]) -> dict:
        """The same step counts in both processes: `--steps` whole-model steps of student tokens per mode,
        blockwise's block phase at `--block-batch` sequences a step; the seconds each phase should take
        (from both probes; side by side on one GPU they share it); the fine-tune's steps come later
        (`ft_plan`)."""
        p = self.params
        now = max(v["t_done"] for v in probes.values())  # the same clock in both processes
        L = self.res["n_layers"]
        steps, k = min(self.args.steps, p.supernet.steps), self.block_batch // p.supernet.batch_size
        block = int(round((1 - E2E_SHARE) * steps / k))
        e2e_phase = steps - block * k  # block phase + end-to-end phase = `steps` whole-model steps of tokens
        t_e2e = max(v["t_e2e"] for v in probes.values())
        bw = probes.get("blockwise")
        pred = {"e2e_s": round(steps * t_e2e, 1)}
        if bw:
            pred["blockwise_s"] = round(L * (bw["t_acts_layer"] + block * bw["t_block"]) + e2e_phase * t_e2e, 1)
        return {"supernet_steps": steps, "block_steps": block, "block_batch": self.block_batch,
                "e2e_phase_steps": e2e_phase, "supernet_fraction_of_profile": round(steps / p.supernet.steps, 4),
                "left_s": round(self.deadline - now, 1), "predicted_supernet_s": pred, "probes": probes,
                "e2e_share": E2E_SHARE, "limited_by": "steps"}

    def ft_plan(self, t_ft: float) -> dict:
        """Fine-tune steps, the same in both processes: from the time left before the deadline when both
        have searched, minus the export's; side by side on one GPU each fine-tune step takes ~2x the probe's."""
        mine = {"t_done": time.time(), "t_ft": t_ft}
        both = self.exchange(mine, "ft")
        now = max(v["t_done"] for v in both.values())
        share = 2.0 if len(both) > 1 and self.gpus < 2 else 1.0
        per = share * max(v["t_ft"] for v in both.values())
        left = self.deadline - now - EXPORT_S - 10
        full = self.params.finetune.steps
        ft = int(min(full, max(0.0, left / per)))
        ft = ft if ft >= min(MIN_FT_STEPS, full) else 0
        return {"finetune_steps": ft, "ft_left_s": round(self.deadline - now, 1), "t_ft_shared": round(per, 4),
                "finetune_fraction_of_profile": round(ft / full, 4), "skipped": ft == 0}

    def exchange(self, mine: dict, what: str = "probe") -> dict[str, dict]:
        """Write this process's `what`, wait (at most 300 s) for the other's: both derive one plan."""
        sync = self.args.sync
        if sync is None:
            return {self.mode: mine}
        write_json(sync / f"{what}-{self.mode}.json", mine)
        t = time.time()
        while time.time() - t < 300:
            found = {m: json.loads((sync / f"{what}-{m}.json").read_text()) for m in MODES
                     if (sync / f"{what}-{m}.json").is_file()}
            if len(found) == len(MODES):
                return found
            time.sleep(1)
        self.res[f"unsynced_{what}"] = f"the other mode's {what} never came: planned from this one alone"
        return {self.mode: mine}

    # -- training ----------------------------------------------------------------------------------------
    def guarded(self, activate, deadline: float, box: dict):
        def f(step, gen):
            if time.time() > deadline:
                raise OutOfTime(step)
            box["steps"] = step + 1
            return activate(step, gen)
        return f

    def e2e(self, steps: int, budget_s: float) -> dict:
        """`steps` end-to-end sandwich steps (stopped, and said so, past 1.5x the planned time and the deadline)."""
        from tailor.elastic.supernet import set_max
        from tailor.train import train_kd

        self.model.to(self.dev)
        self.teacher.to(self.dev)
        box = {"steps": 0}
        t = time.time()
        sp = self.params.supernet
        try:
            r = train_kd(self.model, self.teacher, self.train, self.train_spec(steps),
                         self.guarded(self.sandwich(self.model), max(t + 1.5 * budget_s + 20, self.deadline), box))
            done, curve = steps, r.curve
        except OutOfTime as e:
            done, curve = int(e.args[0]), []
            self.model.eval()
        set_max(self.model)
        tokens = done * sp.batch_size * self.train.shape[1] * (2 + sp.n_random)
        return {"steps": done, "planned_steps": steps, "student_tokens": tokens, "seconds": round(time.time() - t, 1),
                "loss_first_last": [round(curve[0]["loss"], 5), round(curve[-1]["loss"], 5)] if curve else None,
                "stopped_early": done < steps}

    def blocks(self, steps: int) -> dict:
        from tailor.elastic.blockwise import BlockSpec, train_blocks

        sp = self.params.supernet
        self.model.to("cpu")
        self.teacher.to("cpu")
        spec = BlockSpec(steps, self.block_batch, sp.block_lr, sp.seed, ckpt_every=steps, amp=sp.amp,
                         fingerprint=f"bwq:{steps}:{self.block_batch}")
        work = self.acts_root() / "blocks"
        shutil.rmtree(work, ignore_errors=True)
        t = time.time()
        res = train_blocks(self.model, self.teacher, self.train, spec, self.spaces, sp.n_random, work, self.dev,
                           act_batch=sp.batch_size, acts_dir=self.acts_dir)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(self.acts_dir, ignore_errors=True)
        L = len(self.model.model.layers)
        # a block step is 1/L of a whole-model step: L blocks of `steps` steps = `steps` model steps of tokens
        tokens = steps * self.block_batch * self.train.shape[1] * (2 + sp.n_random)
        self.model.to(self.dev)
        self.teacher.to(self.dev)
        return {"block_steps": steps, "block_batch": self.block_batch, "student_tokens": tokens,
                "block_tokens": tokens * L, "seconds": round(time.time() - t, 1),
                "block_train_s": round(sum(r.seconds for r in res), 1),
                "rel_mse_first_last": [[round(r.curve[0]["loss"], 5), round(r.curve[-1]["loss"], 5)] for r in res]}

    # -- search, fine-tune, export -----------------------------------------------------------------------
    def search(self) -> dict:
        from tailor.devices import budget_bytes, cost
        from tailor.elastic.space import SearchSpace
        from tailor.elastic.supernet import arch_of, set_max
        from tailor.search import mip, sensitivity
        from tailor.search.sampled import Candidate, score

        p = self.params
        prof = p.device("phone")
        meta = self.spaces[prof.format]
        bits = [b for b in self.formats[prof.format] if b in prof.allowed_bits]
        space = SearchSpace.build(meta.arch, bits, [prof.embed_bits], p.supernet.min_ffn_frac, p.supernet.min_kv_groups,
                                  p.supernet.max_drop_frac, list(meta.drop_order))
        arch = arch_of(self.model)
        budget = budget_bytes(prof, arch)
        t = time.time()
        sens_val = self.search_val[: p.search.sens_seqs, : p.search.sens_tokens]
        from tailor.distill import teacher_logits

        table = sensitivity.measure(self.model, space, prof.format, prof.embed_bits, sens_val,
                                    teacher_logits(self.teacher, sens_val))
        t_mip = time.time()
        sols = mip.solutions(table, space, prof.format, prof.embed_bits, budget)
        t_score = time.time()
        cands = []
        for cfg in sols:
            c = cost(cfg, arch, prof)
            cand = Candidate(cfg, c.nbytes, c.bits_per_param, c.latency_s, origin="mip")
            score(self.model, cand, prof.format, self.search_val, self.t_search, 8)
            cands.append(cand)
        fit = [c for c in cands if c.nbytes <= budget and math.isfinite(c.kl)]
        if not fit:
            raise SystemExit(f"{self.mode}: no MIP solution under the phone budget of {budget:,} B")
        best = min(fit, key=lambda c: c.kl)
        set_max(self.model)
        self.chosen = best
        cfg = best.config
        return {"budget_bytes": budget, "chosen_hash": cfg.hash, "bytes": best.nbytes,
                "bits_per_param": round(best.bits_per_param, 4), "search_kl": best.kl,
                "predicted_kl": table.predict(cfg), "kept_layers": len(cfg.kept),
                "kv_groups": [lc.kv_groups for lc in cfg.layers if lc.keep],
                "ffn": [lc.ffn for lc in cfg.layers if lc.keep],
                "bits_hist": _hist([b for lc in cfg.layers if lc.keep for b in lc.bits.values()]),
                "candidates": [{"hash": c.config.hash, "bytes": c.nbytes, "kl": c.kl} for c in cands],
                "sensitivity_s": round(t_mip - t, 1), "mip_s": round(t_score - t_mip, 1),
                "score_s": round(time.time() - t_score, 1), "config": cfg.to_dict()}

    def finetune(self, steps: int, budget_s: float) -> dict:
        from tailor.elastic.supernet import bake_clip_, export_active, round16_
        from tailor.train import train_kd

        fmt = self.params.device("phone").format
        student = export_active(self.model, self.chosen.config, fmt).to(self.dev)
        kl_before = seq_kls(student, self.heldout, self.t_held)
        box = {"steps": 0}
        t = time.time()
        try:
            r = train_kd(student, self.teacher, self.train, self.ft_spec(steps),
                         self.guarded(lambda step, gen: [lambda: None], t + 1.5 * budget_s + 20, box))
            done, curve = steps, r.curve
        except OutOfTime as e:
            done, curve = int(e.args[0]), []
            student.eval()
        bake_clip_(student)
        round16_(student)
        self.student = student
        spec = self.ft_spec(steps)
        kl_after = seq_kls(student, self.heldout, self.t_held)
        self.res.setdefault("per_seq", {})["phone"] = {"before_ft": [round(x, 7) for x in kl_before],
                                                       "after_ft": [round(x, 7) for x in kl_after]}
        return {"steps": done, "planned_steps": steps, "lr": spec.lr, "schedule": spec.schedule,
                "warmup_steps": spec.warmup_steps, "batch_size": spec.batch_size,
                "tokens": done * spec.batch_size * self.train.shape[1], "seconds": round(time.time() - t, 1),
                "heldout_kl_before": sum(kl_before) / len(kl_before), "heldout_kl": sum(kl_after) / len(kl_after),
                "loss_first_last": [round(curve[0]["loss"], 5), round(curve[-1]["loss"], 5)] if curve else None,
                "stopped_early": done < steps}

    def export(self) -> dict:
        """GGUF of the fine-tuned subnet; perplexity of the file in llama.cpp (CPU), of the fake-quantized
        PyTorch model, of the base; whether the file holds the model's grid bit for bit."""
        from dataclasses import replace

        from tailor.arch import BaseArch
        from tailor.export import gguf
        from tailor.export.gguf_vocab import tokenizer_gguf

        p = self.params
        student = self.student.to("cpu")
        cfg = self.chosen.config
        path = self.args.work / f"phone-{self.mode}.gguf"
        t = time.time()
        info = gguf.export(student, self.tok, path, template=tokenizer_gguf(self.args.base))
        arch = replace(BaseArch.from_hf(student.config), n_layers=len(cfg.layers))
        out = {"file_bytes": info["file_bytes"], "weight_bytes": info["weight_bytes"], "sha256": info["sha256"],
               "arch": info["arch"], "predicted_weight_bytes": cfg.nbytes(arch, "gguf"),
               "export_s": round(time.time() - t, 1)}
        ids_file = self.args.data / "wiki_ids.json"
        if ids_file.is_file():  # tokenized where the shards were (pack)
            docs = json.loads(ids_file.read_text())[: p.export.ppl_docs]
        else:
            texts = [json.loads(x)["text"] for x in (self.args.data / "wiki.jsonl").read_text().splitlines() if x.strip()]
            docs = [self.tok(x)["input_ids"] for x in texts[: p.export.ppl_docs]]
        seqs = [ids for ids in docs if len(ids) >= 2]
        out["ppl_docs"], out["ppl_tokens"] = len(seqs), sum(len(s) - 1 for s in seqs)
        t = time.time()
        out["file_holds_model_grid"] = file_holds_grid(path, student)
        out["grid_check_s"] = round(time.time() - t, 1)
        dev = self.dev
        nll, base_nll = doc_nlls(student.to(dev), seqs, dev), doc_nlls(self.teacher, seqs, dev)
        out["torch_ppl"], out["base_torch_ppl"] = (math.exp(sum(x) / out["ppl_tokens"]) for x in (nll, base_nll))
        self.res.setdefault("per_seq", {})["ppl"] = {"nll": [round(x, 5) for x in nll],
                                                     "base_nll": [round(x, 5) for x in base_nll],
                                                     "tokens": [len(x) - 1 for x in seqs]}
        try:
            from tailor.export import llamacpp

            t = time.time()
            out["llamacpp_ppl"] = llamacpp.perplexity(path, seqs, n_threads=self.args.threads)
            out["llamacpp_s"] = round(time.time() - t, 1)
            out["llamacpp_vs_torch"] = round(out["llamacpp_ppl"] / out["torch_ppl"] - 1, 5)
        except Exception as e:  # noqa: BLE001 (an import or load failure of the carried build: reported)
            out["llamacpp_ppl"] = None
            out["llamacpp_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return out

    def main(self) -> None:
        self.setup()
        probes = self.exchange(self.probe())
        plan = self.plan(probes)
        self.res["plan"] = plan
        self.mark("plan")
        pred = plan["predicted_supernet_s"]
        if self.mode == "e2e":
            self.res["phases"]["train"] = self.e2e(plan["supernet_steps"], pred["e2e_s"])
        else:
            self.res["phases"]["blocks"] = self.blocks(plan["block_steps"])
            self.res["phases"]["blocks"]["val_kl"] = self.val_kls("blocks")
            self.mark("blocks")
            self.res["phases"]["train"] = self.e2e(plan["e2e_phase_steps"], plan["e2e_phase_steps"] * probes[self.mode]["t_e2e"])
            self.res["phases"]["train"]["student_tokens"] += self.res["phases"]["blocks"]["student_tokens"]
        self.res["phases"]["train"]["val_kl"] = self.val_kls("train")
        self.mark("supernet")
        self.res["search"] = self.search()
        self.mark("search")
        ft = self.ft_plan(probes[self.mode]["t_ft"])
        self.res["plan"].update(ft)
        if ft["skipped"]:
            self.res["finetune"] = {"skipped": f"{ft['ft_left_s']} s left before the deadline: under {MIN_FT_STEPS} "
                                               "fine-tune steps after the export's share"}
            self.mark("finetune skipped")
        else:
            self.res["finetune"] = self.finetune(ft["finetune_steps"], ft["finetune_steps"] * ft["t_ft_shared"])
            self.mark("finetune")
            self.res["export"] = self.export()
            self.mark("export")
        self.res["done"] = True
        self.save()


def _hist(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def file_holds_grid(path: Path, model) -> bool:
    """Every matrix and norm of the GGUF dequantizes (gguf-py, = ggml) to the model's grid values bit for
    bit (the check of tests/integration/test_export_gguf.py), the tied table included."""
    import numpy as np
    import torch
    from gguf import GGUFReader, quants

    from tailor.export.gguf import rope_permute
    from tailor.quant import gguf_grid
    from tailor.quant.formats import is_float

    tensors = {t.name: t for t in GGUFReader(path).tensors}

    def stored(name: str) -> torch.Tensor:
        t = tensors[name]
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        return torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(rows, -1))

    cfg = model.config
    qpk = cfg.num_attention_heads // cfg.num_key_value_heads
    table = gguf_grid.dequantized(model.model.embed_tokens.weight, model.lm_head.bits)
    if not torch.equal(stored("token_embd.weight"), table):
        return False
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
             "down": "ffn_down"}
    from tailor.elastic.supernet import linear

    for i, block in enumerate(b for b in model.model.layers if b.active):
        if not torch.equal(stored(f"blk.{i}.attn_norm.weight")[0], block.input_layernorm.weight.detach()):
            return False
        for m, name in names.items():
            lin = linear(block, m)
            w = lin.weight.detach()[: lin.active_out, : lin.active_in]
            want = w.half().float() if is_float(lin.bits) else gguf_grid.dequantized(w, lin.bits)
            if m in ("q", "k"):
                want = rope_permute(want, block.self_attn.kv_heads * (qpk if m == "q" else 1), cfg.head_dim)
            if not torch.equal(stored(f"blk.{i}.{name}.weight"), want):
                return False
    return True


def run(args) -> None:
    r = Run(args)
    try:
        r.main()
    except BaseException as e:
        r.res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        r.save()
        raise


# ---- here: the report ----------------------------------------------------------------------------------
def _f(x, nd=4) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def table(rows: dict) -> str:
    """The markdown table of both modes (a missing or partial mode shows '-')."""
    head = ("| mode | phase | student tokens | KL min | KL mid | KL max | KL min onnx | KL mid onnx |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for mode in MODES:
        r = rows.get(mode) or {}
        ph = r.get("phases", {})
        for name, label in (("before", "permuted base"), ("blocks", "after block phase"), ("train", "supernet (final)")):
            if name not in ph:
                continue
            kl = ph[name].get("val_kl", {})
            lines.append(f"| {mode} | {label} | {_f(ph[name].get('student_tokens', 0))} | {_f(kl.get('min'))} | "
                         f"{_f(kl.get('mid'))} | {_f(kl.get('max'))} | {_f(kl.get('min_onnx'))} | {_f(kl.get('mid_onnx'))} |")
    lines += ["", "| mode | phone subnet | bits/param | search KL | fine-tune steps | held-out KL before FT | "
                  "held-out KL after FT | GGUF ppl (llama.cpp) | ppl (fake-quant torch) | base ppl | file = grid |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = rows.get(mode) or {}
        s, ft, ex = r.get("search", {}), r.get("finetune", {}), r.get("export", {})
        lines.append(f"| {mode} | {s.get('chosen_hash', '-')} ({_f(s.get('kept_layers'))} layers, {_f(s.get('bytes'))} B) | "
                     f"{_f(s.get('bits_per_param'))} | {_f(s.get('search_kl'))} | {_f(ft.get('steps'))} | "
                     f"{_f(ft.get('heldout_kl_before'))} | {_f(ft.get('heldout_kl'))} | {_f(ex.get('llamacpp_ppl'), 3)} | "
                     f"{_f(ex.get('torch_ppl'), 3)} | {_f(ex.get('base_torch_ppl'), 3)} | {_f(ex.get('file_holds_model_grid'))} |")
    return "\n".join(lines)


def combine(src: Path, to: Path) -> None:
    rows = {m: json.loads((src / f"{m}.json").read_text()) if (src / f"{m}.json").is_file() else None for m in MODES}
    launch_info = json.loads((src / "launch.json").read_text()) if (src / "launch.json").is_file() else {}
    e, b = rows.get("e2e") or {}, rows.get("blockwise") or {}

    def get(r, *keys):
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        return r

    diff = {}
    for k in ("min", "mid", "max", "min_onnx", "mid_onnx"):
        x, y = get(e, "phases", "train", "val_kl", k), get(b, "phases", "train", "val_kl", k)
        z = get(b, "phases", "blocks", "val_kl", k)
        diff[k] = {"e2e": x, "blockwise_after_blocks": z, "blockwise": y,
                   "blockwise_minus_e2e": None if x is None or y is None else y - x,
                   "blockwise_over_e2e": None if not x or y is None else y / x,
                   "ci_blockwise_minus_e2e": paired(get(e, "per_seq", "train", k), get(b, "per_seq", "train", k), f"kl:{k}"),
                   "ci_after_blocks_minus_e2e": paired(get(e, "per_seq", "train", k), get(b, "per_seq", "blocks", k),
                                                       f"kl-blocks:{k}")}
    fx, fy = get(e, "finetune", "heldout_kl"), get(b, "finetune", "heldout_kl")
    px, py = get(e, "export", "llamacpp_ppl"), get(b, "export", "llamacpp_ppl")
    summary = {"val_kl": diff,
               "phone_heldout_kl": {"e2e": fx, "blockwise": fy, "blockwise_over_e2e": fy / fx if fx and fy else None,
                                    "ci_blockwise_minus_e2e": paired(get(e, "per_seq", "phone", "after_ft"),
                                                                     get(b, "per_seq", "phone", "after_ft"), "phone"),
                                    "ci_before_ft_blockwise_minus_e2e": paired(
                                        get(e, "per_seq", "phone", "before_ft"), get(b, "per_seq", "phone", "before_ft"),
                                        "phone-before")},
               "phone_ppl_torch_ci_blockwise_minus_e2e": paired(get(e, "per_seq", "ppl", "nll"), get(b, "per_seq", "ppl", "nll"),
                                                                "ppl", get(e, "per_seq", "ppl", "tokens")),
               "phone_gguf_ppl_llamacpp": {"e2e": px, "blockwise": py, "blockwise_over_e2e": py / px if px and py else None},
               "phone_ppl_torch": {"e2e": get(e, "export", "torch_ppl"), "blockwise": get(b, "export", "torch_ppl")},
               "plan": get(e, "plan") or get(b, "plan"),
               # both processes permuted the same base the same way (GPU reductions could reorder a tie)
               "same_start": {"importance": get(e, "importance_sha256") == get(b, "importance_sha256"),
                              "val_kl_before": get(e, "phases", "before", "val_kl") == get(b, "phases", "before", "val_kl")}}
    # which phase closes the gap: the share of the block phase's gap the end-to-end phase removed, and of the
    # searched phone subnet's gap (before fine-tuning) the fine-tune removed
    rec = {k: _share_closed(v["blockwise_after_blocks"], v["blockwise"], v["e2e"]) for k, v in diff.items()}
    ph = summary["phone_heldout_kl"]
    gb = get(ph, "ci_before_ft_blockwise_minus_e2e", "delta")
    ga = get(ph, "ci_blockwise_minus_e2e", "delta")
    summary["gap_closed"] = {"by_e2e_phase": rec,
                             "by_finetune_phone": None if gb is None or ga is None or gb <= 0 else 1 - ga / gb}
    out = {"what": "issue 18 item 4: blockwise vs end-to-end supernet training on SmolLM2-135M at equal student tokens "
                   "(benchmarks/blockwise_quality.py); KL = mean per-token KL(base || subnet) on held-out validation "
                   "sequences; ppl on the held-out wiki sentences", "launch": launch_info, "summary": summary,
           "modes": rows}
    to.mkdir(parents=True, exist_ok=True)
    write_json(to / "blockwise_quality.json", out)
    plan = summary["plan"] or {}
    md = [f"# Blockwise vs end-to-end supernet training (SmolLM2-135M, {launch_info.get('device', '?')})", "",
          f"Equal student tokens per mode: {plan.get('supernet_steps', '?')} whole-model sandwich steps of the full profile's "
          f"{profile_steps(plan, 'supernet')} ({_f(plan.get('supernet_fraction_of_profile'))} of it; blockwise: "
          f"{plan.get('block_steps', '?')} steps of {plan.get('block_batch', '?')} sequences per block + "
          f"{plan.get('e2e_phase_steps', '?')} end-to-end), fine-tune "
          f"{plan.get('finetune_steps', '?')} steps ({_f(plan.get('finetune_fraction_of_profile'))} of the profile's). "
          "KL: held-out validation sequences, to the base model.", "", table(rows), "", ci_table(summary), ""]
    (to / "blockwise_quality.md").write_text("\n".join(md))
    log(f"combine: {to / 'blockwise_quality.json'}, {to / 'blockwise_quality.md'}")


def _share_closed(after_blocks, final, e2e) -> float | None:
    """1 - (final gap) / (gap after the block phase), gaps to e2e; None when there was no gap to close."""
    if None in (after_blocks, final, e2e) or after_blocks - e2e <= 0:
        return None
    return 1 - (final - e2e) / (after_blocks - e2e)


def paired(a, b, name: str, tokens=None) -> dict | None:
    """95% paired bootstrap interval of mean(b) - mean(a) over the same held-out items (tailor.eval.bootstrap),
    or of exp(sum NLL / tokens) (perplexity) when `tokens` is given; None when either side is missing."""
    import numpy as np

    from tailor.eval.bootstrap import paired_bootstrap, rng_for

    if not a or not b or len(a) != len(b):
        return None
    r = paired_bootstrap(np.array(a), np.array(b), None if tokens is None else np.array(tokens), n_boot=2000,
                         rng=rng_for(0, name), transform=np.exp if tokens is not None else (lambda x: x))
    return {"e2e": r.base, "blockwise": r.compressed, "delta": r.delta, "ci95": [r.ci_low, r.ci_high], "n": r.n}


def ci_table(summary: dict) -> str:
    lines = ["| held-out KL | e2e | blockwise | blockwise - e2e (95% CI) | blockwise after block phase - e2e (95% CI) |",
             "|---|---|---|---|---|"]

    def cell(c):
        return "-" if not c else f"{c['delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"

    for k, v in summary["val_kl"].items():
        lines.append(f"| {k} subnet | {_f(v['e2e'])} | {_f(v['blockwise'])} | {cell(v['ci_blockwise_minus_e2e'])} | "
                     f"{cell(v['ci_after_blocks_minus_e2e'])} |")
    ph = summary["phone_heldout_kl"]
    lines.append(f"| phone subnet, searched, before fine-tune | - | - | {cell(ph['ci_before_ft_blockwise_minus_e2e'])} | - |")
    lines.append(f"| phone subnet, fine-tuned | {_f(ph['e2e'])} | {_f(ph['blockwise'])} | {cell(ph['ci_blockwise_minus_e2e'])} | - |")
    c = summary["phone_ppl_torch_ci_blockwise_minus_e2e"]
    if c:
        lines.append(f"| phone perplexity (torch = file's grid) | {c['e2e']:.3f} | {c['blockwise']:.3f} | "
                     f"{c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | - |")
    return "\n".join(lines)


def profile_steps(plan: dict, what: str):
    try:
        return round(plan[f"{what}_steps"] / plan[f"{what}_fraction_of_profile"])
    except (KeyError, TypeError, ZeroDivisionError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: the carry folders .bwq/a and .bwq/b")
    a.add_argument("--dest", type=Path, default=ROOT / ".bwq")
    a.add_argument("--calib", type=Path, default=ROOT / ".bwq" / "calibrate_full")
    a.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    a = sub.add_parser("stage", help="device call 1: copy .bwq/a to --dest, install the wheels")
    a.add_argument("--src", type=Path, default=Path(".bwq/a"))
    a.add_argument("--dest", type=Path, default=Path(tempfile.gettempdir()) / "bwq")
    a = sub.add_parser("launch", help="device call 2: rebuild the base, run both modes side by side")
    a.add_argument("--src", type=Path, default=Path(".bwq/b"))
    a.add_argument("--dest", type=Path, default=Path(tempfile.gettempdir()) / "bwq")
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "bwq" / "out"))
    a.add_argument("--profile", choices=("full", "tiny"), default="full")
    a.add_argument("--budget-s", type=float, default=420.0, help="seconds from launch to the modes' planned end")
    a.add_argument("--steps", type=int, default=200, help="whole-model sandwich steps of student tokens per mode")
    a.add_argument("--block-batch", type=int, default=0,
                   help="sequences per block step (a multiple of the supernet batch); 0 = 4x it")
    a.add_argument("--grace-s", type=float, default=45.0, help="then killed this much later")
    a.add_argument("--base", type=Path, default=None, help="a base model directory instead of the rebuilt one")
    a.add_argument("--data", type=Path, default=None, help="a calibrate output instead of the carried one")
    a = sub.add_parser("run", help="one mode (launch starts these)")
    a.add_argument("--mode", choices=MODES, required=True)
    a.add_argument("--base", type=Path, required=True)
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--sync", type=Path, default=None)
    a.add_argument("--deadline", type=float, required=True)
    a.add_argument("--profile", choices=("full", "tiny"), default="full")
    a.add_argument("--threads", type=int, default=8)
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--block-batch", type=int, default=0)
    a = sub.add_parser("combine", help="here: reports/bench/blockwise_quality.{json,md} from the returned files")
    a.add_argument("--from", dest="src", type=Path, required=True)
    a.add_argument("--to", type=Path, default=ROOT / "reports" / "bench")
    args = ap.parse_args()
    if args.cmd == "pack":
        wheels = sorted(w for w in args.wheels.glob("*.whl") if w.name.startswith(WHEELS))
        pack(args.dest, args.calib, wheels)
    elif args.cmd == "stage":
        stage(args.src, args.dest)
    elif args.cmd == "launch":
        launch(args)
    elif args.cmd == "run":
        run(args)
    else:
        combine(args.src, args.to)


if __name__ == "__main__":
    main()
