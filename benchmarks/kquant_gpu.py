"""Tailor on llama.cpp's K-quant grid, trained on one GPU: the trained rows of reports/bench/kquant_table.md
(issue 22) and the IQ4_NL lever of issue 19, at the full profile's fine-tune budget.

On the GPU machine, in one process (`search`):
1. the base (rebuilt bit for bit from its GGUF, as benchmarks/blockwise_quality.py does) permuted by
   importance on the calibration shard (the supernet stage's order) becomes the supernet and is trained by
   the end-to-end sandwich on the phone's K-quant grid (Q2_K..Q6_K, IQ4_NL, Q8_0, F16; a K-quant only where
   a matrix's input dimension is whole 256s) for `--supernet-s` seconds (at most the profile's steps);
2. per row a search on it: sensitivity table + MIP (the pipeline's first strategy), every MIP solution
   scored on the search's validation sequences, the least KL under the row's byte budget chosen (bytes of
   the whole file at the row's bits per base parameter, as benchmarks/seed_table.py budgets them);
3. each row fine-tuned in its own detached process as soon as its config exists (they share the GPU and
   outlive the 10-minute command): the full profile's fine-tune (QAT + KD, 1000 x 32 x 512 tokens, cosine
   3e-4) from the permuted *base* weights, as benchmarks/seed_table_gpu.py trains the Q4_0/Q5_1/Q8_0 rows
   it is compared with, so that only the grid and the subnet differ; exported as GGUF, checked to hold the
   model's grid bit for bit (gguf-py), its perplexity in llama.cpp beside the PyTorch model's, packed
   into zstd chunks.

Rows (ROWS): Tailor joint at <= 4.0 and <= 3.0 bits/param; Tailor bits-only (structure fixed) at the first
of BITS_ONLY_BPP that is feasible (on SmolLM2 only ffn_down is 256-wide, so bits-only cannot reach 4.0);
uniform IQ4_NL QAT (every layer matrix IQ4_NL, the table Q4_0 as the seed table's qat4 row: same bytes
as Q4_0) against seed_table_gpu's uniform Q4_0 QAT.

    # device call 1 (carry .bwq/a, from `blockwise_quality.py pack`): half the base GGUF, wheels, llama.cpp
    python3 benchmarks/blockwise_quality.py stage --src .bwq/a
    # device call 2 at once (carry .bwq/b): rebuild the base, supernet, searches, fine-tunes started
    python3 benchmarks/kquant_gpu.py search --src .bwq/b --out $OUT
    # device calls 3..: wait for the fine-tunes, bring back metas and <= 8 chunks per call
    python3 benchmarks/kquant_gpu.py wait --timeout 560
    python3 benchmarks/kquant_gpu.py collect --out $OUT --parts tailor-k@4.0:0-4 ...
    # here: join + sha256-check the chunks into --work rows/<id>/model.gguf (kquant_table.py scores them)
    python benchmarks/kquant_gpu.py ingest --from DIR [DIR ...] --work /tmp/kquanttable

Another model (any GGUF source; Qwen2.5-Coder-0.5B's is 491 MB, nine calls): here `pack-gguf --model
qwen2.5-coder-0.5b` cuts its GGUF into .kqg/p0 .. p8 (<= 56 MB each; the last also carries the full profile's
calibrate shard, tokenized here, and this checkout's converted tokenizer, gzipped: `convert_base`), and
`pack-evalset --model qwen2.5-coder-0.5b --work <its kquant_table workspace>` adds kquant_table's items to it: a
0.5B row's file (~315 MB at 4.0 bits/param) is too large to carry back, so each fine-tune scores its own file in
llama.cpp there and kquant_table times a layout twin here. Device call 0 stages the wheels and llama.cpp as above
(.bwq/a); calls 1..9 carry one folder each, back to back (the machine stays warm 30 s; 5-6 s a call):
`stage-gguf --src .kqg/pK` (the last joins the file, sha256-checked); then
    python3 benchmarks/kquant_gpu.py search --gguf /tmp/bwq/model.gguf --data /tmp/bwq/kqdata \
        --overhead 5947712 --ft-steps 200 --kd-chunk 4096 --ft-eager --start-after-search \
        --rows tailor-k@4.0 tailor-k@3.0 --out $OUT
(--overhead: the non-weight bytes of its F16 file, kquant_table's base row; fewer fine-tune steps: one step costs
~4x SmolLM2's; eager: torch.compile never finished on Qwen's shapes; 65 GB per eager fine-tune, so two at once at
most, `--max-jobs 2` queues a third). Then `wait`, `collect` (metas only), here `ingest` (meta-only rows) and
`kquant_table.py --model qwen2.5-coder-0.5b --work <workspace> --retime`. The CPU check of that path: `pack-gguf
--model smollm2-135m --calib .bwq/calibrate_full`, `stage-gguf` of each part into /tmp/kqg, then `search --gguf
/tmp/kqg/model.gguf --data /tmp/kqg/kqdata --dest /tmp/kqg --profile tiny` (after copying a staged site/ there).

Issue 19's levers as row variants (`--rows tailor-k@4.0 tailor-k@4.0+emb+2x ...`, VARIANTS): a `+` suffix
fine-tunes the subnet its base row found by another recipe: `+emb` QAT of the tied embedding, `+2x` twice the
steps, `+sn` from the trained supernet's weights (saved as kq/supernet.safetensors) instead of the base's, `+gen`
with `--gen-seqs` sequences sampled from the base joining the corpus shard (drawn once a run, before any fine-tune
starts, kq/generated.safetensors), `+data` on every corpus document left after val and calib (`pack-data` here
builds it, calibrate.train_seqs: null, 7,365 sequences against the profile's 3,600, and packs it as .bwq/c/
train_all.tar.xz, 3.9 MiB: carry it with .bwq/b and untar it into the search's data folder first). `+s<N>`
(N 1-9) fine-tunes the same recipe on finetune.seed N: the spread across fine-tunes, which PIQA's 1,500 items
need before a lever's 0.005 is read as its effect.
Each searched row records `kl_before_from` {base, supernet}: where a fine-tune would start. `--configs <search.json>`
fine-tunes an earlier search's subnets (no search); with a `+sn` row it trains the supernet first (--supernet-s)
and records each subnet's `kl_before_from`, so `+sn` differs from its base-started row in the start alone.
`--search-min-kv-groups N` holds every searched layer at N or more KV groups (the supernet still trains them all).
`--finetune ROW ...` trains only those of the rows (none: a search-only run); `--id-suffix +bw` names a search
variant's rows apart from earlier ones (session 16: `--supernet-steps 0`, ranked on the base's weights).

What session 14 learnt on the H200 (reports/bench/kquant_gpu_s14.json): with the grouped quantizer the K-grid
supernet runs 331 steps in 300 s (0.91 s a step; session 11: 60 in 240 s). One fine-tune alone, eager, takes
0.47 s a step (35 k tokens/s: 1000 steps in ~8 min); four compiled fine-tunes started at once had not reached
step 250 after 8.5 min. Plan a row's fine-tune at ~8 min alone, eager (`--ft-eager`); two at once is untested
(the GPU was idle half of a launch-bound step, so two may share it well); read `wait`'s last log line (train_kd
prints a progress line every 60 s without a terminal).

Session 15 (reports/bench/kquant_gpu_s15.json): three eager fine-tunes at once ran 73.7 k tokens/s together, 2.1x
one alone, ~12 min for all three with their exports (43 GB each: a fourth needs --kd-chunk); `--configs` with session
14's search.json reproduced its importance order and starting KL. Collected parts are named by seed_table_gpu.slug
(`+` -> `_with_`): the device drops a returned file whose name has a `+`.

Session 16 (reports/bench/kquant_gpu_s16.json): two search runs side by side in one call, each in its own --dest
(stage .bwq/a into both first): a `--supernet-steps 0` run (searched in ~80 s) started its fine-tune while the other
trained its supernet. The teacher sampler (+gen) ran 12.9 k tokens/s on the H200: 4,096 sequences in 163 s.

A CPU check at toy size (SmolLM2 sliced to 2 layers, a few steps) runs every step:
    python benchmarks/blockwise_quality.py stage --src .bwq/a --dest /tmp/kqt && \\
    python benchmarks/kquant_gpu.py search --src .bwq/b --dest /tmp/kqt --out /tmp/kqt/out --profile tiny
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import blockwise_quality as bq  # noqa: E402 (after the sys.path lines)
import seed_table as st  # noqa: E402
import seed_table_gpu as sg  # noqa: E402

GRID = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "F16"]  # params.yaml's quick-k phone
N_PARAMS = 134_515_008  # SmolLM2-135M's base parameters (the seed table's denominator)
OVERHEAD = 1_785_376  # non-weight bytes of its GGUF (tokenizer, metadata): seed_table.json's base row
SIZE_MARGIN = st.SIZE_MARGIN
BITS_ONLY_BPP = (4.0, 4.25, 4.5)
EMBED_BITS = 4  # the tied table at Q4_0, as every seed-table Tailor row at these budgets
RECIPE = "kgrid"  # the `recipe` field seed_table_gpu's wait / collect / gather key the rows by
DEST = Path(tempfile.gettempdir()) / "bwq"
GENERATED = "generated.safetensors"  # a run's teacher samples (+gen rows), in its kq/ folder
GEN_DTYPES = {"fp32": None, "bf16": "bfloat16"}  # teacher_samples' dtype (a torch attribute name, resolved there)
TRAIN_ALL = "train_all.safetensors"  # +data rows' train split, beside the shard (pack-data here, its tar there)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def weight_budget(bpp: float, n_params: int = N_PARAMS, overhead: int = OVERHEAD) -> int:
    """Bytes for weights in a file of at most `bpp` bits per base parameter (seed_table's arithmetic)."""
    return st.weight_budget(st.target_file_bytes(bpp, n_params), overhead)


def k_params(profile: str, ft_steps: int | None = None, kd_chunk: int = 0, ft_lr: float | None = None,
             train_embeddings: bool = False, ft_seed: int | None = None):
    """The full profile (or blockwise_quality's toy one) with the phone on the K-quant grid and the supernet
    trained on that grid only (the laptop's ONNX grid is not searched here)."""
    import yaml

    from tailor.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = bq.add_tiny(raw) if profile == "tiny" else "full"
    raw["profiles"][name].setdefault("devices", {})["phone"] = {"allowed_bits": None, "allowed_types": GRID,
                                                                "embed_bits": EMBED_BITS}
    raw["profiles"][name]["supernet"]["formats"] = {"gguf": GRID}
    raw["profiles"][name]["search"]["strategies"] = ["mip", "nsga"]  # gumbel cannot mix 256- and 32-blocks
    if ft_steps:  # a larger model: fewer fine-tune steps than the full profile's 1000 (said so in each row's meta)
        raw["profiles"][name]["finetune"]["steps"] = ft_steps
    if ft_lr:  # Qwen2.5-0.5B: 3e-4 (SmolLM2's) threw the KL from 0.40 to 3.2 in the first 5 steps (session 12)
        raw["profiles"][name]["finetune"]["lr"] = ft_lr
    if train_embeddings:  # issue 19's lever: QAT of the tied table too (a row variant "+emb")
        raw["finetune"]["train_embeddings"] = True  # a field the profiles leave at its default: the base section
    if ft_seed is not None:  # a "+s<N>" row: the same fine-tune on another seed
        raw["finetune"]["seed"] = ft_seed
    if kd_chunk:  # a 152k vocabulary: the KD loss in chunks of tokens, never [batch x seq, vocab] fp32 at once
        raw["supernet"]["kd_chunk"] = kd_chunk  # a field params.yaml leaves at its default: set in the base section
    return parse_params(raw, name)


def search_rows(path: Path) -> dict[str, dict]:
    """The searched rows (id -> result, its "config" included) of a search.json, or of a device record that
    holds one under "search" (reports/bench/kquant_gpu_s14.json). SystemExit naming the file if neither."""
    src = json.loads(path.read_text())
    rows = src["rows"] if "rows" in src else (src.get("search") or {}).get("rows")
    if not isinstance(rows, dict):
        raise SystemExit(f"kquant_gpu: {path}: neither a search.json nor a record holding one")
    return rows


VARIANTS = {"emb": "QAT trains the tied embedding too (finetune.train_embeddings)",
            "2x": "twice the fine-tune steps (and tokens), the same schedule stretched",
            "sn": "the fine-tune starts from the trained supernet's weights (as steps/finetune.py), not the base's",
            "data": "the train split takes every corpus document left after val and calib (calibrate.train_seqs: null; "
                    "TRAIN_ALL, carried by pack-data) in place of the profile's 3,600 sequences",
            "gen": "--gen-seqs sequences sampled from the base (LLM-QAT's data-free KD, finetune.generated_seqs) join "
                   "the corpus shard: fewer repeats of its 3,600 sequences (1000 x 32 draws ~ 8.9 epochs)",
            "s<N>": "the fine-tune's seed is N (1-9; finetune.seed, 0 otherwise): the same recipe again, so that a "
                    "row's spread across fine-tunes can be told from a lever's effect"}
SEED_VARIANT = re.compile(r"s([1-9])")


def variants_of(rid: str) -> list[str]:
    """The recipe variants of row id `rid` ("tailor-k@4.0+emb+2x" -> ["emb", "2x"])."""
    return rid.split("+")[1:]


def seed_of(rid: str) -> int | None:
    """The fine-tune seed a `+s<N>` variant of row id `rid` asks for, None without one."""
    seeds = [int(m.group(1)) for v in variants_of(rid) if (m := SEED_VARIANT.fullmatch(v))]
    return seeds[-1] if seeds else None


def rows_plan(tiny: bool, ids: list[str] | None = None) -> list[dict]:
    """Searched rows first (their fine-tunes start as each search ends), the uniform row started at once.
    `ids` picks rows by name instead of the default four: iq4nl-qat, tailor-k@<bpp> (joint), bits-k (the
    first feasible of BITS_ONLY_BPP) or bits-k@<bpp> (bits only, that budget alone); a row with
    `+<variant>` suffixes (VARIANTS) fine-tunes the subnet its base row found by another recipe (the base
    row must be listed before it)."""
    if ids:
        plan = []
        for full_id in ids:
            rid, variants = full_id.split("+")[0], variants_of(full_id)
            bad = [v for v in variants if v not in VARIANTS and not SEED_VARIANT.fullmatch(v)]
            if len([v for v in variants if SEED_VARIANT.fullmatch(v)]) > 1:
                raise SystemExit(f"kquant_gpu: --rows {full_id}: more than one seed variant")
            if bad:
                raise SystemExit(f"kquant_gpu: --rows {full_id}: unknown variant {'+'.join(bad)!r} "
                                 f"(known: {', '.join('+' + v for v in VARIANTS)})")
            if variants:  # the base row's search result, another fine-tune recipe (issue 19's levers)
                plan.append({"id": full_id, "kind": "variant", "of": rid, "variants": variants})
                continue
            kind, _, bpp = rid.partition("@")
            if rid == "iq4nl-qat":
                plan.append({"id": rid, "kind": "uniform"})
            elif kind in ("tailor-k", "bits-k") and bpp:
                try:
                    plan.append({"id": rid, "kind": "joint" if kind == "tailor-k" else "bits", "bpp": float(bpp)})
                except ValueError:
                    raise SystemExit(f"kquant_gpu: --rows {rid}: {bpp!r} is not a number of bits per parameter") from None
            elif rid == "bits-k":
                plan.append({"id": rid, "kind": "bits"})
            else:
                raise SystemExit(f"kquant_gpu: --rows {rid}: not one of iq4nl-qat, tailor-k@<bpp>, bits-k, bits-k@<bpp>")
        return plan
    if tiny:  # 2 layers: the embedding is most of the model, budgets as fractions of the max subnet
        return [{"id": "iq4nl-qat", "kind": "uniform"}, {"id": "tailor-k@0.6", "kind": "joint", "frac": 0.6},
                {"id": "bits-k@0.7", "kind": "bits", "frac": 0.7}]
    return [{"id": "iq4nl-qat", "kind": "uniform"}, {"id": "tailor-k@4.0", "kind": "joint", "bpp": 4.0},
            {"id": "tailor-k@3.0", "kind": "joint", "bpp": 3.0}, {"id": "bits-k", "kind": "bits"}]


# ---- device call 2: supernet, searches, fine-tunes started -------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def convert_base(gguf_path: Path, tok_dir: Path) -> Path:
    """The plain base model of a staged GGUF (tailor.models.base.base_dir). Where this machine's
    transformers reads the GGUF's tokenizer differently from the checkout's (5.17 on the GPU machine reads
    Qwen2.5-Coder's end token as 151643, 5.24 here as 151645, its config's), the conversion refuses; then
    the tokenizer converted here, carried in `tok_dir` (pack-gguf), replaces it and must pass the same check."""
    import shutil

    from tailor.models import base as mb
    from tailor.models.families._common import ModelFileError

    try:
        return mb.base_dir(str(gguf_path))
    except ModelFileError as e:
        if "tokenizer does not match" not in str(e) or not tok_dir.is_dir():
            raise
        log(f"convert: {e}; the tokenizer converted where the GGUF was packed is used")
    check, mb.check_tokenizer = mb.check_tokenizer, lambda *a, **k: None
    try:
        path = mb.base_dir(str(gguf_path))
    finally:
        mb.check_tokenizer = check
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copyfile(tok_dir / f, path / f)
    mb.load_tokenizer(path, mb.load_model_dir(path))  # raises if the carried one does not fit either
    return path


class Search:
    def __init__(self, args):
        import torch

        self.args, self.t0 = args, time.time()
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.params = k_params(args.profile, args.ft_steps, args.kd_chunk, getattr(args, "ft_lr", None))
        self.overhead = args.overhead
        self.work = args.dest / "kq"
        self.work.mkdir(parents=True, exist_ok=True)
        self.res: dict = {"profile": args.profile, "grid": GRID, "device": str(self.dev), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if self.dev.type == "cuda" else None, "rows": {},
                          "timeline": []}
        self.jobs: list[dict] = []
        self.pids: dict[str, int] = {}
        self.tables: dict = {}

    def save(self) -> None:
        bq.write_json(self.args.out / "search.json", self.res)

    def mark(self, what: str) -> None:
        self.res["timeline"].append([what, round(time.time() - self.t0, 1)])
        log(f"search: {what} at {time.time() - self.t0:.0f} s")
        self.save()

    def setup(self, base: Path, data: Path) -> None:
        import torch
        from safetensors.torch import load_file

        from steps.supernet import space_for
        from tailor.distill import teacher_logits
        from tailor.elastic.space import SearchSpace
        from tailor.elastic import importance
        from tailor.models.base import load_model_dir

        p = self.params
        torch.manual_seed(p.supernet.seed)
        model = load_model_dir(base, n_layers=p.model.n_layers).to(self.dev)
        seq = 64 if self.args.profile == "tiny" else None
        shard = {s: load_file(data / f"{s}.safetensors")["input_ids"][:, :seq] for s in ("train", "val", "calib")}
        self.train = shard["train"][:32] if self.args.profile == "tiny" else shard["train"]
        nv = p.search.val_seqs
        self.val = shard["val"][:nv]
        imp = importance.measure(model, list(shard["calib"].long().split(p.supernet.batch_size)))
        sg.save_importance(imp, self.work / "importance.safetensors")
        importance.permute_(model, imp)
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self.model, self.imp = model, imp
        self.space = space_for(p, model, imp.drop_order(), p.supernet_formats()["gguf"])  # what the supernet trains
        a = self.space.arch  # what the searches choose from: the table at Q4_0, as steps/search.device_space
        self.search_space = self.joint_space(imp.drop_order())
        self.t_val = teacher_logits(self.teacher, self.val)
        from tailor.arch import SubnetConfig

        self.n_params = SubnetConfig.max(a).param_count(a)
        self.res.update(n_params=self.n_params, overhead=self.overhead, drop_order=imp.drop_order(), space_bits=[str(b) for b in self.space.bits],
                        search_min_kv_groups=self.search_space.min_kv,
                        ffn_widths=self.space.ffn_widths(), data={"train": list(self.train.shape), "val": list(self.val.shape)})

    def supernet(self) -> dict:
        """End-to-end sandwich on the K grid until `--supernet-s` seconds or the profile's steps."""
        from tailor import accel
        from tailor.elastic.space import sandwich_configs
        from tailor.elastic.supernet import set_active, set_max
        from tailor.train import TrainSpec, train_kd

        sp = self.params.supernet
        if self.args.supernet_steps == 0:  # no training: the searches rank subnets on the base's own weights
            self.model.eval()
            set_max(self.model)
            kls = self.val_kls()
            return {"steps": 0, "step_cap": 0, "seconds": 0.0, "compile": "off", "student_tokens": 0,
                    "val_kl_before": kls, "val_kl_after": kls, "loss_first_last": None}
        steps = sp.steps if self.args.profile == "tiny" else min(sp.steps, self.args.supernet_steps)
        stop = time.time() + self.args.supernet_s
        box = {"steps": 0}
        spaces = {"gguf": self.space}

        def activate(step, gen):
            if time.time() > stop:
                raise bq.OutOfTime(step)
            box["steps"] = step + 1
            return [lambda c=c, f=f: set_active(self.model, c, f) for c, f in sandwich_configs(spaces, step, sp.n_random, gen)]

        spec = TrainSpec(steps, sp.batch_size, sp.lr, sp.kd_temperature, sp.seed, ckpt_every=max(1, steps), amp=sp.amp,
                         compile=sp.compile or self.args.supernet_compile, kd_chunk=sp.kd_chunk,
                         checkpointing=sp.checkpointing)
        t = time.time()
        before = self.val_kls()
        compiled = "on" if spec.compile and self.dev.type == "cuda" else "off"
        try:
            try:
                r = train_kd(self.model, self.teacher, self.train, spec, activate)
            except bq.OutOfTime:
                raise
            except Exception as e:  # noqa: BLE001 (a graph torch.compile cannot build: the rest of the time eager)
                if compiled != "on":
                    raise
                compiled = f"failed at step {box['steps']}, rest eager: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                log(f"supernet: compile {compiled}")
                accel.disable_compile()
                spec = dataclasses.replace(spec, compile=False)
                r = train_kd(self.model, self.teacher, self.train, spec, activate)
            done, curve = steps, r.curve
        except bq.OutOfTime as e:
            done, curve = int(e.args[0]), []
        self.model.eval()
        set_max(self.model)
        return {"steps": done, "step_cap": steps, "seconds": round(time.time() - t, 1), "compile": compiled,
                "student_tokens": done * sp.batch_size * self.train.shape[1] * (2 + sp.n_random),
                "val_kl_before": before, "val_kl_after": self.val_kls(),
                "loss_first_last": [round(curve[0]["loss"], 5), round(curve[-1]["loss"], 5)] if curve else None}

    def val_kls(self) -> dict[str, float]:
        from tailor.distill import mean_kl
        from tailor.elastic.supernet import set_active, set_max

        out = {}
        for name, cfg in (("min", self.space.min()), ("mid", self.space.middle())):
            set_active(self.model, cfg, "gguf")
            out[name] = mean_kl(self.model, self.val, self.t_val)
        set_max(self.model)
        out["max"] = mean_kl(self.model, self.val, self.t_val)
        return {k: round(v, 5) for k, v in out.items()}

    def joint_space(self, drop_order: list[int]):
        """What the joint searches choose from: the supernet's space (the profile's FFN, KV-group and depth
        floors), or with --search-min-kv-groups every kept layer holding at least that many KV groups (issue
        19's check of a search that pays for its bytes in FFN width, depth or bits, not in attention)."""
        from tailor.elastic.space import SearchSpace

        p, a = self.params, self.space.arch
        kv = getattr(self.args, "search_min_kv_groups", None) or p.supernet.min_kv_groups
        if not 1 <= kv <= a.n_kv_heads:
            raise SystemExit(f"kquant_gpu: --search-min-kv-groups {kv}: the model has {a.n_kv_heads} KV groups a layer")
        return SearchSpace.build(a, list(self.space.bits), [EMBED_BITS], p.supernet.min_ffn_frac, kv,
                                 p.supernet.max_drop_frac, drop_order)

    def fixed_space(self):
        """The bits-only space: every layer, every KV group, the full FFN width; bits free."""
        from tailor.elastic.space import SearchSpace

        a = self.space.arch
        return SearchSpace.build(a, list(self.space.bits), [EMBED_BITS], 1.0, a.n_kv_heads, 0.0,
                                 list(self.space.drop_order))

    def search_row(self, row: dict) -> dict:
        from tailor.arch import SubnetConfig
        from tailor.distill import teacher_logits
        from tailor.search import mip, sensitivity
        from tailor.elastic.supernet import set_max
        from tailor.search.sampled import Candidate, score

        a = self.space.arch
        space = self.fixed_space() if row["kind"] == "bits" else self.search_space
        max_bytes = SubnetConfig.max(a, embed_bits=EMBED_BITS).nbytes(a, "gguf")
        if "frac" in row:
            budgets = [int(row["frac"] * max_bytes)]
        elif row["kind"] == "bits" and "bpp" not in row:
            budgets = [weight_budget(b, self.n_params, self.overhead) for b in BITS_ONLY_BPP]
        else:
            budgets = [weight_budget(row["bpp"], self.n_params, self.overhead)]
        floor = space.min().nbytes(a, "gguf")
        key = "bits" if row["kind"] == "bits" else "joint"
        t = time.time()
        if all(floor > b for b in budgets):  # nothing to search: say so without measuring a table
            return {"infeasible": [{"budget_bytes": b, "infeasible": f"smallest subnet of the space {floor:,} B > {b:,} B"}
                                   for b in budgets], "floor_bytes": floor,
                    "floor_file_bpp": round(8 * (floor + self.overhead) / self.n_params, 4), "sensitivity_s": 0.0}
        if key not in self.tables:  # one sensitivity table per space, shared by its rows
            sv = self.val[: self.params.search.sens_seqs, : self.params.search.sens_tokens]
            self.tables[key] = sensitivity.measure(self.model, space, "gguf", EMBED_BITS, sv, teacher_logits(self.teacher, sv))
        table = self.tables[key]
        t_mip = time.time()
        tried = []
        for budget in budgets:
            if floor > budget:
                tried.append({"budget_bytes": budget, "infeasible": f"smallest subnet of the space {floor:,} B > {budget:,} B"})
                continue
            sols = mip.solutions(table, space, "gguf", EMBED_BITS, budget)
            cands = []
            for cfg in sols:
                n = cfg.nbytes(a, "gguf")
                cand = Candidate(cfg, n, 8 * n / cfg.param_count(a), 0.0, origin="mip")
                score(self.model, cand, "gguf", self.val, self.t_val, 8)
                cands.append(cand)
            set_max(self.model)
            fit = [c for c in cands if c.nbytes <= budget and math.isfinite(c.kl)]
            if fit:
                best = min(fit, key=lambda c: c.kl)
                break
            tried.append({"budget_bytes": budget, "infeasible": "no MIP solution under it"})
        else:
            return {"infeasible": tried, "sensitivity_s": round(t_mip - t, 1)}
        cfg = best.config
        bpp_file = 8 * (best.nbytes + self.overhead) / self.n_params
        start_kl = self.start_kls(cfg)
        return {"budget_bytes": budget, "file_bpp_predicted": round(bpp_file, 4), "infeasible": tried,
                "weight_bytes": best.nbytes, "search_kl": best.kl, "predicted_kl": table.predict(cfg),
                "kl_before_from": start_kl,
                "kept_layers": len(cfg.kept), "kv_groups": [lc.kv_groups for lc in cfg.layers if lc.keep],
                "ffn": [lc.ffn for lc in cfg.layers if lc.keep],
                "types": bq._hist([str(b) for lc in cfg.layers if lc.keep for b in lc.bits.values()]),
                "candidates": [{"hash": c.config.hash, "bytes": c.nbytes, "kl": c.kl} for c in cands],
                "sensitivity_s": round(t_mip - t, 1), "mip_score_s": round(time.time() - t_mip, 1),
                "config": cfg.to_dict()}

    def start_kls(self, cfg) -> dict[str, float]:
        """Where subnet `cfg`'s fine-tune could start: cut from the permuted base (this script's rows) or from
        the trained supernet (the pipeline's finetune stage, a "+sn" row); the validation KL of each."""
        from tailor.distill import mean_kl
        from tailor.elastic.supernet import export_active, set_max

        kls = {w: mean_kl(export_active(m, cfg, "gguf"), self.val, self.t_val)
               for w, m in (("base", self.teacher), ("supernet", self.model))}
        set_max(self.model)
        return kls

    def start(self, rid: str, cfg, base: Path, data: Path) -> None:
        """Write the row's config and start its fine-tune, detached (it outlives this command); a row left out
        of --finetune is only searched (its subnet and starting KLs in search.json)."""
        chosen = getattr(self.args, "finetune", None)
        if chosen is not None and rid not in chosen and not (rid.startswith("bits-k@") and "bits-k" in chosen):
            self.mark(f"{rid}: searched only (not in --finetune)")
            return
        d = self.work / "jobs" / f"job{len(self.jobs)}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(cfg.to_json())
        repo = self.repo_copy()
        row_id = rid + (getattr(self.args, "id_suffix", None) or "")  # what its meta.json and folder are named
        cmd = [sys.executable, str(repo / "benchmarks" / "kquant_gpu.py"), "finetune", "--row", row_id, "--job", str(d),
               "--base", str(base), "--data", str(data), "--importance", str(self.work / "importance.safetensors"),
               "--profile", self.args.profile, "--kd-chunk", str(self.args.kd_chunk)] \
            + (["--steps", str(self.ft_steps(rid))] if self.args.ft_steps or "2x" in variants_of(rid) else []) \
            + (["--train-embeddings"] if "emb" in variants_of(rid) else []) \
            + (["--from-supernet", str(self.work / "supernet.safetensors")] if "sn" in variants_of(rid) else []) \
            + (["--generated", str(self.work / GENERATED)] if "gen" in variants_of(rid) else []) \
            + (["--train-file", TRAIN_ALL] if "data" in variants_of(rid) else []) \
            + (["--seed", str(seed_of(rid))] if seed_of(rid) is not None else []) \
            + (["--lr", str(self.args.ft_lr)] if getattr(self.args, "ft_lr", None) else []) \
            + (["--eager"] if self.args.ft_eager else []) + (["--checkpointing"] if self.args.ft_checkpointing else [])
        k = len(self.jobs)
        if self.args.max_jobs and k >= self.args.max_jobs:  # GPU memory for N at once: wait for the job N back
            cmd += ["--after", str(self.pids[str(k - self.args.max_jobs)])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.args.dest / "site"), str(repo)]),
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "4", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        with open(d / "log", "ab") as f:
            pid = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True).pid
        self.jobs.append({"gpu": 0, "rows": [row_id], "schedule": self.params.finetune.schedule, "lr": self.params.finetune.lr})
        self.pids[str(len(self.jobs) - 1)] = pid
        # seed_table_gpu.wait reads this layout: jobs.json {"jobs", "pids"} and job<i>/<row>/meta.json
        (self.work / "jobs" / "jobs.json").write_text(json.dumps({"jobs": self.jobs, "pids": self.pids}))
        self.mark(f"fine-tune {row_id} started (pid {pid})")

    def generate(self, n: int) -> dict:
        """`n` sequences sampled from the (permuted) base once for every "+gen" row of this run, before any
        of them starts: kq/generated.safetensors. Permuting heads and neurons leaves the base's function, so
        the samples are the base's."""
        import torch

        from tailor.distill import teacher_samples
        from tailor.models.base import save_state

        t = time.time()
        seqs = teacher_samples(self.teacher, n, self.train.shape[1], self.train[:, 0].unique(), self.params.finetune.seed,
                               batch_size=self.args.gen_batch, dtype=GEN_DTYPES[self.args.gen_dtype])
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        save_state({"input_ids": seqs}, self.work / GENERATED)
        secs = time.time() - t
        self.mark(f"{n} sequences sampled from the base")
        return {"seqs": n, "seq_len": int(seqs.shape[1]), "batch": self.args.gen_batch, "dtype": self.args.gen_dtype,
                "seconds": round(secs, 1),
                "tokens_per_s": round(seqs.numel() / secs), "distinct_first_tokens": int(seqs[:, 0].unique().numel())}

    def save_supernet(self) -> None:
        """The trained supernet's weights (importance-permuted, clips included), for "+sn" fine-tunes."""
        from tailor.models.base import save_state

        save_state({k: v.detach().cpu() for k, v in self.model.state_dict().items() if k != "lm_head.weight"},
                   self.work / "supernet.safetensors")

    def free_search_memory(self) -> None:
        import gc

        import torch

        del self.model, self.teacher, self.t_val, self.tables
        gc.collect()
        torch.cuda.empty_cache()
        if torch.cuda.is_available():
            self.mark(f"search's GPU memory freed: {torch.cuda.memory_allocated() / 1e9:.1f} GB still allocated")

    def ft_steps(self, rid: str) -> int:
        """Fine-tune steps of row `rid`: --ft-steps or the profile's, twice that for a "+2x" variant."""
        n = self.args.ft_steps or self.params.finetune.steps
        return 2 * n if "2x" in variants_of(rid) else n

    def repo_copy(self) -> Path:
        """The code the fine-tunes run, copied once: the device re-syncs the checkout at every call, under
        processes that still import from it."""
        import shutil

        dst, tmp = self.args.dest / "repo", self.args.dest / "repo.tmp"
        if not dst.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ROOT, tmp, ignore=shutil.ignore_patterns(".git", ".bwq", ".venv", ".cache", "reports", "mutants",
                                                                    "__pycache__", "artifacts", "*.egg-info", "mlruns", "mlartifacts"))
            tmp.rename(dst)
        return dst

    def main(self) -> None:
        from tailor.arch import SubnetConfig

        plan = rows_plan(self.args.profile == "tiny", self.args.rows)
        unknown = sorted(set(getattr(self.args, "finetune", None) or []) - {r["id"] for r in plan})
        if unknown:  # before any GPU minute is spent
            raise SystemExit(f"kquant_gpu: --finetune {' '.join(unknown)}: not among the rows "
                             f"({' '.join(r['id'] for r in plan)})")
        if self.args.gguf is not None:  # any model source's GGUF (staged with stage-gguf), its shard beside
            base, data = convert_base(self.args.gguf, self.args.data / "tok"), self.args.data
        else:  # SmolLM2: its GGUF halves carried in .bwq/a and .bwq/b
            base, data = bq.unpack(self.args.src, self.args.dest), self.args.dest / "data"
        if any("data" in row.get("variants", []) for row in plan) and not (data / TRAIN_ALL).is_file():
            raise SystemExit(f"kquant_gpu: a +data row needs {data / TRAIN_ALL}: `pack-data` here, then untar "
                             f"its train_all.tar.xz into {data} there")
        self.setup(base, data)
        self.mark("setup")
        if any("gen" in row.get("variants", []) for row in plan):  # shared by the +gen rows, drawn before any starts
            self.res["generated"] = self.generate(self.args.gen_seqs)
        if self.args.configs:  # an earlier search's subnets: no search; a supernet only for "+sn" rows
            self.res["rows"] = search_rows(self.args.configs)
            self.res["configs_from"] = str(self.args.configs)
            cfgs = {}
            for row in plan:
                src = self.res["rows"].get(row.get("of", row["id"]), {})
                if row["kind"] == "uniform":
                    cfgs[row["id"]] = SubnetConfig.uniform(self.space.arch, "IQ4_NL", embed_bits=EMBED_BITS)
                elif "config" in src:
                    cfgs[row["id"]] = SubnetConfig.from_dict(src["config"])
                else:
                    raise SystemExit(f"kquant_gpu: --configs {self.args.configs}: no subnet for row {row['id']}")
            if any("sn" in row.get("variants", []) for row in plan):
                # the same subnets, started from a supernet trained as a search run trains it: "+sn" against
                # the base-started rows with nothing else changed
                self.res["supernet"] = self.supernet()
                self.save_supernet()
                self.mark("supernet")
                self.res["kl_before_from"] = {rid: self.start_kls(cfg) for rid, cfg in cfgs.items()}
                for r in self.res["rows"].values():  # the earlier search's, from another supernet: kept under its name
                    if "kl_before_from" in r:
                        r["kl_before_from_searched"] = r.pop("kl_before_from")
            self.free_search_memory()
            for rid, cfg in cfgs.items():
                self.start(rid, cfg, base, data)
            self.res["done"] = True
            self.save()
            return
        for row in (r for r in plan if r["kind"] == "uniform"):
            self.start(row["id"], SubnetConfig.uniform(self.space.arch, "IQ4_NL", embed_bits=EMBED_BITS), base, data)
        self.res["supernet"] = self.supernet()
        if any("sn" in row.get("variants", []) for row in plan):  # ~0.5 GB written only for a row that reads it
            self.save_supernet()
        self.mark("supernet")
        found = []
        for row in (r for r in plan if r["kind"] != "uniform"):
            rid = row["id"]
            if row["kind"] == "variant":
                base_res = self.res["rows"].get(row["of"])
                if base_res is None:
                    raise SystemExit(f"kquant_gpu: --rows {rid}: its base row {row['of']} is not searched before it")
                if "config" not in base_res:
                    self.mark(f"{rid}: infeasible (as {row['of']})")
                    continue
                cfg = SubnetConfig.from_dict(base_res["config"])
                if self.args.start_after_search:
                    found.append((rid, cfg))
                else:
                    self.start(rid, cfg, base, data)
                continue
            res = self.search_row(row)
            if "config" in res and row["id"] == "bits-k":
                rid = f"bits-k@{BITS_ONLY_BPP[len(res['infeasible'])]}"
            self.res["rows"][rid] = res
            if "config" not in res:
                self.mark(f"{rid}: infeasible")
            elif self.args.start_after_search:
                found.append((rid, SubnetConfig.from_dict(res["config"])))
            else:
                self.start(rid, SubnetConfig.from_dict(res["config"]), base, data)
        if found:  # the search's own GPU memory (model, teacher, its logits) freed before the fine-tunes start
            self.free_search_memory()
            for rid, cfg in found:
                self.start(rid, cfg, base, data)
        self.res["done"] = True
        self.save()


