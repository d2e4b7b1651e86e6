"""SearchSpace's fixed subnets and membership, worked out by hand from the definitions in its docstrings:
the middle subnet the supernet report watches (middle choice per matrix, half-way FFN width and KV
groups, half the droppable layers dropped), the same on a K-quant space (FFN widths in steps of 256,
`ffn_down` keeping its K-quants, a half-way width snapped to the nearest offered one), and `contains`
refusing each way a subnet can leave the space."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tailor.arch import MATRICES, BaseArch, SubnetConfig
from tailor.elastic.space import SearchSpace

ARCH = BaseArch(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152)


def _space(bits, min_ffn_frac=0.25, embed=(4, 8)) -> SearchSpace:
    # 6 of 30 layers may go (0.2), the last layers least important
    return SearchSpace.build(ARCH, list(bits), list(embed), min_ffn_frac, 1, 0.2, list(range(29, -1, -1)))


def test_middle_of_a_bit_width_space() -> None:
    mid = _space([16, 4, 8, 5]).middle()
    # choices sorted 4, 5, 8, 16 -> the middle one is 8; FFN (1536 + 384) / 2 = 960; KV (3 + 1 + 1) // 2 = 2;
    # half of the 6 droppable: the 3 least important layers (29, 28, 27); embedding: the wider option
    assert mid.embed_bits == 8
    assert [i for i, lc in enumerate(mid.layers) if not lc.keep] == [27, 28, 29]
    assert {(lc.kv_groups, lc.ffn) for lc in mid.layers} == {(2, 960)}
    assert all(lc.bits == {m: 8 for m in MATRICES} for lc in mid.layers)


def test_middle_of_a_k_quant_space() -> None:
    space = _space(["Q2_K", 4, "Q4_K", 8, 16])
    assert space.min_ffn == 512 and space.ffn_widths() == [512, 768, 1024, 1280, 1536]
    mid = space.middle()
    # 576-wide inputs take (4, 8, 16): middle 8; ffn_down (whole 256s at every width) takes all five: Q4_K
    want = {m: 8 for m in MATRICES} | {"down": "Q4_K"}
    assert all(lc.bits == want for lc in mid.layers)
    assert {lc.ffn for lc in mid.layers} == {1024}  # (1536 + 512) / 2


def test_middle_width_snaps_to_the_nearest_offered_one_the_narrower_on_a_tie() -> None:
    space = _space(["Q4_K", 8, 16], min_ffn_frac=0.5)  # widths 768, 1024, 1280, 1536
    assert space.ffn_widths() == [768, 1024, 1280, 1536]
    # half-way is 1152: 128 from 1024 and from 1280
    assert {lc.ffn for lc in space.middle().layers} == {1024}


def test_ffn_widths_end_at_the_base_width_off_the_step() -> None:
    arch = replace(ARCH, ffn=1000)
    space = SearchSpace.build(arch, [4, 8], [8], 0.25, 1, 0.0, None)
    ws = space.ffn_widths()
    assert ws[0] == space.min_ffn and ws[-1] == 1000 and ws[-2] == 960
    assert all(b - a == 64 for a, b in zip(ws[:-2], ws[1:-1]))


def _with(cfg: SubnetConfig, i: int, **kw) -> SubnetConfig:
    layers = list(cfg.layers)
    layers[i] = replace(layers[i], **kw)
    return replace(cfg, layers=tuple(layers))


def test_contains_the_spaces_own_subnets_and_refuses_each_way_out() -> None:
    space = _space([4, 8, 16])
    mid = space.middle()
    assert space.contains(mid) and space.contains(space.min()) and space.contains(space.max())
    assert not space.contains(_with(mid, 0, ffn=space.min_ffn - 64))  # narrower than the space's minimum
    assert not space.contains(_with(mid, 0, kv_groups=0))  # fewer KV groups than the minimum
    assert not space.contains(_with(mid, 0, keep=False))  # layer 0 is not among the droppable (29..18)
    assert space.contains(_with(mid, 20, keep=False))  # layer 20 is (4 dropped of at most 6)
    too_many = mid
    for i in (20, 21, 22, 23):  # 7 dropped
        too_many = _with(too_many, i, keep=False)
    assert not space.contains(too_many)
    assert not space.contains(replace(mid, embed_bits=16))  # not an embedding option of this space
    assert not space.contains(_with(mid, 0, bits={**mid.layers[0].bits, "q": 5}))  # 5 is not a choice here


@pytest.mark.parametrize("frac, want", [(0.0, 0), (0.2, 6), (0.34, 10)])
def test_max_drop_is_the_fraction_of_layers_rounded_down(frac: float, want: int) -> None:
    space = SearchSpace.build(ARCH, [4, 8], [8], 0.25, 1, frac, None)
    assert space.max_drop == want and space.droppable == tuple(range(29, 29 - 2 * want, -1))


def test_default_drop_order_is_last_layer_first_down_to_layer_0() -> None:
    assert SearchSpace.build(ARCH, [4, 8], [8], 0.25, 1, 0.2, None).drop_order == tuple(range(29, -1, -1))


def test_a_space_whose_types_fit_no_input_width_names_the_matrix() -> None:
    space = _space(["Q4_K"])  # 256-blocks, no F16 to fall back on: the 576-wide inputs fit nothing
    with pytest.raises(ValueError, match=r"^no allowed type fits q \(input dimensions \[576\]; allowed \('Q4_K',\)\)$"):
        space.choices_for("q")
