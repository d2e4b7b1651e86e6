"""Does distilling on the teacher's own samples keep what the corpora do not cover? A CPU-sized check.

The seed table's ≤4.0 Tailor file loses 5% of PIQA after the full fine-tune, while uniform QAT+KD (no
structure cut) keeps all of it: the repaired FFN/KV cut learns the three calibration corpora (BoolQ
passages, BOLD Wikipedia sentences, Shakespeare) and nothing else. `finetune.generated_seqs` adds
sequences sampled from the base model. This script fine-tunes the same subnet twice, side by side in one
process at equal steps and tokens — on the corpus shard alone, and on half corpus, half teacher samples —
and measures KL(base || student) where the knowledge is: on PIQA's texts (goal + correct solution,
out of domain), on the calibrate stage's validation sequences (in domain), and on fresh teacher samples.
KL is continuous and paired, so it sees at small scale what 1500 PIQA items see only at full scale.

    python benchmarks/teacher_samples.py --work DIR --row tailor_4.0 --steps 40

Writes reports/bench/teacher_samples.json. It needs the CPU seed table's workspace (seed_table.py --work):
the quick supernet, a row's search config, and the full profile's calibrate output (seed_table_gpu.py prepare).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def packed(texts: list[str], tok, seq_len: int, n: int):
    """Texts joined by end-of-text and cut into `n` rows of `seq_len` tokens (as the calibrate shards are)."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * seq_len:
            break
    return torch.tensor(ids[: n * seq_len]).reshape(-1, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "seedtable"),
                    help="the CPU seed table's workspace (seed_table.py --work)")
    ap.add_argument("--row", default="tailor_4.0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="teacher samples, data order and training")
    ap.add_argument("--out", default=str(ROOT / "reports/bench/teacher_samples.json"))
    a = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from steps._common import read_jsonl, write_json
    from tailor.arch import SubnetConfig
    from tailor.distill import mean_kl, teacher_logits, teacher_samples
    from tailor.elastic.supernet import export_active
    from tailor.models.base import load_base, load_model_dir
    from tailor.train import TrainSpec, train_kd

    work = Path(a.work)
    torch.manual_seed(a.seed)
    base, tok = load_base(None)
    base.requires_grad_(False)
    cfg = SubnetConfig.from_json((work / "rows" / a.row / "search" / "config.json").read_text())
    supernet = load_model_dir(work / "supernet" / "model")
    shard = load_file(str(work / "calibrate_full" / "train.safetensors"))["input_ids"]
    corpus = shard.reshape(-1, a.seq_len)  # 512-token rows cut into seq_len pieces
    n_train = a.steps * a.batch  # every row seen once: the mix, not the epochs, is what differs
    t0 = time.perf_counter()
    gen = teacher_samples(base, n_train // 2 + a.eval_seqs, a.seq_len, corpus[:, 0].unique(), seed=a.seed, batch_size=64)
    gen_s = time.perf_counter() - t0
    gen_train, gen_eval = gen[: n_train // 2], gen[n_train // 2:]
    val = load_file(str(work / "calibrate_full" / "val.safetensors"))["input_ids"].reshape(-1, a.seq_len)[: a.eval_seqs]
    piqa = packed([f"{r['goal']} {r['sol1'] if r['label'] == 0 else r['sol2']}"
                   for r in read_jsonl(work / "calibrate_full" / "eval" / "piqa.jsonl")], tok, a.seq_len, a.eval_seqs)
    sets = {"piqa_texts": piqa, "validation": val, "teacher_samples": gen_eval}
    teacher = {k: teacher_logits(base, v) for k, v in sets.items()}
    perm = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(a.seed + 1))
    arms = {"corpus": corpus[perm[:n_train]],
            "corpus+teacher": torch.cat([corpus[perm[: n_train - len(gen_train)]], gen_train.to(corpus.dtype)])}
    rows = {}
    student0 = export_active(supernet, cfg, "gguf")
    rows["before"] = {k: mean_kl(student0, v, teacher[k]) for k, v in sets.items()}
    for name, data in arms.items():
        student = export_active(supernet, cfg, "gguf")
        spec = TrainSpec(a.steps, a.batch, a.lr, 1.0, a.seed, ckpt_every=10**9, schedule="cosine",
                         warmup_steps=max(1, a.steps // 20))
        res = train_kd(student, base, data, spec, lambda step, g: [lambda: None], None, desc=name)
        rows[name] = {k: mean_kl(student, v, teacher[k]) for k, v in sets.items()} | {"train_s": round(res.seconds, 1)}
        print(name, rows[name], flush=True)
    out = {"what": __doc__.split("\n")[0], "row": a.row, "seed": a.seed, "subnet_hash": cfg.hash,
           "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores (shared), torch {torch.__version__}",
           "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "tokens_per_arm": n_train * a.seq_len,
           "lr": a.lr, "schedule": "cosine", "teacher_samples_train": len(gen_train), "sampling_s": round(gen_s, 1),
           "eval_seqs": a.eval_seqs, "kl": rows,
           "note": "KL(base || student) per token, mean over the set; lower is better. Same subnet, init, steps, "
                   "tokens and lr in both arms; they differ only in what half the rows are."}
    write_json(Path(a.out), out)
    print(json.dumps(out["kl"], indent=1))


if __name__ == "__main__":
    main()
