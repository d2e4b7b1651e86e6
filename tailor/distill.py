"""Knowledge distillation: the losses, and sequences sampled from the teacher to distil on."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


_compiled = None


def enable_compile() -> None:
    """Fuse the two log-softmaxes and the KL over [tokens, vocab] (memory bound at 49k vocab; CUDA)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_kd_loss)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, scaled by T^2 so gradients keep their size across T."""
    if _compiled is not None and student_logits.is_cuda:
        return _compiled(student_logits, teacher_logits, temperature)
    return _kd_loss(student_logits, teacher_logits, temperature)


def _kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """The teacher's logits per batch, kept in bf16: scoring many candidates reuses them."""
    dev = next(teacher.parameters()).device
    return [teacher(seqs[i: i + batch_size].to(dev).long()).logits.to(torch.bfloat16)
            for i in range(0, len(seqs), batch_size)]


@torch.no_grad()
def mean_kl(student: torch.nn.Module, seqs: torch.Tensor, teacher: list[torch.Tensor], batch_size: int = 8) -> float:
    """Mean per-token KL(teacher || student) over `seqs` ([N, T] ids): the search's quality score."""
    total, n = 0.0, 0
    dev = next(student.parameters()).device
    for j, i in enumerate(range(0, len(seqs), batch_size)):
        ids = seqs[i: i + batch_size].to(dev).long()
        kl = kd_loss(student(ids).logits, teacher[j].to(dev))
        total += float(kl) * ids.numel()
        n += ids.numel()
    return total / max(n, 1)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over `seqs`."""
    total, n = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, len(seqs), batch_size):
        ids = seqs[i: i + batch_size].to(dev).long()
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        n += ids[:, 1:].numel()
    return total / max(n, 1)


def _hf_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The dense base as transformers' own Llama (same weight names), for its KV cache: the Tailor
    model recomputes the whole prefix at every generated token."""
    from transformers import AutoModelForCausalLM

    from tailor.models.families import FAMILIES

    c = model.config
    if any(b for b in c.layer_bits) or c.embed_bits < 16 or set(c.layer_ffn) != {c.intermediate_size} \
            or set(c.layer_kv_heads) != {c.num_key_value_heads}:
        raise ValueError("teacher sampling needs the dense 16-bit base model, not a subnet")
    cfg = FAMILIES[getattr(c, "family", "llama")].hf_config(c)  # the family's own transformers class
    p = next(model.parameters())
    hf = AutoModelForCausalLM.from_config(cfg).to(device=p.device, dtype=p.dtype).eval()
    # qclip: the learned clipping factors, unused at 16 bits; a tied head is the embedding
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith(".qclip") and not (k == "lm_head.weight" and c.tie_word_embeddings)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"teacher sampling: weights do not map onto {cfg.model_type} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    hf.tie_weights()
    return hf


@torch.no_grad()
def teacher_samples(teacher: torch.nn.Module, n: int, seq_len: int, first_tokens: torch.Tensor, seed: int,
                    batch_size: int = 64, temperature: float = 1.0, progress: Callable[[int], None] | None = None
                    ) -> torch.Tensor:
    """`n` sequences of `seq_len` tokens sampled from the teacher itself ([n, seq_len] int32), for
    distillation on the teacher's own distribution (LLM-QAT's data-free KD, Liu et al. 2023), for when
    the calibration corpora are too narrow (on SmolLM2's three they were not: reports/bench/teacher_samples*.json).
    Each sequence starts at a token drawn from `first_tokens` (the
    corpus's tokens, so starts are real words), then samples at `temperature` (1.0 = the teacher's own
    distribution, what KD matches); an end-of-text token just starts a new document, as in packed data."""
    hf = _hf_llama(teacher)
    dev = next(hf.parameters()).device
    # drawn where the logits are: moving [batch, 49152] probabilities to the host each token cost more than
    # the forward on a GPU. So the samples are seeded per device type, not the same on CPU and CUDA.
    g = torch.Generator(device=dev).manual_seed(seed)
    first_tokens = first_tokens.to(dev)
    out = torch.empty(n, seq_len, dtype=torch.int32)
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        ids = first_tokens[torch.randint(len(first_tokens), (b, 1), generator=g, device=dev)].long()
        seq, past = [ids], None
        for _ in range(seq_len - 1):
            o = hf(input_ids=ids, past_key_values=past, use_cache=True)
            past = o.past_key_values
            ids = torch.multinomial(torch.softmax(o.logits[:, -1].float() / temperature, dim=-1), 1, generator=g)
            seq.append(ids)
        out[i: i + b] = torch.cat(seq, dim=1).cpu().to(torch.int32)
        if progress:
            progress(b)
    return out
