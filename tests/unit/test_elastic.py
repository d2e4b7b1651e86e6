"""Supernet invariants: max config = dense model, export_active = set_active, permutation keeps the
function, sampled configs are valid and reproducible."""

import pytest
import torch

from tailor.arch import SubnetConfig
from tailor.elastic import importance
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, export_active, set_active, set_max, subnet_of
from tailor.models.model import QLinear, set_runtime_emulation
from tailor.models.tiny import tiny_model

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def _space(model, bits=(4, 8, 16), fmt_bits=(8, 16)):
    return SearchSpace.build(arch_of(model), list(bits), list(fmt_bits), 0.25, 1, 0.34, None)


@pytest.mark.parametrize("back_to_max", ["set_active", "set_max"])
@torch.no_grad()
def test_max_config_equals_dense_after_a_smaller_subnet_was_active(back_to_max):
    """The invariant is about restoring: a fresh model is at max already, so comparing it with itself
    proves nothing. Here the smallest subnet (layers, KV groups and FFN channels dropped, low bits) runs
    first; going back to max must give the dense model's logits exactly."""
    model = tiny_model(n_layers=4)
    dense = model(IDS).logits
    small = _space(model).min()
    assert any(not lc.keep for lc in small.layers) and any(lc.keep and lc.kv_groups < arch_of(model).n_kv_heads
                                                          for lc in small.layers)
    set_active(model, small)
    assert not torch.allclose(model(IDS).logits, dense)  # the subnet really computed something else
    if back_to_max == "set_max":
        set_max(model)
    else:
        set_active(model, SubnetConfig.max(arch_of(model)))
    torch.testing.assert_close(model(IDS).logits, dense, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@torch.no_grad()
def test_export_active_equals_set_active_for_random_configs(fmt):
    model = tiny_model(n_layers=4)
    for mod in model.modules():  # learned clipping away from 1, so baking it into the export is exercised
        if isinstance(mod, QLinear) and mod is not model.lm_head:
            mod.qclip.uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(1))
    space = _space(model, bits=(4, 8, 16) if fmt == "gguf" else (2, 4, 8, 16))
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        cfg = space.sample(gen)
        set_active(model, cfg, fmt)
        expected = model(IDS).logits
        small = export_active(model, cfg, fmt)
        assert small.config.runtime_emulation == (fmt == "gguf")
        emulated = small(IDS).logits  # llama.cpp's activation rounding: close, not equal
        set_runtime_emulation(small, False)
        # Equal up to float16 rounding of the 16-bit matrices (the files store F16; the supernet keeps fp32).
        torch.testing.assert_close(small(IDS).logits, expected, rtol=1e-3, atol=1e-3)
        assert (emulated - expected).abs().max() < 0.05 * expected.abs().max()
        assert subnet_of(small) == cfg
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) or cfg == space.max()
    set_max(model)


