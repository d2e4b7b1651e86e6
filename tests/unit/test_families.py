"""The model seam: every supported family computes what transformers computes, and every feature
Tailor cannot compute is refused by name (issue: bring your own model)."""
from __future__ import annotations

import json

import pytest
import torch

from tailor.arch import BaseArch, SubnetConfig
from tailor.models.base import ModelFileError, build_model
from tailor.models.families import FAMILIES, tailor_config_kwargs
from tailor.models.tiny import tiny_hf_model

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama-tied": ("llama", {}),
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    # no head_dim in the config and hidden / heads = 24, not 64 (what used to crash on every Qwen2)
    "llama-hd24-no-head-dim": ("llama", {"hidden_size": 96, "head_dim": None}),
    "llama-theta-only-in-rope-parameters": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 31337.0}}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": LLAMA3, "head_dim": 32}),
    "mistral": ("mistral", {"sliding_window": None, "head_dim": 24}),
    "qwen2-tied": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False, "hidden_size": 96, "head_dim": None,
                               "num_attention_heads": 6, "num_key_value_heads": 2}),
}


def _hf_config(hf) -> dict:
    d = hf.config.to_dict()
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    return d


def _ids(vocab: int, t: int = 150) -> torch.Tensor:
    # 150 positions: past the llama3 case's original context (64), where the scaled frequencies matter
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_family_matches_transformers(case):
    family, over = CASES[case]
    hf = tiny_hf_model(family, seed=3, **over)
    model = build_model(_hf_config(hf), hf.state_dict(), case)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_untied_head_is_kept_and_costed():
    hf = tiny_hf_model("qwen2", seed=4, tie_word_embeddings=False)
    model = build_model(_hf_config(hf), hf.state_dict(), "qwen2-untied")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, hf.lm_head.weight)
    arch = BaseArch.from_hf(model.config)
    assert not arch.tied and arch.qkv_bias
    full = SubnetConfig.max(arch)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("qclip"))
    assert full.param_count(arch) == n_params  # both tables and every bias counted
    # 16-bit: 2 bytes per matrix/table element, 4 per norm/bias element
    vec = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert full.nbytes(arch, "gguf") == 2 * (n_params - vec) + 4 * vec


def test_llama3_frequencies_are_scaled():
    """The llama3 case only passes parity if the scaling is applied: plain frequencies differ there."""
    from tailor.models.model import rope_inv_freq

    scaled, plain = rope_inv_freq(32, 500000.0, LLAMA3), rope_inv_freq(32, 500000.0)
    assert not torch.allclose(scaled, plain)
    assert torch.equal(scaled[:2], plain[:2])  # high frequencies (short wavelengths) are kept


def test_sliding_window_caps_the_context():
    hf = tiny_hf_model("mistral", seed=5, sliding_window=32)
    kw = tailor_config_kwargs(_hf_config(hf), "mistral-swa")
    assert kw["max_position_embeddings"] == 32  # within the window, SWA is full attention: exact
    qwen = tiny_hf_model("qwen2", seed=5, sliding_window=32, use_sliding_window=False)
    assert tailor_config_kwargs(_hf_config(qwen), "qwen")["max_position_embeddings"] == 256


REFUSED = {
    "unknown family": ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    "mixture of experts": ({"num_local_experts": 8}, "num_local_experts=8: mixture-of-experts"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    "llama o_proj bias": ({"attention_bias": True}, "attention_bias=true is not supported for llama"),
    "mlp bias": ({"mlp_bias": True}, "mlp_bias=true"),
    "quantized checkpoint": ({"quantization_config": {"quant_method": "awq"}}, "quantization_config (awq)"),
    "no theta": ({"rope_parameters": None, "rope_theta": None}, "no rope_theta"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_features_are_refused_by_name(case):
    change, words = REFUSED[case]
    cfg = {**_hf_config(tiny_hf_model("llama")), **change}
    with pytest.raises(ModelFileError) as e:
        tailor_config_kwargs(cfg, "/models/mine")
    assert str(e.value).startswith("/models/mine: ") and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_or_extra_tensors_are_refused():
    hf = tiny_hf_model("qwen2", seed=6)
    state = dict(hf.state_dict())
    del state["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ModelFileError, match="missing.*k_proj.bias"):
        build_model(_hf_config(hf), state, "qwen")
    state = dict(hf.state_dict()) | {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}
    with pytest.raises(ModelFileError, match="unexpected.*o_proj.bias"):
        build_model(_hf_config(hf), state, "qwen")


def test_tied_config_with_a_different_head_is_refused():
    hf = tiny_hf_model("llama", seed=7, tie_word_embeddings=False)
    cfg = _hf_config(hf) | {"tie_word_embeddings": True}  # a config that lies about its head
    with pytest.raises(ModelFileError, match="lm_head.weight differs"):
        build_model(cfg, hf.state_dict(), "liar")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_config_round_trips(family):
    """family.hf_config is config_kwargs' inverse: Tailor -> transformers -> Tailor is the identity."""
    hf = tiny_hf_model(family, seed=8, tie_word_embeddings=False)
    model = build_model(_hf_config(hf), hf.state_dict(), family)
    back = FAMILIES[family].hf_config(model.config).to_dict()
    again = tailor_config_kwargs(json.loads(json.dumps(back)), family)
    assert again == tailor_config_kwargs(_hf_config(hf), family)
