"""The base model is an input: built-in names, Hugging Face directories and GGUF files resolve to a
source with a content hash, the converted base is cached under that hash, and bad sources are refused
in one line."""
from __future__ import annotations

import json

import pytest
import torch

from tailor.config import ConfigError, parse_params
from tailor.models.base import ModelFileError, base_dir, load_base, load_model_dir
from tailor.models.source import resolve
from tailor.models.tiny import save_tiny_hf_dir


@pytest.fixture(scope="module")
def tok_dir():
    from tailor.models.base import base_dir as bd

    return bd(None)  # SmolLM2's converted base: its tokenizer serves the tiny checkpoints


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_hf_dir_is_cached_under_its_content(tmp_path, tok_dir, cache):
    d = save_tiny_hf_dir(tmp_path / "mine", "qwen2", tok_dir, tie_word_embeddings=False, hidden_size=64)
    src = resolve(str(d))
    assert src.kind == "hf" and src.name == "mine"
    first = base_dir(str(d))
    assert first.name.startswith(f"base-{src.key}-c") and json.loads((first / "source.json").read_text())["sha256"] == src.sha256
    model = load_model_dir(d)  # what `tailor evaluate --model DIR` does: through the family seam
    assert not model.config.tie_word_embeddings and model.config.attention_bias
    # the same path with other contents is another model: a new cache entry, never the stale one
    save_tiny_hf_dir(d, "qwen2", tok_dir, seed=9, tie_word_embeddings=False, hidden_size=64)
    assert resolve(str(d)).sha256 != src.sha256
    second = base_dir(str(d))
    assert second != first
    a, b = load_model_dir(first), load_model_dir(second)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_tokenizer_gguf_tokenizes_like_the_model(tmp_path, tok_dir, cache):
    """A Hugging Face directory's BPE tokenizer is written to GGUF so that llama.cpp tokenizes the probe
    texts exactly as transformers does (the pre-tokenizer found by trying llama.cpp's names)."""
    from transformers import AutoTokenizer

    from tailor.export.gguf_vocab import PROBES, llama_tokenize, tokenizer_gguf

    d = save_tiny_hf_dir(tmp_path / "m", "llama", tok_dir)
    path = tokenizer_gguf(base_dir(str(d)))
    tok = AutoTokenizer.from_pretrained(d)
    assert llama_tokenize(path) == [tok(t, add_special_tokens=False)["input_ids"] for t in PROBES]


def test_untokenizable_vocab_is_refused_at_export_with_the_reason(tmp_path, tok_dir, cache):
    """A tokenizer llama.cpp cannot reproduce leaves no tokenizer.gguf, only the reason, which GGUF
    export reports (ONNX export does not need it)."""
    from tailor.export.gguf_vocab import TokenizerGGUFError, tokenizer_gguf, write_tokenizer_gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = write_tokenizer_gguf(tmp_path / "tokenizer.gguf", tok, tok_dir, len(tok) - 1)  # one token short
    assert out.name == "tokenizer.gguf.error" and not (tmp_path / "tokenizer.gguf").exists()
    with pytest.raises(TokenizerGGUFError, match="model's vocab"):
        tokenizer_gguf(tmp_path)


@pytest.mark.parametrize("spec, words", [
    ("no-such-model", "no such file or directory, and not a built-in (smollm2-135m, qwen2.5-coder-0.5b)"),
])
def test_unknown_source_is_refused(spec, words, cache):
    with pytest.raises(ModelFileError) as e:
        resolve(spec)
    assert words in str(e.value)


