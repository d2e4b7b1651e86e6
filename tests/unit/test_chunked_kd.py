"""The chunked KD loss is the plain KD loss, value and gradients, without whole-batch fp32 logits; the
end-to-end trainer with it and activation checkpointing follows the plain trainer."""

import pytest
import torch

from tailor.distill import HeadInputs, chunked_kd_loss, kd_loss, teacher_logits_chunked
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.train import TrainSpec, train_kd


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_chunked_loss_equals_plain_loss_and_gradients(temperature, teacher_as):
    g = torch.Generator().manual_seed(0)
    n, h, v = 14, 16, 50  # 14 tokens in chunks of 5: the last chunk is short
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g)
    t_logits = t_hidden @ t_weight.T

    plain = kd_loss(hidden @ weight.T, t_logits, temperature)
    gh, gw = torch.autograd.grad(2.5 * plain, (hidden, weight))
    teacher = (t_logits, None) if teacher_as == "logits" else (t_hidden, t_weight)
    chunked = chunked_kd_loss(hidden, weight, teacher[0], teacher[1], temperature=temperature, chunk=5)
    ch, cw = torch.autograd.grad(2.5 * chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ch, gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-5)


def test_through_the_model_with_a_quantized_trained_table():
    """(B, T, H) hidden states, the tied table fake-quantized (8 bits) and trained: every parameter's
    gradient matches the plain loss over the model's logits."""
    student, teacher = tiny_model(seed=1, n_layers=2), tiny_model(seed=2, n_layers=2)
    set_active(student, SearchSpace.build(arch_of(student), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None).min())
    ids = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_logits = teacher(ids).logits
    params = [p for p in student.parameters()]
    plain = torch.autograd.grad(kd_loss(student(ids).logits, t_logits), params, allow_unused=True)
    t_chunked = teacher_logits_chunked(teacher, ids, chunk=4)
    torch.testing.assert_close(t_chunked, t_logits.reshape(21, 320))
    assert teacher_logits_chunked(teacher, ids, chunk=4, dtype=torch.bfloat16).dtype == torch.bfloat16
    chunked = torch.autograd.grad(chunked_kd_loss(*HeadInputs(student)(ids), t_logits, chunk=4), params, allow_unused=True)
    assert plain[0] is not None  # the table itself learns here
    for (name, _), a, b in zip(student.named_parameters(), plain, chunked):
        if a is None:
            assert b is None or not b.abs().max(), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def _saved_bytes_and_grads(model, ids):
    """Bytes autograd keeps for backward (weights excluded) and the parameters' gradients."""
    params = {p.data_ptr() for p in model.parameters()}
    kept = []

    def pack(t):
        if t.data_ptr() not in params:
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).logits.square().mean()
    return sum(kept), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_activation_checkpointing_keeps_gradients_and_saves_less():
    model = tiny_model(seed=1, n_layers=3).train()
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    full, ref = _saved_bytes_and_grads(model, ids)
    model.activation_checkpointing = True
    lean, got = _saved_bytes_and_grads(model, ids)
    assert lean < 0.5 * full  # only each block's input is kept
    for a, b in zip(ref, got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _train(**over):
    student, teacher = tiny_model(seed=1, n_layers=3), tiny_model(seed=2, n_layers=3)
    space = SearchSpace.build(arch_of(student), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None)

    seen = []

    def sandwich(step, gen):
        seen.append(student.activation_checkpointing)
        return [lambda c=c: set_active(student, c, "gguf") for c in (space.max(), space.min(), space.sample(gen))]

    data = torch.randint(0, 320, (8, 10), generator=torch.Generator().manual_seed(0))
    spec = TrainSpec(steps=3, batch_size=4, lr=1e-3, temperature=1.0, seed=0, **over)
    res = train_kd(student, teacher, data, spec, sandwich)
    assert seen == [spec.checkpointing] * 3  # the switch is on while training
    return student, res


def test_trainer_with_chunked_loss_and_checkpointing_follows_the_plain_trainer():
    plain, res_plain = _train()
    lean, res_lean = _train(kd_chunk=7, checkpointing=True)
    assert [p["loss"] for p in res_lean.curve] == pytest.approx([p["loss"] for p in res_plain.curve], rel=1e-5)
    assert not lean.activation_checkpointing  # switched off again for inference
