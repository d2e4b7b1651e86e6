"""Knowledge-distillation losses."""
from __future__ import annotations

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
