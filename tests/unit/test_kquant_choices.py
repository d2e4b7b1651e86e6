"""K-quants and IQ4_NL as choices of the GGUF grid: device profiles name them, bytes are llama.cpp's, a
matrix takes a 256-block type only when its input dimension is whole 256s (refused by name otherwise),
the search space, the MIP (both formulations), NSGA-II's genome and the fake quantizer know them, and
a space of plain bit-widths (the phone's) is exactly what it was."""
from __future__ import annotations

import copy

import pytest
import torch

from tailor.arch import MATRICES, BaseArch, LayerConfig, SubnetConfig
from tailor.config import ConfigError, DeviceProfile, load_params, parse_params
from tailor.elastic.space import SearchSpace
from tailor.elastic.supernet import arch_of, set_active
from tailor.models.tiny import tiny_model
from tailor.quant import gguf_kquants as kq
from tailor.quant.fake import fake_quant
from tailor.quant.formats import eligible, matrix_bytes, parse_choice, sort_choices
from tailor.search import mip, nsga
from tailor.search.sensitivity import SensTable, ffn_options, reference

SMOL = BaseArch(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152)
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "F16"]
K_CHOICES = sort_choices(parse_choice(t) for t in K_TYPES)


def k_space(arch: BaseArch = SMOL, types=K_TYPES, drop=0.25) -> SearchSpace:
    return SearchSpace.build(arch, [parse_choice(t) for t in types], [4], 0.25, 1, drop,
                             list(range(arch.n_layers - 1, -1, -1)))


# ---- bytes and eligibility ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,per_block,block", [("Q2_K", 84, 256), ("Q3_K", 110, 256), ("Q4_K", 144, 256),
                                                  ("Q5_K", 176, 256), ("Q6_K", 210, 256), ("IQ4_NL", 18, 32)])