def test_sampled_configs_are_valid_and_reproducible():
    model = tiny_model(n_layers=6)
    space = _space(model)
    a = [space.sample(torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [space.sample(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert [c.hash for c in a] == [c.hash for c in b]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert space.contains(space.sample(gen))
    assert space.contains(space.min()) and space.contains(space.max())


@torch.no_grad()
def test_importance_permutation_keeps_outputs():
    model = tiny_model(n_layers=3)
    before = model(IDS).logits
    imp = importance.measure(model, [IDS])
    importance.permute_(model, imp)
    torch.testing.assert_close(model(IDS).logits, before, rtol=1e-4, atol=1e-5)
    for i in range(3):  # prefixes now hold the most important channels
        assert torch.all(imp.ffn[i][:-1] >= imp.ffn[i][1:])
        assert torch.all(imp.kv[i][:-1] >= imp.kv[i][1:])
    assert sorted(imp.drop_order()) == [0, 1, 2]


@torch.no_grad()
def test_a_block_that_barely_changes_its_input_is_dropped_first():
    """ShortGPT's rule: the last block, scaled to add almost nothing to the residual stream, is the least
    important; the order covers every layer once, least important first."""
    model = tiny_model(n_layers=4)
    for lin in (model.model.layers[3].self_attn.o_proj, model.model.layers[3].mlp.down_proj):
        lin.weight.mul_(1e-3)
    imp = importance.measure(model, [IDS])
    order = imp.drop_order()
    assert order[0] == 3 and sorted(order) == [0, 1, 2, 3]
    assert [imp.block[i] for i in order] == sorted(imp.block)


def test_min_subnet_is_smaller_than_max():
    model = tiny_model(n_layers=6)
    space = _space(model)
    arch = arch_of(model)
    assert space.min().nbytes(arch, "gguf") < space.max().nbytes(arch, "gguf")
    assert len(space.min().kept) == 6 - space.max_drop


def test_sandwich_covers_every_format_and_is_rank_consistent():
    from tailor.elastic.space import sandwich_configs

    model = tiny_model(n_layers=4)
    arch = arch_of(model)
    spaces = {"gguf": SearchSpace.build(arch, [4, 5, 8, 16], [8, 16], 0.25, 1, 0.25, None),
              "onnx": SearchSpace.build(arch, [2, 4, 8, 16], [8, 16], 0.25, 1, 0.25, None)}
    a = [sandwich_configs(spaces, s, 2, torch.Generator().manual_seed(0)) for s in range(4)]
    b = [sandwich_configs(spaces, s, 2, torch.Generator().manual_seed(0)) for s in range(4)]
    assert [[c.hash for c, _ in step] for step in a] == [[c.hash for c, _ in step] for step in b]
    for s, step in enumerate(a):
        assert step[0][0] == spaces["gguf"].max()  # max first, 16-bit
        assert step[1] == (spaces[["gguf", "onnx"][s % 2]].min(), ["gguf", "onnx"][s % 2])  # mins take turns
        assert all(spaces[f].contains(c) for c, f in step)
    assert {f for step in a for _, f in step[2:]} == {"gguf", "onnx"}


def test_bake_clip_keeps_outputs_and_bakes_a_trained_embedding_clip():
    """Fine-tuning with train_embeddings moves the tied table's clip; bake_clip_ must write it into the
    table (export packs the raw weights) without changing what the model computes."""
    from tailor.elastic.supernet import bake_clip_
    from tailor.quant.fake import FMT_INDEX

    model = tiny_model(seed=3, embed_bits=4)
    head = model.lm_head
    assert head.bits == 4 and head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        head.qclip[FMT_INDEX[head.fmt], head.bits] = 0.7  # as training the embedding would move it
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        bake_clip_(model)
        after = model(ids).logits
    assert float(head.qclip.min()) == 1.0  # nothing left for export to drop
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,amp", [("gguf", False), ("onnx", False), ("gguf", True)])
def test_grouped_quantization_trains_the_same_subnet(fmt, amp, monkeypatch):
    """A training forward with the layers' weights quantized in one call per grid (`grouped_quant`, the
    default on CUDA) computes the per-matrix forward's logits and weight gradients bit for bit (clips up
    to summation order), in a subnet that mixes bit-widths, slices and a dropped layer, also under bf16
    autocast (there the group is cast once); the stacked weights do not outlive the forward."""
    import contextlib

    from tailor.quant import fake

    gen = torch.Generator().manual_seed(5)
    space = _space(tiny_model(n_layers=4), bits=(2, 4, 8, 16) if fmt == "onnx" else (4, 5, 8, 16))
    cfg = space.sample(gen)
    while len({b for lc in cfg.layers if lc.keep for b in lc.bits.values()} - {16}) < 2 or all(lc.keep for lc in cfg.layers):
        cfg = space.sample(gen)
    calls = []
    real = fake.fake_quant_group
    monkeypatch.setattr("tailor.models.model.fake_quant_group", lambda *a, **k: calls.append(a[1]) or real(*a, **k))

    def run(grouped):
        model = tiny_model(n_layers=4)
        model.grouped_quant = grouped
        set_active(model, cfg, fmt)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            logits = model(IDS).logits
        logits.square().mean().backward()
        assert all(q._pre is None for q in model.modules() if isinstance(q, QLinear))
        return logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (ref, ref_g), (got, got_g) = run(False), run(True)
    assert sorted(map(str, calls)) == sorted({str(b) for lc in cfg.layers if lc.keep for b in lc.bits.values()} - {"16"})
    assert torch.equal(got, ref)
    assert ref_g.keys() == got_g.keys()
    for n in ref_g:
        if n.endswith("qclip"):
            torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(got_g[n], ref_g[n]), n
    calls.clear()
    run(None)  # the default on a CPU: each matrix alone (stacking leaves the caches there)
    assert calls == []


def test_grouped_quantization_steps_aside_under_activation_checkpointing():
    """Checkpointing recomputes a block in backward and checks that it saves what the forward saved; the
    recompute quantizes per matrix, so the forward must too: with `grouped_quant` on and checkpointing,
    training runs and equals the per-matrix model exactly."""
    gen = torch.Generator().manual_seed(3)
    cfg = _space(tiny_model(n_layers=4)).sample(gen)

    def run(grouped):
        model = tiny_model(n_layers=4)
        model.grouped_quant, model.activation_checkpointing = grouped, True
        set_active(model, cfg, "gguf")
        model.train()
        logits = model(IDS).logits
        logits.square().mean().backward()
        return logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (ref, ref_g), (got, got_g) = run(False), run(True)
    assert torch.equal(got, ref) and all(torch.equal(got_g[n], ref_g[n]) for n in ref_g)
