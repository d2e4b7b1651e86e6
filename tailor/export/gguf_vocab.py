"""The model's own tokenizer as GGUF metadata (`tokenizer.ggml.*`), written once per base model.

A GGUF source already holds its tokenizer: its `tokenizer.*` fields are copied as they are. A Hugging Face
directory's byte-level BPE tokenizer (`tokenizer.json`, what Llama 3, Qwen2 and SmolLM use) is written with
gguf-py's own helpers: tokens and token types from the tokenizer's vocabulary (ids past it padded as
`[PADn]`, UNUSED, up to the embedding's rows, as llama.cpp's converter does), merges, special ids and the
chat template from `gguf.SpecialVocab`. llama.cpp also needs the name of its pre-tokenizer (the regex that
splits text before BPE); which name a tokenizer needs is found by trying llama.cpp's own names and keeping
the first whose tokenization of `PROBES` equals the Hugging Face tokenizer's. Whatever the source, the
result must tokenize `PROBES` exactly as the model's tokenizer does, or no `tokenizer.gguf` is written and
`tokenizer.gguf.error` says why (GGUF export then refuses with that reason; ONNX export does not need it).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

PROBES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  two  spaces,\ttabs\nand newlines\n\n  indented   ",
    "Numbers 1234567 and 3.14159, dates 2026-11-29; it's, we'll, they've, I'M",
    "def f(x):\n    return x**2  # code\n",
    "Émile's café — naïve façade, 東京, Привет, 🤖 emoji",
    "<|im_start|>user\nHi<|im_end|>",
)
# llama.cpp pre-tokenizer names tried for a byte-level BPE tokenizer, most common first.
PRE_CANDIDATES = ("llama-bpe", "qwen2", "smollm", "gpt-2", "default", "starcoder", "deepseek-llm", "deepseek-coder",
                  "falcon", "mpt", "refact", "command-r", "olmo", "dbrx", "stablelm2", "tekken", "gpt-4o", "superbpe")


class TokenizerGGUFError(ValueError):
    """The tokenizer cannot be written so that llama.cpp tokenizes exactly as the model does."""


def _fields_of(gguf_file: Path) -> list[tuple[str, Any, Any, Any]]:
    """tokenizer.* fields of a GGUF file as (key, value, type, array element type)."""
    from gguf import GGUFReader, GGUFValueType

    out = []
    for key, field in GGUFReader(gguf_file).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY and len(field.types) != 2:
            raise TokenizerGGUFError(f"{gguf_file}: nested array field {key} is not supported")
        out.append((key, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise TokenizerGGUFError(f"{gguf_file}: no tokenizer.ggml.tokens")
    return out


@functools.lru_cache(maxsize=4)
def tokenizer_fields(path: Path, mtime_ns: int) -> tuple[tuple[str, Any, Any, Any], ...]:
    """The tokenizer.* fields of a `tokenizer.gguf` (cached: parsing a 150k-token vocabulary takes seconds)."""
    return tuple(_fields_of(path))


def _write(path: Path, fields: list[tuple[str, Any, Any, Any]]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bpe_fields(tok: Any, tok_dir: Path, vocab_size: int, pre: str) -> list[tuple[str, Any, Any, Any]]:
    """tokenizer.ggml.* fields of a byte-level BPE Hugging Face tokenizer with pre-tokenizer `pre`, via a
    scratch GGUFWriter (`_with_pre` swaps the pre-tokenizer without rebuilding the vocabulary)."""
    import gguf

    rev = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    if len(rev) > vocab_size:
        raise TokenizerGGUFError(f"{tok_dir}: tokenizer has {len(rev)} tokens, the model's vocab is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(rev[i])
            types.append(gguf.TokenType.NORMAL)
    with tempfile.TemporaryDirectory() as d:
        w = gguf.GGUFWriter(Path(d) / "t.gguf", "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise TokenizerGGUFError(f"{tok_dir}: no BPE merges in tokenizer.json (only byte-level BPE tokenizers "
                                     "can be written to GGUF)")
        special.add_to_gguf(w, quiet=True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return _fields_of(Path(d) / "t.gguf")


def _with_pre(fields: list[tuple[str, Any, Any, Any]], pre: str) -> list[tuple[str, Any, Any, Any]]:
    return [(k, pre if k == "tokenizer.ggml.pre" else v, t, sub) for k, v, t, sub in fields]


def llama_tokenize(gguf_file: Path, texts: tuple[str, ...] = PROBES) -> list[list[int]]:
    """Token ids llama.cpp gives `texts` with the vocabulary of `gguf_file` (no BOS, special tokens parsed)."""
    import llama_cpp

    from tailor.export.llamacpp import _route_logs

    _route_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_file).encode(), params)
    if not model:
        raise TokenizerGGUFError(f"{gguf_file}: llama.cpp could not load the vocabulary")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        out = []
        for text in texts:
            raw = text.encode()
            buf = (llama_cpp.llama_token * (len(raw) + 8))()
            n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
            if n < 0:
                raise TokenizerGGUFError(f"{gguf_file}: llama.cpp tokenization overflowed on {text[:20]!r}")
            out.append(list(buf[:n]))
        return out
    finally:
        llama_cpp.llama_model_free(model)


def _hf_ids(tok: Any) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in PROBES]


def write_tokenizer_gguf(path: Path, tok: Any, tok_dir: Path, vocab_size: int, source_gguf: Path | None = None) -> Path:
    """Write `path` (a GGUF holding only tokenizer metadata) for tokenizer `tok` saved in `tok_dir`.

    From `source_gguf`'s own fields when given, else built from the byte-level BPE tokenizer. On failure
    writes `path` + ".error" with the reason instead and returns that file; never a file that tokenizes
    differently from `tok`."""
    path = Path(path)
    err = path.with_name(path.name + ".error")
    want = _hf_ids(tok)
    try:
        if source_gguf is not None:
            candidates = [_fields_of(source_gguf)]
        else:
            base = _bpe_fields(tok, tok_dir, vocab_size, PRE_CANDIDATES[0])  # the vocabulary is built once
            candidates = (_with_pre(base, pre) for pre in PRE_CANDIDATES)
        for fields in candidates:
            n = len(next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"))
            if n != vocab_size:
                raise TokenizerGGUFError(f"{source_gguf or tok_dir}: {n} tokens, the model's vocab is {vocab_size}")
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            try:
                _write(tmp, fields)
                got = llama_tokenize(tmp)
                if got == want:
                    os.replace(tmp, path)
                    return path
                bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            finally:
                tmp.unlink(missing_ok=True)
        raise TokenizerGGUFError(f"{source_gguf or tok_dir}: llama.cpp tokenizes {PROBES[bad][:30]!r} differently from "
                                 "the model's tokenizer (no llama.cpp pre-tokenizer reproduces it)")
    except TokenizerGGUFError as e:
        err.write_text(str(e) + "\n")
        return err


def tokenizer_gguf(model_dir: Path) -> Path:
    """The `tokenizer.gguf` of a base model directory; TokenizerGGUFError with the recorded reason when
    the tokenizer could not be written to GGUF."""
    path = Path(model_dir) / "tokenizer.gguf"
    if path.is_file():
        return path
    err = path.with_name(path.name + ".error")
    raise TokenizerGGUFError(err.read_text().strip() if err.is_file() else f"{path}: missing")