def test_not_a_model_is_refused(tmp_path, cache):
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        resolve(str(tmp_path / "notes.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_pickled_or_missing_shards_are_refused(tmp_path, tok_dir, cache):
    d = save_tiny_hf_dir(tmp_path / "p", "llama", tok_dir)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="pickled weights"):
        base_dir(str(d))
    d2 = save_tiny_hf_dir(tmp_path / "s", "llama", tok_dir)
    (d2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFileError, match="shard model-00002-of-00002.safetensors"):
        base_dir(str(d2))


def test_model_package_key_is_refused():
    """`model.package` was accepted and ignored: an unknown key now names itself."""
    with pytest.raises(ConfigError, match="model.package"):
        parse_params({"profile": "p", "profiles": {"p": {}}, "model": {"package": "something-else"}})


def test_sliced_load_of_a_source(tmp_path, tok_dir, cache):
    d = save_tiny_hf_dir(tmp_path / "m", "mistral", tok_dir, num_hidden_layers=3, sliding_window=None)
    model, tok = load_base(str(d), n_layers=2)
    assert model.config.num_hidden_layers == 2 and model.config.family == "mistral"
    assert len(tok) == model.config.vocab_size


def test_gguf_file_of_another_model_is_a_source(tmp_path, tok_dir, cache):
    """A GGUF file is a way in: a tiny untied-free Llama written by our own GGUF writer (`llama`
    architecture, F16) comes back through transformers' GGUF reader and the family seam with the same
    logits, its tokenizer metadata copied into the base's tokenizer.gguf."""
    from transformers import AutoTokenizer

    from tailor.arch import BaseArch, SubnetConfig
    from tailor.elastic.supernet import export_active
    from tailor.export import gguf as gguf_writer
    from tailor.export.gguf_vocab import tokenizer_gguf
    from tailor.models.base import build_model, gguf_path
    from tailor.models.model import set_runtime_emulation
    from tailor.models.tiny import tiny_hf_model

    tok = AutoTokenizer.from_pretrained(tok_dir)
    hf = tiny_hf_model("llama", seed=4, vocab=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 31337.0})
    dense = build_model(hf.config.to_dict(), hf.state_dict(), "tiny")
    small = export_active(dense, SubnetConfig.max(BaseArch.from_hf(dense.config)), "gguf")  # F16, all layers
    set_runtime_emulation(small, False)
    path = tmp_path / "tiny-llama.gguf"
    gguf_writer.export(small, tok, path, template=gguf_path(), arch="llama")
    src = resolve(str(path))
    assert (src.kind, src.name) == ("gguf", "tiny-llama")
    model, _ = load_base(str(path))
    assert model.config.rope_theta == 31337.0 and model.config.tie_word_embeddings
    ids = torch.randint(0, len(tok), (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, small(ids).logits, rtol=1e-4, atol=1e-4)
    assert tokenizer_gguf(base_dir(str(path))).is_file()


def test_two_processes_converting_one_source_both_get_the_cache_entry(tmp_path, tok_dir, cache):
    """Two runs on a fresh cache convert the same source at once (found by `make test` on two xdist workers
    in a fresh clone): the one renaming second finds the first's complete entry and keeps it, no error, no
    temp directory left. A rename that fails for another reason still raises."""
    from tailor.models.base import _convert

    d = save_tiny_hf_dir(tmp_path / "m", "llama", tok_dir)
    first = base_dir(str(d))
    before = (first / "model.safetensors").read_bytes()
    _convert(resolve(str(d)), first)  # the slower process: its rename meets a complete, non-empty directory
    assert (first / "model.safetensors").read_bytes() == before
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-base-")]
    blocker = cache / "not-a-dir"
    blocker.write_text("a file where the entry should go")
    with pytest.raises(OSError):  # no complete entry there: the failure is real
        _convert(resolve(str(d)), blocker)


def test_gguf_special_tokens_come_from_the_file(monkeypatch):
    """transformers 5.17 (the GPU machine's) reads SmolLM2's GGUF with eos = <|im_start|> and no pad; the
    file's own tokenizer.ggml.*_token_id keys decide (eos 2, bos 1, pad 2), whatever the reader returns."""
    from transformers import AutoTokenizer

    from tailor.models import base as b

    real = AutoTokenizer.from_pretrained

    def like_5_17(*a, **k):
        tok = real(*a, **k)
        if k.get("gguf_file"):
            tok.eos_token, tok.pad_token = tok.bos_token, None
        return tok

    monkeypatch.setattr(b.AutoTokenizer, "from_pretrained", like_5_17)
    _, _, tok = b._read_gguf(resolve("smollm2-135m"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token == "<|im_end|>"


def test_gguf_special_token_outside_the_vocabulary_is_refused():
    from types import SimpleNamespace

    from tailor.models.base import gguf_special_tokens

    class Tok:
        eos_token_id = 0

        def __len__(self):
            return 10

    reader = SimpleNamespace(fields={"tokenizer.ggml.eos_token_id": SimpleNamespace(parts=[[12]], data=[0])})
    with pytest.raises(ModelFileError, match="tokenizer.ggml.eos_token_id = 12: outside the file's 10-token"):
        gguf_special_tokens(Tok(), reader)
