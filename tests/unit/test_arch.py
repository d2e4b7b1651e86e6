"""SubnetConfig: round trips, stable hash, validation that names the field, exact bytes."""
import json

import pytest

from tailor.arch import BaseArch, SubnetConfig
from tailor.quant.formats import matrix_bytes

ARCH = BaseArch(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152)


def test_roundtrip_dict_json_and_stable_hash():
    cfg = SubnetConfig.uniform(ARCH, 4, embed_bits=8, ffn_frac=0.5, kv_groups=2, drop=[3, 7])
    assert SubnetConfig.from_dict(cfg.to_dict()) == cfg
    assert SubnetConfig.from_json(cfg.to_json()) == cfg
    assert SubnetConfig.from_json(json.dumps(json.loads(cfg.to_json()), indent=4)).hash == cfg.hash
    assert cfg.with_layer(0, ffn=64).hash != cfg.hash


def test_from_dict_rejects_other_versions():
    d = SubnetConfig.max(ARCH).to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        SubnetConfig.from_dict(d)


def test_validate_names_the_field():
    cfg = SubnetConfig.max(ARCH).with_layer(4, ffn=100)
    with pytest.raises(ValueError, match=r"layers\[4\].ffn=100"):
        cfg.validate(ARCH)
    with pytest.raises(ValueError, match="bits.q=3"):
        SubnetConfig.uniform(ARCH, 3).validate(ARCH, allowed_bits=[4, 8, 16])


def test_param_count_of_max_is_smollm2():
    assert SubnetConfig.max(ARCH).param_count(ARCH) == 134_515_008


def test_nbytes_adds_up_each_tensor():
    cfg = SubnetConfig.uniform(ARCH, 4, embed_bits=8, drop=range(10))
    per_layer = (2 * matrix_bytes("gguf", 4, 576, 576) + 2 * matrix_bytes("gguf", 4, 192, 576)
                 + 2 * matrix_bytes("gguf", 4, 1536, 576) + matrix_bytes("gguf", 4, 576, 1536) + 2 * 576 * 4)
    expected = 20 * per_layer + 49152 * 576 // 32 * 34 + 576 * 4
    assert cfg.nbytes(ARCH, "gguf") == expected
    assert cfg.bits_per_param(ARCH, "gguf") == 8 * expected / 134_515_008  # per base parameter