def test_bytes_are_llamacpps(name: str, per_block: int, block: int) -> None:
    assert matrix_bytes("gguf", name, 7, 4 * 256) == 7 * (4 * 256 // block) * per_block
    assert matrix_bytes("gguf", 8, 7, 256) == 7 * 8 * 34  # Q8_0 unchanged


def test_an_ineligible_matrix_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Q4_K"):
        matrix_bytes("gguf", "Q4_K", 576, 1152)  # 4.5 super-blocks
    with pytest.raises(ValueError, match="onnx has no type 'Q4_K'"):
        matrix_bytes("onnx", "Q4_K", 576, 1536)
    assert eligible("IQ4_NL", 576) and not eligible("Q2_K", 576) and eligible("Q2_K", 1536)
    cfg = SubnetConfig.uniform(SMOL, 8, embed_bits=4, ffn_frac=0.75)  # ffn 1152
    cfg.validate(SMOL)
    bad = cfg.with_layer(3, bits={**cfg.layers[3].bits, "down": "Q4_K"})
    with pytest.raises(ValueError, match=r"layers\[3\]\.bits\.down=Q4_K: .*whole 256s.*1152 columns"):
        bad.validate(SMOL)
    with pytest.raises(ValueError, match=r"bits\.q=Q4_K"):
        cfg.with_layer(0, bits={**cfg.layers[0].bits, "q": "Q4_K"}).validate(SMOL)
    ok = SubnetConfig.uniform(SMOL, 8, embed_bits=4).with_layer(3, bits={**cfg.layers[3].bits, "down": "Q4_K"})
    ok.validate(SMOL)  # 1536 = 6 x 256
    assert ok.nbytes(SMOL, "gguf") - SubnetConfig.uniform(SMOL, 8, embed_bits=4).nbytes(SMOL, "gguf") == \
        576 * 6 * 144 - 576 * 48 * 34


def test_named_choices_round_trip_and_plain_configs_hash_as_before() -> None:
    cfg = SubnetConfig.uniform(SMOL, 8, embed_bits=4).with_layer(2, bits={**{m: "IQ4_NL" for m in MATRICES},
                                                                        "down": "Q3_K"})
    back = SubnetConfig.from_json(cfg.to_json())
    assert back == cfg and back.hash == cfg.hash and back.layers[2].bits["down"] == "Q3_K"
    assert parse_choice("Q8_0") == 8 and parse_choice("F16") == 16 and parse_choice("q4_k".upper()) == "Q4_K"
    with pytest.raises(ValueError, match="unknown quantization type 'Q9_K'"):
        parse_choice("Q9_K")
    # computed with the code before named types existed (main 76bcfc5): plain configs hash the same
    assert SubnetConfig.uniform(SMOL, 5, embed_bits=4, ffn_frac=0.5).hash == "54d2d6ecb4a8d4c8"


# ---- device profiles --------------------------------------------------------------------------------------

def _raw() -> dict:
    import yaml
    return yaml.safe_load(open("params.yaml"))


def test_profiles_name_types_and_the_phone_is_unchanged() -> None:
    p = load_params("params.yaml")
    assert p.device("phone").choices == (4, 5, 8, 16)
    assert p.supernet_formats() == {"gguf": [4, 5, 8, 16], "onnx": [2, 4, 8, 16]}
    k = DeviceProfile(runtime="llama.cpp", format="gguf", budget_fraction=0.3, bandwidth_gbs=1, compute_tflops=1,
                      allowed_types=K_TYPES, embed_bits=4)
    assert k.choices == ("Q2_K", "Q3_K", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", 8, 16)
    for bad, msg in (({"allowed_types": ["Q4_K", "Q7_K"]}, r"\['Q7_K'\] not types of gguf"),
                     ({"allowed_types": ["Q4_K"], "allowed_bits": [4]}, "exactly one of allowed_bits, allowed_types")):
        raw = _raw()
        raw["devices"]["phone"].pop("allowed_bits")
        raw["devices"]["phone"].update(bad)
        with pytest.raises(ConfigError, match=msg):
            parse_params(raw)
    raw = _raw()
    raw["devices"]["laptop"].pop("allowed_bits")
    raw["devices"]["laptop"]["allowed_types"] = ["Q4_K"]
    with pytest.raises(ConfigError, match="not types of onnx"):
        parse_params(raw)


def test_gumbel_is_refused_for_k_quant_devices_by_name() -> None:
    raw = _raw()
    raw["devices"]["phone"].pop("allowed_bits")
    raw["devices"]["phone"]["allowed_types"] = K_TYPES
    with pytest.raises(ConfigError, match=r"search.strategies: gumbel cannot search devices.phone's"):
        parse_params(raw)
    raw["search"]["strategies"] = ["mip", "nsga"]
    assert parse_params(raw).supernet_formats()["gguf"] == list(K_CHOICES)


# ---- the search space -------------------------------------------------------------------------------------

def test_k_space_offers_each_matrix_what_fits_and_ffn_in_256s() -> None:
    sp = k_space()
    assert sp.ffn_step == 256 and sp.ffn_widths() == [512, 768, 1024, 1280, 1536]
    assert sp.choices_for("down") == K_CHOICES
    for m in ("q", "k", "v", "o", "gate", "up"):  # 576 columns (o: 192 per KV group)
        assert sp.choices_for(m) == ("IQ4_NL", 8, 16)
    assert set(ffn_options(sp)) <= set(sp.ffn_widths())
    gen = torch.Generator().manual_seed(0)
    downs = set()
    for _ in range(30):
        cfg = sp.sample(gen)
        cfg.validate(SMOL)  # every sample eligible
        assert sp.contains(cfg)
        downs |= {lc.bits["down"] for lc in cfg.layers}
    assert {"Q2_K", "Q4_K", "Q6_K"} <= downs
    assert sp.min().layers[0].bits["down"] == "Q2_K" and sp.min().layers[0].bits["q"] == "IQ4_NL"
    sp.min().validate(SMOL)


def test_plain_space_samples_as_before() -> None:
    """Computed with the code before named types (main 76bcfc5): the phone's space is unchanged."""
    sp = SearchSpace.build(SMOL, [4, 5, 8, 16], [4], 0.25, 1, 0.25, list(range(29, -1, -1)))
    g = torch.Generator().manual_seed(7)
    assert [sp.sample(g).hash for _ in range(3)] == ["da48cfe7ce5534af", "62446b2b72c76329", "7811b1362c125e6d"]
    assert (sp.min().hash, sp.max().hash) == ("c58b608fec44793b", "4fc20b9301c4e03d")


# ---- MIP: the per-matrix formulation equals the enumerated one ----------------------------------------------

def _table(sp: SearchSpace, seed: int) -> SensTable:
    """A random but plausible table: cheaper choices cost more KL, dropping a layer costs most."""
    g = torch.Generator().manual_seed(seed)
    ref = reference(sp, 4)
    t = SensTable("gguf", ref, 0.01)
    r = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    for i in range(sp.arch.n_layers):
        for m in MATRICES:
            for b in sp.choices_for(m):
                if b != ref.layers[i].bits[m]:
                    t.bits[f"{i}:{m}:{b}"] = r() * 0.05 / max(1.0, {"Q2_K": 2.6}.get(b, 1.0)) + 0.3 / (
                        2 + (b if isinstance(b, int) else kq.ktype(b).bits_per_weight))
        for kv in range(sp.min_kv, sp.arch.n_kv_heads):
            t.kv[f"{i}:{kv}"] = r() * 0.2
        for w in ffn_options(sp):
            if w != sp.arch.ffn:
                t.ffn[f"{i}:{w}"] = r() * 0.2 * (sp.arch.ffn - w) / sp.arch.ffn
        if i in sp.droppable:
            t.drop[str(i)] = 0.2 + r()
    return t


@pytest.mark.parametrize("frac", [0.18, 0.22, 0.3])
def test_mip_per_matrix_equals_enumerated(frac: float) -> None:
    arch = BaseArch(n_layers=4, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=4096)
    sp = k_space(arch, drop=0.5)
    table = _table(sp, 1)
    budget = int(frac * 2 * SubnetConfig.max(arch).param_count(arch))
    a = mip.solve(table, sp, "gguf", 4, budget, per_matrix=False)
    b = mip.solve(table, sp, "gguf", 4, budget, per_matrix=True)
    assert a is not None and b is not None
    for cfg in (a, b):
        assert cfg.nbytes(arch, "gguf") <= budget and sp.contains(cfg)
    assert table.predict(b) == pytest.approx(table.predict(a), abs=1e-7)
    assert any(lc.keep and isinstance(lc.bits["down"], str) and lc.bits["down"].endswith("_K") for lc in b.layers)
    assert mip.solve(table, sp, "gguf", 4, 1000, per_matrix=True) is None


def test_mip_switches_to_per_matrix_when_variants_explode() -> None:
    big = BaseArch(n_layers=2, hidden=1024, n_heads=8, n_kv_heads=4, head_dim=128, ffn=2048, vocab=1024)
    sp = k_space(big, drop=0.5)
    assert all(len(sp.choices_for(m)) == 8 for m in MATRICES)  # everything fits: 8^4 x 4 + 8^3 x 4 variants
    table = _table(sp, 2)
    assert mip.n_variants(table, sp) > mip.ENUMERATE_MAX
    budget = int(0.2 * 2 * SubnetConfig.max(big).param_count(big))
    cfg = mip.solve(table, sp, "gguf", 4, budget)
    assert cfg is not None and cfg.nbytes(big, "gguf") <= budget and sp.contains(cfg)
    assert any(isinstance(b, str) for lc in cfg.layers for b in lc.bits.values())


def test_nsga_genomes_are_always_eligible() -> None:
    arch = BaseArch(n_layers=3, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=4096)
    sp = k_space(arch, drop=0.34)
    seen = []

    def evaluate(cfg: SubnetConfig):
        cfg.validate(arch)
        seen.append(cfg)
        return 0.0, cfg.nbytes(arch, "gguf"), 0.0

    nsga.run(sp, 4, evaluate, 10**9, 12, seed=0, seeds=[sp.min()])
    assert len(seen) >= 6 and any(isinstance(lc.bits["down"], str) for c in seen for lc in c.layers)  # (others drop too much)


# ---- training: the fake quantizer --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_fake_quant_is_the_k_grid_with_straight_through_gradient(name: str) -> None:
    w = (torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05).requires_grad_(True)
    out = fake_quant(w, name, "gguf")
    assert torch.equal(out.detach(), kq.dequantized(w.detach(), name))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_learned_clipping_of_named_types_is_what_export_packs(name: str) -> None:
    """Each sub-block's range shrinks by gamma; the forward is the grid of the clamped weight (what
    `clipped` bakes and gguf_kpack packs), gamma gets a gradient, and its slot is the type's own."""
    from tailor.quant import gguf_grid
    from tailor.quant.fake import clip_slot, clipped
    from tailor.quant.gguf_kpack import pack
    from gguf import quants

    w = (torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 0.05).requires_grad_(True)
    gamma = torch.tensor(0.8, requires_grad=True)
    out = fake_quant(w, name, "gguf", gamma)
    baked = clipped(w.detach(), gamma.detach(), "gguf", name)
    assert not torch.equal(baked, w.detach())  # the clamp bites
    assert torch.equal(out.detach(), kq.dequantized(baked, name))
    file_values = quants.dequantize(pack(baked, name), kq.ktype(name).qtype).reshape(w.shape)
    assert torch.equal(torch.from_numpy(file_values.copy()), out.detach())
    (out ** 2).sum().backward()
    assert gamma.grad is not None and gamma.grad != 0
    assert clip_slot("gguf", name) == gguf_grid.CLIP_SLOT[name] and clip_slot("gguf", 4) == 4
    slots = [clip_slot("gguf", c) for c in gguf_grid.CHOICES if c != 16]
    assert len(set(slots)) == len(slots) and max(slots) < 9  # one slot each, in the table's nine


def test_supernet_trains_a_k_subnet() -> None:
    model = tiny_model(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                       intermediate_size=512).train()
    arch = arch_of(model)
    sp = SearchSpace.build(arch, ["Q2_K", "Q4_K", "IQ4_NL", 8, 16], [8], 0.25, 1, 0.34, None)
    cfg = sp.sample(torch.Generator().manual_seed(3))
    assert any(isinstance(b, str) for lc in cfg.layers for b in lc.bits.values())
    set_active(model, cfg, "gguf")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.grad is not None and torch.isfinite(loss)
    before = copy.deepcopy(model.model.layers[0].mlp.down_proj.weight)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(before, down.weight)


def test_the_quick_k_profile_puts_the_phone_on_k_quants() -> None:
    p = load_params("params.yaml", "quick-k")
    assert p.device("phone").choices == K_CHOICES and "gumbel" not in p.search.strategies
    assert p.device("laptop") == load_params("params.yaml").device("laptop")
    raw = _raw()
    raw["profiles"]["quick-k"]["devices"]["phone"]["allowed_typs"] = ["Q4_K"]  # a profile's typo is named
    with pytest.raises(ConfigError, match=r"devices.phone.allowed_typs: unknown key"):
        parse_params(raw, "quick-k")
    raw = _raw()
    raw["profiles"]["quick-k"]["devices"]["tablet"] = {"allowed_bits": [4]}  # no new devices through a profile
    with pytest.raises(ConfigError, match=r"profiles.quick-k.devices.tablet: unknown key"):
        parse_params(raw, "quick-k")


def test_plots_take_named_types(tmp_path) -> None:
    from tailor.search import plots

    sp = k_space()
    plots.heatmap_png(sp.sample(torch.Generator().manual_seed(1)), SMOL, tmp_path / "bits.png")
    assert (tmp_path / "bits.png").stat().st_size > 0