# ---- the fine-tune of one row (search starts these) --------------------------------------------------
def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, finished but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(pid: int, row: str, poll_s: float = 5.0) -> None:
    """Block until `pid` ends: a row queued behind another (search --max-jobs) starts when a GPU slot frees."""
    t = time.time()
    log(f"finetune {row}: queued behind pid {pid}")
    while running(pid):
        time.sleep(poll_s)
    log(f"finetune {row}: pid {pid} ended, starting after {time.time() - t:.0f} s in the queue")


def finetune(args) -> None:
    import torch

    from tailor import accel
    from tailor.arch import SubnetConfig
    from tailor.distill import mean_kl, teacher_logits
    from tailor.elastic import importance
    from tailor.elastic.supernet import arch_of, bake_clip_, export_active, round16_
    from tailor.eval.ppl import perplexity
    from tailor.export import gguf
    from tailor.export.gguf_vocab import tokenizer_gguf
    from tailor.models.base import load_model_dir, load_tokenizer
    from tailor.train import TrainSpec, train_kd
    from safetensors.torch import load_file

    if args.after:
        wait_for(args.after, args.row)
    t0 = time.time()
    p = k_params(args.profile, args.steps, args.kd_chunk, args.lr, args.train_embeddings, args.seed)
    ft = p.finetune
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rd = args.job / sg.slug(args.row)
    rd.mkdir(parents=True, exist_ok=True)
    model = load_model_dir(args.base, n_layers=p.model.n_layers)
    try:
        tok = load_tokenizer(args.base, model)
    except Exception:  # noqa: BLE001 (another transformers version: the GGUF's vocabulary comes from the template)
        tok = None
    importance.permute_(model, sg.load_importance(args.importance))
    teacher = copy.deepcopy(model)  # the permuted base, whichever weights the student starts from
    if args.from_supernet:  # a "+sn" row: the trained supernet's weights, as the pipeline's finetune stage
        from safetensors.torch import load_file as _load

        missing, unexpected = model.load_state_dict(_load(args.from_supernet), strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise SystemExit(f"kquant_gpu finetune: {args.from_supernet}: not this model's supernet")
        model.tie_weights()
    cfg = SubnetConfig.from_json((args.job / "config.json").read_text())
    student = export_active(model, cfg, "gguf").to(dev)
    teacher = teacher.to(dev).requires_grad_(False).eval()
    seq = 64 if args.profile == "tiny" else None
    train = load_file(args.data / args.train_file)["input_ids"][:, :seq]
    n_corpus = len(train)
    if args.generated:  # a "+gen" row: the search run's teacher samples beside the corpus rows
        gen = load_file(args.generated)["input_ids"]
        if gen.shape[1] != train.shape[1]:
            raise SystemExit(f"kquant_gpu finetune: {args.generated}: {gen.shape[1]}-token samples, shard {train.shape[1]}")
        train = torch.cat([train, gen.to(train.dtype)])
    val = load_file(args.data / "val.safetensors")["input_ids"][:, :seq][: p.search.val_seqs]
    t_val = teacher_logits(teacher, val)
    kl_before = mean_kl(student, val, t_val)
    if dev.type == "cuda" and not args.eager:
        accel.enable_compile()
    spec = TrainSpec(ft.steps, ft.batch_size, ft.lr, ft.kd_temperature, ft.seed, ckpt_every=max(1, ft.steps // 4),
                     schedule=ft.schedule, warmup_steps=min(ft.warmup_steps, ft.steps // 10) if args.steps else ft.warmup_steps,
                     train_embeddings=ft.train_embeddings, kd_chunk=args.kd_chunk, checkpointing=args.checkpointing,
                     fingerprint=f"kquant_gpu:{args.row}:{cfg.hash}")
    t1 = time.time()
    compiled = "off (--eager)" if args.eager else "on" if dev.type == "cuda" else "off (CPU)"
    try:
        r = train_kd(student, teacher, train, spec, lambda step, gen: [lambda: None], rd / "ckpt", desc=args.row)
    except Exception as e:  # noqa: BLE001 (a K-quant graph torch.compile cannot build: the row trains eager)
        if dev.type != "cuda" or args.eager:
            raise
        compiled = f"failed, trained eager: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        log(f"finetune {args.row}: compile {compiled}")
        accel.disable_compile()
        student = export_active(model, cfg, "gguf").to(dev)  # afresh: the failed run may have moved it
        t1 = time.time()
        r = train_kd(student, teacher, train, spec, lambda step, gen: [lambda: None], rd / "ckpt-eager", desc=args.row)
    train_s = time.time() - t1
    bake_clip_(student)
    round16_(student)
    kl_after = mean_kl(student, val, t_val)
    student = student.to("cpu").eval()
    path = rd / "model.gguf"
    t2 = time.time()
    info = gguf.export(student, tok, path, template=tokenizer_gguf(args.base))
    holds = bq.file_holds_grid(path, student)
    ids = json.loads((args.data / "wiki_ids.json").read_text())[: p.export.ppl_docs]
    seqs = [s for s in ids if len(s) >= 2]
    torch_ppl = perplexity(student.to(dev), seqs, device=dev)
    try:
        from tailor.export import llamacpp

        lc_ppl = llamacpp.perplexity(path, seqs, n_threads=4)
    except Exception as e:  # noqa: BLE001 (the carried build failing to load is reported, not fatal)
        lc_ppl = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    scored = {}
    if (args.data / "evalset.json").is_file():  # a model whose files are too large to carry back: scored here
        import kquant_table as kt

        evalset = json.loads((args.data / "evalset.json").read_text())
        t3 = time.time()
        scored = {"llamacpp_eval": st.evaluate_file(path, None, evalset, speed=False), "types": kt.tensor_types(path),
                  "evalset_sha256": kt.evalset_sha256(evalset)}
        log(f"finetune {args.row}: scored in llama.cpp in {time.time() - t3:.0f} s: wiki "
            f"{scored['llamacpp_eval']['ppl_wiki']:.2f}, passages {scored['llamacpp_eval']['ppl_boolq_passages']:.2f}, "
            f"piqa {scored['llamacpp_eval']['piqa']:.3f}")
    meta = {"id": args.row, "recipe": RECIPE, **scored, "config_hash": cfg.hash, "config": cfg.to_dict(),
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "finetune": ft.model_dump(), "seq_len": int(train.shape[1]),
            "train_seqs": {"corpus": n_corpus, "generated": len(train) - n_corpus}, "train_file": args.train_file,
            "tokens": ft.steps * ft.batch_size * int(train.shape[1]), "train_seconds": round(train_s, 1),
            "tokens_per_s": round(ft.steps * ft.batch_size * int(train.shape[1]) / train_s),
            "resumed_from": r.resumed_from, "compile": compiled, "kl_before": kl_before, "kl_after": kl_after,
            "file_bytes": info["file_bytes"], "weight_bytes": info["weight_bytes"], "predicted_weight_bytes":
            cfg.nbytes(arch_of(model), "gguf"),
            "sha256": info["sha256"], "file_holds_model_grid": holds, "torch_ppl": torch_ppl, "llamacpp_ppl": lc_ppl,
            "ppl_docs": len(seqs), "export_s": round(time.time() - t2, 1), "wall_s": round(time.time() - t0, 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev.type == "cuda" else None,
            "curve": r.curve[:: max(1, len(r.curve) // 50)]}
    sg.pack(path, rd)
    (rd / "meta.json").write_text(json.dumps(meta))
    log(f"finetune {args.row}: KL {kl_before:.4f} -> {kl_after:.4f}, torch ppl {torch_ppl:.2f}, llama.cpp {lc_ppl}, "
        f"grid held {holds}, {train_s:.0f} s training")


# ---- any model source: its GGUF in pieces a device call can carry ------------------------------------
DATA_FILES = ("train.safetensors", "val.safetensors", "calib.safetensors", "wiki_ids.json")
EVALSET = "evalset.json"  # optional beside them (pack-evalset): the rows are then scored on the GPU machine


def pack_evalset(model: str, work: Path, dest: Path) -> None:
    """Here: kquant_table's items for `model` (its workspace `work`, calibrate output inside) as token ids in
    dest/evalset.json, for a model whose trained files are too large to carry back: each fine-tune then
    scores its own file in llama.cpp by the table's code, and the table checks the items' sha256."""
    import kquant_table as kt

    ctx = st.Ctx(work, model)
    evalset = kt.table_evalset(ctx)
    (dest / EVALSET).write_text(json.dumps(evalset))
    log(f"pack-evalset: {model}: {len(evalset['wiki'])} wiki, {len(evalset['passages'])} passages, "
        f"{len(evalset['tasks']['piqa'])} PIQA items -> {dest / EVALSET} (sha256 {kt.evalset_sha256(evalset)[:12]})")


def pack_gguf(model: str, dest: Path, chunk: int, calib: Path | None = None) -> None:
    """Here: `model`'s GGUF cut into dest/p<k>/gguf.part<k> (one carry folder per device call), and the full
    profile's calibrate shard for it (tokenized here, by its tokenizer) with the held-out sentences as token
    ids in dest/data; manifest.json (sha256 of the whole file) in every folder."""
    import hashlib
    import shutil

    import yaml
    from transformers import AutoTokenizer

    from steps import calibrate
    from tailor.config import parse_params
    from tailor.models.base import base_dir
    from tailor.models.source import resolve

    src = resolve(model)
    if src.kind != "gguf":
        raise SystemExit(f"kquant_gpu: {model}: a GGUF source is needed (got a {src.kind} directory)")
    blob = src.path.read_bytes()
    shutil.rmtree(dest, ignore_errors=True)
    n = -(-len(blob) // chunk)
    manifest = {"model": model, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "parts": n}
    for k in range(n):
        d = dest / f"p{k}"
        d.mkdir(parents=True)
        (d / f"gguf.part{k}").write_bytes(blob[k * chunk:(k + 1) * chunk])
        (d / "manifest.json").write_text(json.dumps(manifest))
    data = dest / f"p{n - 1}"  # the shard rides with the last (smallest) part
    if calib is None:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["model"]["source"] = model
        calib = dest / ".calibrate"
        calibrate.run(parse_params(raw, "full"), calib)
    for f in ("train.safetensors", "val.safetensors", "calib.safetensors"):
        shutil.copyfile(calib / f, data / f)
    tok = AutoTokenizer.from_pretrained(base_dir(model))
    (data / "tok").mkdir()
    for f in TOKENIZER_FILES:  # this checkout's conversion (convert_base uses it where the device's differs)
        if (base_dir(model) / f).is_file():  # gzip: Qwen's tokenizer.json is 11 MB, the last part's room ~8
            (data / "tok" / f"{f}.gz").write_bytes(gzip.compress((base_dir(model) / f).read_bytes()))
    texts = [json.loads(x)["text"] for x in (calib / "eval" / "wiki.jsonl").read_text().splitlines() if x.strip()]
    (data / "wiki_ids.json").write_text(json.dumps([tok(t)["input_ids"] for t in texts]))
    shutil.rmtree(dest / ".calibrate", ignore_errors=True)
    log(f"pack-gguf: {model}: {n} parts of <= {chunk:,} B in {dest}/p*, the shard in {data}")


def pack_data(calib: Path, calib_all: Path, dest: Path) -> Path:
    """Here: the full profile's calibrate build with `train_seqs: null` (every corpus document left after val
    and calib) into `calib_all` if missing, its train split as dest/train_all.tar.xz (data/TRAIN_ALL) for the
    +data rows. SystemExit naming the file before any build when `calib` lacks its outputs, and when
    `calib_all` was not built with train_seqs null or differs from `calib` in anything else (params, val or
    calib bytes): every row must be scored against one held-out split."""
    import tarfile

    import yaml
    from transformers import AutoTokenizer

    from tailor.config import parse_params
    from tailor.data import build
    from tailor.hashing import sha256_file
    from tailor.models.base import base_dir

    for f in ("val.safetensors", "calib.safetensors", "data_report.json"):  # before any build: one line, no traceback
        if not (calib / f).is_file():
            raise SystemExit(f"kquant_gpu pack-data: --calib {calib}: no {f} (the full profile's calibrate output)")
    if not (calib_all / "train.safetensors").is_file():
        p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()), "full").calibrate
        build(p.model_copy(update={"train_seqs": None}), AutoTokenizer.from_pretrained(base_dir()), calib_all)
    params = {d: json.loads((d / "data_report.json").read_text())["params"] for d in (calib, calib_all)}
    if params[calib_all].get("train_seqs", 0) is not None:
        raise SystemExit(f"kquant_gpu pack-data: --calib-all {calib_all} was built with train_seqs "
                         f"{params[calib_all].get('train_seqs')}, not null (every document left)")
    other = sorted(k for k in params[calib] if k != "train_seqs" and params[calib][k] != params[calib_all].get(k))
    if other:
        raise SystemExit(f"kquant_gpu pack-data: --calib-all {calib_all} differs from {calib} in {', '.join(other)}: "
                         "only train_seqs may differ")
    for f in ("val.safetensors", "calib.safetensors"):  # the rows must share one held-out set (and one calib)
        if sha256_file(calib / f) != sha256_file(calib_all / f):
            raise SystemExit(f"kquant_gpu pack-data: {calib_all}/{f} differs from {calib}'s")
    dest.mkdir(parents=True, exist_ok=True)
    out, tmp = dest / "train_all.tar.xz", dest / ".train_all.tmp"
    try:
        with tarfile.open(tmp, "w:xz") as tar:
            tar.add(calib_all / "train.safetensors", f"data/{TRAIN_ALL}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shard = json.loads((calib_all / "data_report.json").read_text())["shards"]["train"]
    log(f"pack-data: {shard['seqs']} train sequences ({shard['docs']} documents) -> {out} "
        f"({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def gen_speed(args) -> dict:
    """Device: teacher_samples' speed on the base, one batch of `--seq-len` tokens per (dtype, batch size),
    every setting in one process on one GPU: sequences/s and tokens/s, peak memory. Writes gen_speed.json
    into --out. Session 16's probe: fp32, batch 1024, 12.9 k tokens/s (reports/bench/kquant_gpu_s16.json)."""
    import torch
    from safetensors.torch import load_file

    from tailor.distill import teacher_samples
    from tailor.models.base import load_model_dir

    base = bq.unpack(args.src, args.dest)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_dir(base).to(dev).eval()
    first = load_file(args.dest / "data" / "train.safetensors")["input_ids"][:, 0].unique()
    rows = []
    teacher_samples(model, 2, 8, first, 0, batch_size=2)  # warm-up: kernels and allocator, not timed
    for dtype in args.dtypes:
        for batch in args.batches:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.time()
            out = teacher_samples(model, batch, args.seq_len, first, 0, batch_size=batch, dtype=GEN_DTYPES[dtype])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            secs = time.time() - t
            rows.append({"dtype": dtype, "batch": batch, "seq_len": args.seq_len, "seconds": round(secs, 2),
                         "tokens_per_s": round(out.numel() / secs), "ms_per_step": round(1000 * secs / args.seq_len, 1),
                         "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev.type == "cuda" else None})
            log(f"gen-speed: {rows[-1]}")
    res = {"what": gen_speed.__doc__.split(".")[0], "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
           "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gen_speed.json").write_text(json.dumps(res, indent=1))
    return res


def stage_gguf(src: Path, dest: Path) -> Path | None:
    """Device, once per carry folder: keep its part (or the shard); when every part is there, join them
    into dest/model.gguf and check the sha256. Returns the joined file, or None while parts are missing."""
    import hashlib
    import shutil

    manifest = json.loads((src / "manifest.json").read_text())
    parts = dest / "gguf_parts"
    parts.mkdir(parents=True, exist_ok=True)
    for f in src.glob("gguf.part*"):
        shutil.copyfile(f, parts / f.name)
    if (src / "train.safetensors").is_file():
        (dest / "kqdata").mkdir(exist_ok=True)
        for f in DATA_FILES + ((EVALSET,) if (src / EVALSET).is_file() else ()):
            shutil.copyfile(src / f, dest / "kqdata" / f)
        if (src / "tok").is_dir():
            (dest / "kqdata" / "tok").mkdir(exist_ok=True)
            for f in (src / "tok").glob("*.gz"):
                (dest / "kqdata" / "tok" / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    have = sorted(parts.glob("gguf.part*"), key=lambda f: int(f.name.rsplit("part", 1)[1]))
    out = dest / "model.gguf"
    if len(have) < manifest["parts"]:
        log(f"stage-gguf: {len(have)}/{manifest['parts']} parts here")
        return None
    h = hashlib.sha256()
    with open(dest / ".model.gguf.tmp", "wb") as f:
        for part in have:
            b = part.read_bytes()
            h.update(b)
            f.write(b)
    if h.hexdigest() != manifest["sha256"]:
        raise SystemExit("kquant_gpu: the joined GGUF's sha256 differs from the packed one")
    os.replace(dest / ".model.gguf.tmp", out)
    log(f"stage-gguf: {out} joined, sha256 ok ({manifest['bytes']:,} B)")
    return out


# ---- here: the returned chunks into the table's workspace --------------------------------------------
def ingest(sources: list[Path], work: Path) -> list[Path]:
    """gather + unpack (sha256-checked) every returned row into work/rows/<id>/{model.gguf, gpu_meta.json}."""
    import shutil

    out = []
    tmp = work / ".kquant_gpu"
    for d in sg.gather(sources, tmp):
        if not (d / "meta.json").is_file():
            print(f"kquant_gpu: {d.name}: chunks without a meta.json (skipped)", flush=True)
            continue
        meta = json.loads((d / "meta.json").read_text())
        rd = work / "rows" / meta["id"]  # kquant_table keys row folders by id
        if "llamacpp_eval" in meta and not any(d.glob("part[0-9][0-9]")):  # scored there, the file stayed there
            rd.mkdir(parents=True, exist_ok=True)
            (rd / "gpu_meta.json").write_text(json.dumps(meta, indent=1))
            out.append(rd)
            print(f"kquant_gpu: {meta['id']}: scored on the GPU machine ({meta['file_bytes']:,} B file not carried)")
            continue
        f = sg.unpack(d)
        rd.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, rd / "model.gguf")
        (rd / "gpu_meta.json").write_text(json.dumps(meta, indent=1))
        out.append(rd)
        print(f"kquant_gpu: {meta['id']}: {meta['file_bytes']:,} B, sha256 ok -> {rd}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("search", help="device call 2: rebuild the base, supernet, searches, fine-tunes started")
    a.add_argument("--src", type=Path, default=Path(".bwq/b"))
    a.add_argument("--dest", type=Path, default=DEST)
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or DEST / "out"))
    a.add_argument("--profile", choices=("full", "tiny"), default="full")
    a.add_argument("--supernet-s", type=float, default=240.0, help="seconds of supernet training at most")
    a.add_argument("--supernet-steps", type=int, default=400,
                   help="sandwich steps at most; 0: no training, the searches rank subnets on the base's weights")
    a.add_argument("--supernet-compile", action="store_true",
                   help="torch.compile the quantizer in the supernet's training too (CUDA; session 11 ran it eager: "
                        "60 steps in 240 s beside a fine-tune)")
    a.add_argument("--gguf", type=Path, default=None, help="the base as a GGUF file (stage-gguf) instead of --src")
    a.add_argument("--data", type=Path, default=None, help="with --gguf: its calibrate shard + wiki_ids.json (pack-gguf)")
    a.add_argument("--overhead", type=int, default=OVERHEAD, help="non-weight bytes of the base's GGUF (its F16 file's)")
    a.add_argument("--ft-steps", type=int, default=None, help="fine-tune steps instead of the full profile's")
    a.add_argument("--kd-chunk", type=int, default=0, help="tokens per chunk of the KD loss (0: whole batch)")
    a.add_argument("--ft-lr", type=float, default=None, help="fine-tune peak learning rate instead of the full profile's")
    a.add_argument("--rows", nargs="*", default=None, help="rows by id instead of the default four (rows_plan)")
    a.add_argument("--configs", type=Path, default=None,
                   help="an earlier search.json: fine-tune its rows' subnets, no search (a supernet only for +sn rows)")
    a.add_argument("--search-min-kv-groups", type=int, default=None,
                   help="joint searches keep at least this many KV groups a layer (default: the profile's floor)")
    a.add_argument("--finetune", nargs="*", default=None,
                   help="fine-tune only these of the rows (none: search only); default every row")
    a.add_argument("--gen-seqs", type=int, default=10_800,
                   help="teacher-sampled sequences for +gen rows (default 3x the full profile's 3,600-sequence shard)")
    a.add_argument("--gen-batch", type=int, default=512, help="sequences sampled at once (KV cache: batch x seq)")
    a.add_argument("--gen-dtype", choices=tuple(GEN_DTYPES), default="fp32",
                   help="the sampling copy of the base in this dtype (bf16: half the KV cache's bytes; gen-speed)")
    a.add_argument("--id-suffix", default=None,
                   help="appended to each fine-tuned row's id, naming what this run's search changed (e.g. +bw: "
                        "ranked on the base's weights, --supernet-steps 0), so its rows stand beside earlier ones")
    a.add_argument("--start-after-search", action="store_true",
                   help="start the fine-tunes once every row is searched and the search's GPU memory is freed")
    a.add_argument("--ft-eager", action="store_true", help="fine-tunes without torch.compile (finetune --eager)")
    a.add_argument("--ft-checkpointing", action="store_true", help="fine-tunes with activation checkpointing")
    a.add_argument("--max-jobs", type=int, default=0,
                   help="fine-tunes on the GPU at once; later rows queue (0: all at once). Qwen2.5-0.5B eager: 65 GB each")
    a = sub.add_parser("finetune", help="one row (search starts these)")
    a.add_argument("--row", required=True)
    a.add_argument("--job", type=Path, required=True)
    a.add_argument("--base", type=Path, required=True)
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--importance", type=Path, required=True)
    a.add_argument("--profile", choices=("full", "tiny"), default="full")
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--train-embeddings", action="store_true", help="QAT trains the tied embedding too (a +emb row)")
    a.add_argument("--seed", type=int, default=None, help="finetune.seed instead of the profile's (a +s<N> row)")
    a.add_argument("--from-supernet", type=Path, default=None, help="start from these supernet weights (a +sn row)")
    a.add_argument("--generated", type=Path, default=None, help="teacher samples joining the shard (a +gen row)")
    a.add_argument("--train-file", default="train.safetensors", help=f"the train split in --data ({TRAIN_ALL}: a +data row)")
    a.add_argument("--kd-chunk", type=int, default=0)
    a.add_argument("--eager", action="store_true", help="no torch.compile (on Qwen2.5-0.5B's shapes Inductor hung in "
                   "sympy for minutes, then segfaulted)")
    a.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every decoder block")
    a.add_argument("--after", type=int, default=None, help="start when this pid has ended (search --max-jobs)")
    a = sub.add_parser("wait", help="device: until every started fine-tune finished or died")
    a.add_argument("--dest", type=Path, default=DEST)
    a.add_argument("--timeout", type=float, default=540)
    a = sub.add_parser("collect", help="device: metas + the named chunks into --out")
    a.add_argument("--dest", type=Path, default=DEST)
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or DEST / "collected"))
    a.add_argument("--parts", nargs="*", default=[], help="ROW:FIRST-LAST, e.g. tailor-k@4.0:0-3")
    a = sub.add_parser("pack-gguf", help="here: a model source's GGUF in carry-sized parts + its full-profile shard")
    a.add_argument("--model", required=True)
    a.add_argument("--dest", type=Path, default=ROOT / ".kqg")
    a.add_argument("--chunk", type=int, default=56_000_000, help="bytes per part (a call carries 64 MiB with the tree)")
    a.add_argument("--calib", type=Path, default=None, help="an existing full-profile calibrate output for it")
    a = sub.add_parser("pack-evalset", help="here: kquant_table's items for the model, scored on the GPU machine")
    a.add_argument("--model", required=True)
    a.add_argument("--work", type=Path, required=True, help="the model's kquant_table workspace")
    a.add_argument("--dest", type=Path, default=ROOT / ".kqg" / "p8", help="the carry folder of the shard")
    a = sub.add_parser("pack-data", help="here: every corpus document left as a train split, for +data rows")
    a.add_argument("--calib", type=Path, default=ROOT / ".bwq" / "calibrate_full")
    a.add_argument("--calib-all", type=Path, default=ROOT / ".bwq" / "calibrate_all")
    a.add_argument("--dest", type=Path, default=ROOT / ".bwq" / "c")
    a = sub.add_parser("gen-speed", help="device: the teacher sampler's speed by dtype and batch, side by side")
    a.add_argument("--src", type=Path, default=Path(".bwq/b"))
    a.add_argument("--dest", type=Path, default=DEST)
    a.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or DEST / "out"))
    a.add_argument("--dtypes", nargs="+", choices=tuple(GEN_DTYPES), default=list(GEN_DTYPES))
    a.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    a.add_argument("--seq-len", type=int, default=512)
    a = sub.add_parser("stage-gguf", help="device: one carried part (or the shard); joins when all are there")
    a.add_argument("--src", type=Path, required=True)
    a.add_argument("--dest", type=Path, default=DEST)
    a = sub.add_parser("ingest", help="here: returned chunks -> --work rows/<id>/model.gguf")
    a.add_argument("--from", dest="sources", type=Path, nargs="+", required=True)
    a.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kquanttable")
    args = ap.parse_args()
    if args.cmd == "search":
        args.out.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(args.dest / "site"))
        s = Search(args)
        try:
            s.main()
        except BaseException as e:
            s.res["error"] = f"{type(e).__name__}: {e}"
            s.save()
            raise
    elif args.cmd == "finetune":
        finetune(args)
    elif args.cmd == "pack-gguf":
        pack_gguf(args.model, args.dest, args.chunk, args.calib)
    elif args.cmd == "pack-evalset":
        pack_evalset(args.model, args.work, args.dest)
    elif args.cmd == "gen-speed":
        gen_speed(args)
    elif args.cmd == "pack-data":
        pack_data(args.calib, args.calib_all, args.dest)
    elif args.cmd == "stage-gguf":
        stage_gguf(args.src, args.dest)
    elif args.cmd == "wait":
        sg.wait(args.dest / "kq" / "jobs", args.timeout)
    elif args.cmd == "collect":
        sg.collect(args.dest / "kq" / "jobs", args.out, [f"{RECIPE}/{x}" for x in args.parts])
    else:
        ingest(args.sources, args.work)


if __name__ == "__main__":
    main()
