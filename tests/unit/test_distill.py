"""Teacher sampling: transformers' Llama with a KV cache is the same model as ours, and the samples are
seeded, shaped and cached for a resumed fine-tune."""

import pytest
import torch

from tailor.distill import _hf_llama, teacher_samples
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, export_active
from tailor.models.tiny import tiny_model


def llama_shaped(seed: int, n_layers: int):
    """transformers' LlamaConfig wants heads x head_dim = hidden, which the default tiny model is not."""
    return tiny_model(seed=seed, n_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_llama_view_of_the_base_gives_the_same_logits():
    model = llama_shaped(3, 3)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    hf = _hf_llama(model)
    torch.testing.assert_close(hf(input_ids=ids).logits.float(), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_kv_cached_sampling_follows_the_full_recompute():
    """Greedy decoding (temperature -> 0) through the KV cache picks what the full forward's argmax picks."""
    model = llama_shaped(4, 2)
    first = torch.tensor([5, 17, 42])
    out = teacher_samples(model, 3, 8, first, seed=0, batch_size=3, temperature=1e-4)
    for row in out.long():
        logits = model(row[None, :-1]).logits[0]
        assert torch.equal(logits.argmax(-1), row[1:])


def test_samples_are_seeded_shaped_and_start_on_corpus_tokens():
    model = llama_shaped(5, 2)
    first = torch.tensor([7, 9, 11])
    a = teacher_samples(model, 5, 6, first, seed=1, batch_size=2)
    b = teacher_samples(model, 5, 6, first, seed=1, batch_size=2)
    c = teacher_samples(model, 5, 6, first, seed=2, batch_size=2)
    assert a.shape == (5, 6) and a.dtype == torch.int32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 0].tolist()) <= {7, 9, 11}


def test_sampling_in_bf16_leaves_the_teacher_as_it_was_and_stays_seeded(monkeypatch):
    from tailor import distill

    seen = set()

    def watched(m):  # the sampling copy, its forward's weight dtype recorded
        hf = _hf_llama(m)
        hf.register_forward_pre_hook(lambda mod, args: seen.add(next(mod.parameters()).dtype))
        return hf

    monkeypatch.setattr(distill, "_hf_llama", watched)
    model = llama_shaped(8, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = torch.tensor([3, 4, 5])
    a = teacher_samples(model, 4, 6, first, seed=3, batch_size=2, dtype=torch.bfloat16)
    b = teacher_samples(model, 4, 6, first, seed=3, batch_size=2, dtype=torch.bfloat16)
    assert a.shape == (4, 6) and a.dtype == torch.int32 and torch.equal(a, b)
    assert seen == {torch.bfloat16}
    assert int(a.max()) < 320 and set(a[:, 0].tolist()) <= {3, 4, 5}
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    greedy = teacher_samples(model, 2, 6, first, seed=0, batch_size=2, temperature=1e-4, dtype=torch.bfloat16)
    for row in greedy.long():  # what the bf16 copy of the teacher itself would pick
        logits = _hf_llama(model).to(torch.bfloat16)(input_ids=row[None, :-1]).logits[0]
        assert torch.equal(logits.float().argmax(-1), row[1:])


def test_a_subnet_cannot_be_the_sampling_teacher():
    model = tiny_model(seed=6, n_layers=2)
    space = SearchSpace.build(arch_of(model), [4, 8, 16], [8, 16], 0.25, 1, 0.25, None)
    with pytest.raises(ValueError, match="dense 16-bit base"):
        _hf_llama(export_active(model, space.min(), "gguf"))


def test_finetune_reuses_the_samples_it_cached(tmp_path, monkeypatch):
    from steps import finetune
    from tailor.config import FinetuneParams

    model = llama_shaped(7, 2)
    train = torch.randint(0, 320, (4, 6), dtype=torch.int32)
    ft = FinetuneParams(generated_seqs=3, generate_batch=2)
    first = finetune.generated(model, train, ft, tmp_path)
    assert first.shape == (3, 6)
    monkeypatch.setattr(finetune, "teacher_samples", lambda *a, **k: pytest.fail("sampled again"))
    assert torch.equal(finetune.generated(model, train, ft, tmp_path), first)
