"""export (per device): write the file the device's runtime loads (GGUF for llama.cpp, ONNX for
onnxruntime) from the learned quantized values, load it in that runtime, and check parity with the
fake-quantized PyTorch model that evaluate measured."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from steps._common import artifact_dir, base_model_tags, main_for, read_jsonl, report_dir, staged_dir, write_json
from tailor import tracking
from tailor.config import ConfigError, Params
from tailor.arch import BaseArch
from tailor.devices import budget_bytes
from tailor.elastic.supernet import subnet_of
from tailor.eval.ppl import perplexity
from tailor.export import runtime_threads
from tailor.export.gguf_vocab import tokenizer_gguf
from tailor.formats import backend
from tailor.models.base import base_dir, load_model_dir, load_tokenizer
from tailor.train import pick_device

MAX_FILE_REL_DIFF = 0.01  # the file's size against the cost model's prediction


class ParityError(ValueError):
    """The runtime does not compute what the evaluated model computed."""


def ppl_parity(name: str, runtime_ppl: float, torch_ppl: float, bound: float) -> float:
    """|runtime - PyTorch| / PyTorch perplexity, or ParityError when above `bound` or not finite.
    Written as `not rel <= bound`: with NaN (a file holding inf) `rel > bound` is False and would pass."""
    if not (math.isfinite(runtime_ppl) and math.isfinite(torch_ppl) and torch_ppl > 0):
        raise ParityError(f"{name}: perplexity is not finite (runtime {runtime_ppl}, PyTorch {torch_ppl})")
    rel = abs(runtime_ppl - torch_ppl) / torch_ppl
    if not rel <= bound:
        raise ParityError(f"{name}: runtime perplexity {runtime_ppl:.3f} differs from PyTorch {torch_ppl:.3f} "
                          f"by {rel:.2%} (> export.max_ppl_rel_diff {bound:.0%})")
    return rel


def run(params: Params, device: str, model_dir: Path, eval_dir: Path, out_dir: Path) -> dict:
    ex, prof = params.export, params.device(device)
    be = backend(prof.format)  # the format's writer, runtime runner and artifact files
    writer, runtime, name = be.writer, be.runner, be.file_name
    model = load_model_dir(model_dir)
    tok = load_tokenizer(model_dir, model)  # refuses a tokenizer of another model
    cfg = subnet_of(model)
    if cfg is None:
        raise ConfigError(f"{model_dir}: not an extracted subnet (config.json has no `subnet`)")
    texts = [r["text"] for r in read_jsonl(eval_dir / "wiki.jsonl")][: ex.ppl_docs]
    seqs = [ids for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]

    # The extracted model's config keeps the base dims; only its layer count is the kept one.
    arch = replace(BaseArch.from_hf(model.config), n_layers=len(cfg.layers))
    predicted = cfg.nbytes(arch, prof.format)
    phases, clock = {}, [time.perf_counter()]

    def phase(name: str) -> None:  # seconds since the previous phase ended (metrics `phase_seconds`)
        now = time.perf_counter()
        phases[name], clock[0] = round(now - clock[0], 2), now

    with staged_dir(out_dir) as tmp:
        # GGUF carries the model's own tokenizer (written once with the base; refused there by name if
        # llama.cpp cannot reproduce it)
        template = tokenizer_gguf(base_dir(params.model.source)) if be.needs_tokenizer_file else None
        kwargs = {"template": template} if template else {}
        info = writer.export(model, tok, tmp / name, **kwargs)
        phase("write")
        if info["weight_bytes"] != predicted:  # the search's bytes are the file's, exactly
            raise ParityError(f"{name}: {info['weight_bytes']:,} weight bytes written, the cost model said "
                              f"{predicted:,} for subnet {cfg.hash}")
        budget = budget_bytes(prof, replace(arch, n_layers=len(cfg.layers)))
        if predicted > budget:
            raise ParityError(f"{name}: {predicted:,} B exceeds devices.{device}'s budget of {budget:,} B")
        # the whole file: tensor bytes + the container. GGUF's is laid out from the config (header,
        # tokenizer, tensor index, padding) and must match; ONNX's graph is not modelled (reported only:
        # 0.2% of the quick profile's laptop file)
        modelled = hasattr(writer, "predicted_file_bytes")
        predicted_file = (writer.predicted_file_bytes(cfg, arch, template, rope_scaled=bool(model.config.rope_freq_scaling))
                          if modelled else predicted)
        file_rel = (info["file_bytes"] - predicted_file) / predicted_file
        if modelled and not abs(file_rel) <= MAX_FILE_REL_DIFF:
            raise ParityError(f"{name}: {info['file_bytes']:,} B written, the cost model predicted {predicted_file:,} B "
                              f"({file_rel:+.2%}, more than {MAX_FILE_REL_DIFF:.0%})")
        phase("check_size")
        runtime_ppl = runtime.perplexity(tmp / name, seqs)
        phase("runtime_ppl")
        # the PyTorch side on the accelerator when there is one: the phone's model emulates llama.cpp's kernels
        # (activations rounded to Q8_K, weights decoded every matmul), 202 s for 500 documents on 4 of the H200
        # machine's cores (session 20) against seconds on the GPU; the file's side stays on the runtime's CPU
        dev = pick_device("auto")
        model.to(dev)
        torch_ppl = perplexity(model, seqs, dev)
        phase("torch_ppl")
        rel = ppl_parity(name, runtime_ppl, torch_ppl, ex.max_ppl_rel_diff)
        gen_runtime = runtime.generate(tmp / name, tok, ex.prompt, ex.gen_tokens)
        phase("generate")
        tps = runtime.tokens_per_s(tmp / name, tok)
        phase("tokens_per_s")
        (tmp / "subnet.json").write_text(cfg.to_json())
    metrics = {"budget_bytes": budget, "runtime_ppl": runtime_ppl, "torch_ppl": torch_ppl, "fakequant_ppl": torch_ppl, "ppl_rel_diff": rel,
               "file_bytes": info["file_bytes"], "weight_bytes": info["weight_bytes"], "predicted_bytes": predicted,
               "predicted_file_bytes": predicted_file, "file_bytes_rel_diff": file_rel,
               "sha256": info["sha256"], "tokens_per_s": tps, "runtime_ppl_seconds": phases["runtime_ppl"],
               "format": prof.format, "runtime": prof.runtime, "n_seqs": len(seqs)}
    generation = {"prompt": ex.prompt, "runtime": gen_runtime,
                  "torch": _torch_generate(model, tok, ex.prompt, ex.gen_tokens)}
    phase("torch_generate")
    # torch's intra-op threads beside the phases: session 19's H200 run exported under Dask's one-thread pin;
    # the runtime's threads (its perplexity and tokens_per_s ran on them): session 21's took all 16 cores
    metrics.update(phase_seconds=phases, torch_threads=torch.get_num_threads(), torch_device=str(dev),
                   runtime_threads=runtime_threads())
    return {"metrics": metrics, "generation": generation, "file": out_dir / name, "files": be.files(out_dir)}


def _torch_generate(model, tok, prompt: str, n: int) -> str:
    """Greedy continuation, stopping at EOS like the runtimes' generate."""
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax().view(1, 1)
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt], dim=1)
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def main() -> None:
    def stage(params: Params, device: str | None) -> None:
        with tracking.stage_run("export", device, params=params.export.model_dump(), tags=base_model_tags()) as tr:
            out = run(params, device, artifact_dir("finetune", device), artifact_dir("calibrate") / "eval",
                      artifact_dir("export", device))
            rep = report_dir("export", device)
            write_json(rep / "metrics.json", out["metrics"])
            write_json(rep / "generation.json", out["generation"])
            tr.log_metrics(out["metrics"])
            tr.set_tags({"sha256": out["metrics"]["sha256"]})

    main_for("export", stage, per_device=True)


if __name__ == "__main__":
    main()
