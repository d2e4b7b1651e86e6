"""The scale benchmark's FLOP count (what its MFU divides) is what torch executes: its matmul part
equals torch.utils.flop_counter's count of one chunked-KD student pass, forward and backward."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.supernet_scale import config, layer_flops, spaces_for
from tailor.distill import HeadInputs, chunked_kd_loss, teacher_logits_chunked
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.model import TailorForCausalLM


def test_counted_matmul_flops_equal_flop_counter():
    torch.manual_seed(0)
    cfg = config("tiny")
    student, teacher = TailorForCausalLM(cfg), TailorForCausalLM(cfg).requires_grad_(False)
    student.get_input_embeddings().weight.requires_grad_(False)  # as train_kd: the table is frozen
    student.lm_head.qclip.requires_grad_(False)
    arch = arch_of(student)
    sub = spaces_for(arch)["gguf"].sample(torch.Generator().manual_seed(3))
    set_active(student, sub, "gguf")
    b, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (b, seq))
    t_logits = teacher_logits_chunked(teacher, ids, 48)
    with FlopCounterMode(display=False) as fc:
        chunked_kd_loss(*HeadInputs(student)(ids), t_logits, chunk=48).backward()
    tokens = b * seq
    # the formula without attention (the CPU's SDPA is not counted by FlopCounterMode)
    body = sum(layer_flops(arch, lc, tokens, seq) - 2.0 * tokens * seq * lc.kv_groups * arch.q_per_kv * arch.head_dim
               for lc in sub.layers if lc.keep)
    assert fc.get_total_flops() == 3 * body + 2 * (2 * tokens * arch.hidden * arch.vocab)
