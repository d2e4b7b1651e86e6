"""Tailor's Llama equals the Hugging Face Llama on the same weights (tiny config)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tailor.models.model import TailorForCausalLM
from tailor.models.tiny import tiny_model


def _hf_twin(model: TailorForCausalLM) -> LlamaForCausalLM:
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                      head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
                                      attention_bias=False, mlp_bias=False))
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.eval()


def test_tiny_matches_huggingface_llama():
    model = tiny_model(seed=1, hidden_size=96, head_dim=16)  # HF wants hidden = heads x head_dim
    hf = _hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(seed=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, TailorForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_enable_compile_compiles_the_blocks_elementwise_chains_for_cuda_training_only(monkeypatch):
    """accel.enable_compile also compiles RMSNorm, RoPE and SwiGLU (dynamic shapes, once each); they serve
    only training forwards on CUDA, so inference and every CPU forward stay the eager code."""
    import tailor.models.model as mm
    from tailor import accel

    calls = []

    def compile_(fn, **kw):
        calls.append((fn.__name__, kw))
        return lambda *a: ("compiled", fn.__name__)

    monkeypatch.setattr(mm, "_fused", {})
    monkeypatch.setattr(torch, "compile", compile_)
    mm.enable_compile()
    mm.enable_compile()
    assert calls == [("_rms_norm", {"dynamic": True}), ("_rope", {"dynamic": True}), ("_swiglu", {"dynamic": True})]
    x = torch.ones(2, 4)

    class Cuda:  # what _chain reads of a CUDA tensor
        is_cuda = True

    assert mm._chain("rope", mm._rope, x) is mm._rope  # a CPU tensor: eager
    assert mm._chain("rope", mm._rope, Cuda())(0) == ("compiled", "_rope")
    with torch.no_grad():
        assert mm._chain("rope", mm._rope, Cuda()) is mm._rope  # inference: eager
    monkeypatch.setattr(accel.fake, "_compiled", None)
    monkeypatch.setattr(accel.distill, "_compiled", None)
    accel.disable_compile()
    assert mm._fused == {}
