"""Knowledge distillation: the losses, and sequences sampled from the teacher to distil on."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


_compiled = None


def enable_compile() -> None:
    """Fuse the two log-softmaxes and the KL over [tokens, vocab] (memory bound at 49k vocab; CUDA),
    in the plain loss and in each chunk of the chunked one."""
    global _compiled, _kd_chunk_compiled
    if _compiled is None:
        _compiled = torch.compile(_kd_loss)
        _kd_chunk_compiled = torch.compile(_kd_chunk, dynamic=True)


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


class _ChunkedKD(torch.autograd.Function):
    """KL(teacher || student) over the vocabulary, a chunk of tokens at a time, with the head matmul
    inside: the loss and both gradients (hidden states and head weight) are computed in forward, chunk
    by chunk, so fp32 [tokens, vocab] logits never exist for the whole batch. The gradient of the
    T^2-scaled, token-averaged KL with respect to the raw student logits is T (p_s - p_t) / N; backward
    only scales the stored gradients by the incoming one. The same trick as Liger-Kernel's fused
    linear cross-entropy (Hsu et al. 2024), here for a distillation target."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, t_weight, temperature: float, chunk: int):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            h = hidden[i: i + chunk]  # (c, H)
            z_s = F.linear(h, weight)  # (c, V); bf16 under autocast, like the plain head
            z_t = teacher[i: i + chunk] if t_weight is None else F.linear(teacher[i: i + chunk], t_weight)
            kd = _kd_chunk_compiled if _kd_chunk_compiled is not None and z_s.is_cuda else _kd_chunk
            loss, g = kd(z_s, z_t, temperature, n)  # g: d loss / d z_s, (c, V) fp32
            total = total + loss
            g = g.to(z_s.dtype)
            if need_h:
                grad_h[i: i + chunk] = F.linear(g, weight.t().to(g.dtype)).to(hidden.dtype)  # (c, H)
            if need_w:
                grad_w += F.linear(g.t(), h.t().to(g.dtype)).float()  # (V, H)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        gh = saved.pop(0) if need_h else None
        gw = saved.pop(0) if need_w else None
        gh = gh * grad_out.to(gh.dtype) if gh is not None else None
        gw = gw * grad_out if gw is not None else None
        return gh, gw, None, None, None, None


def _kd_chunk(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, n: int):
    """The summed KL of one chunk of logits ((c, V), any float dtype) and its gradient in z_s, fp32."""
    s = F.log_softmax(z_s.float() / temperature, dim=-1)
    t = F.log_softmax(z_t.float() / temperature, dim=-1)
    p_t = t.exp()
    loss = (p_t * (t - s)).sum() * (temperature ** 2 / n)
    return loss, (s.exp() - p_t) * (temperature / n)


_kd_chunk_compiled = None  # set by enable_compile()


def chunked_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor,
                    teacher_weight: torch.Tensor | None = None, temperature: float = 1.0,
                    chunk: int = 4096) -> torch.Tensor:
    """`kd_loss(hidden @ weight.T, teacher logits, T)` without fp32 [tokens, vocab] logits for the batch.

    hidden: (N, H) or (B, T, H) student final hidden states; weight: (V, H) student head (the tied,
    possibly fake-quantized table). teacher: the teacher's logits (N, V) in any float dtype (bf16 keeps
    2 bytes per token and vocabulary entry), or, with `teacher_weight` (V, H_t), the teacher's final
    hidden states (N, H_t), its head applied a chunk at a time. `chunk` tokens are live at once: a few
    fp32 (chunk, V) temporaries whatever the batch (13 GB measured on an H200 for chunks of 4096 tokens of
    a 128k vocabulary, eager, against 22 GB for the plain loss at only 8192 tokens, growing with them)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = teacher.reshape(h.shape[0], -1)
    return _ChunkedKD.apply(h, weight, t, teacher_weight, float(temperature), int(chunk))


class HeadInputs(torch.nn.Module):
    """A Tailor causal LM's forward up to its head: returns (final hidden states (B, T, H), head weight
    (V, H)) — the tied table, fake-quantized once when the head is below 16 bits, as in its forward —
    so that `chunked_kd_loss` applies the head a chunk at a time. A module, so DDP can wrap it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        table, head = m.tables()  # tied: one fake-quantized table; untied: the input table and the head's own
        return m.hidden_states(input_ids, table), (m.lm_head.active_weight() if head is None else head)


@torch.no_grad()
def teacher_logits_chunked(teacher: torch.nn.Module, ids: torch.Tensor, chunk: int = 4096,
                           dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """The teacher's logits of a batch as one (B*T, V) tensor, its head applied `chunk` tokens at a time,
    in `dtype`: by default bf16 on CUDA (2 bytes per token and vocabulary entry, never the fp32
    (B, T, V) that `teacher(ids).logits` is) and float32 on the CPU (which trains in float32)."""
    h, w = HeadInputs(teacher)(ids)
    h = h.reshape(-1, h.shape[-1])
    dtype = dtype or (torch.bfloat16 if h.is_cuda else torch.float32)
    out = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device)
    for i in range(0, h.shape[0], chunk):
        out[i: i + chunk] = F.linear(h[i: i + chunk], w)
    return out


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
                    batch_size: int = 64, temperature: float = 1.0, progress: Callable[[int], None] | None = None,
                    dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """`n` sequences of `seq_len` tokens sampled from the teacher itself ([n, seq_len] int32), for
    distillation on the teacher's own distribution (LLM-QAT's data-free KD, Liu et al. 2023), for when
    the calibration corpora are too narrow (on SmolLM2's three they were not: reports/bench/teacher_samples*.json).
    Each sequence starts at a token drawn from `first_tokens` (the
    corpus's tokens, so starts are real words), then samples at `temperature` (1.0 = the teacher's own
    distribution, what KD matches); an end-of-text token just starts a new document, as in packed data.
    `dtype` (torch.bfloat16 or "bfloat16") runs the sampling copy of the teacher in it, the teacher itself untouched:
    half the KV cache's bytes a step; the probabilities are still taken in float32 from its logits, so the
    samples follow the bf16 teacher, not the float32 one the KD loss then matches (H200 speed: kquant_gpu.py
    gen-speed)."""
    hf = _hf_llama(teacher)
    if dtype is not None:
        hf = hf.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
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
