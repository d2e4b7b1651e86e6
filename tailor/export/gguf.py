"""Export a standalone Tailor model to a GGUF file that llama.cpp loads (the `phone` device).

Architecture: `llama` when every layer has the same head counts and FFN width (the widest runtime
support), otherwise `deci`, llama.cpp's architecture for NAS-pruned Llamas, which reads per-layer
arrays `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length`
(`llama` reads the arrays too but builds every layer at layer 0's sizes, so the file would not load).

Weights are packed from the same block codes as the fake quantizer (`tailor.quant.gguf_pack`), so
llama.cpp reads exactly the values the model was trained and evaluated with. Tokenizer metadata and
the chat template are the model's own, from its base's `tokenizer.gguf` (`tailor.export.gguf_vocab`).

Every family behind the model seam writes the same tensors: q/k/v biases (Qwen2) as `blk.N.attn_*.bias`
(q/k ones permuted like their rows: Hugging Face's rotate-half RoPE is llama.cpp's NEOX, `deci` and
`llama` rotate adjacent pairs), an untied head as `output.weight`, llama3 RoPE scaling as
`rope_freqs.weight`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from tailor.arch import MATRICES, BaseArch, SubnetConfig, dump_choice
from tailor.export.gguf_vocab import TokenizerGGUFError, tokenizer_fields
from tailor.models.base import gguf_path, sha256_file
from tailor.models.model import QLinear, TailorForCausalLM, rope_inv_freq
from tailor.quant.f16 import PrecisionError
from tailor.quant.formats import matrix_bytes
from tailor.quant.gguf_pack import ggml_type, pack

# Our module name -> llama.cpp tensor name inside blk.N
_MATRICES = {
    ("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k", ("self_attn", "v_proj"): "attn_v",
    ("self_attn", "o_proj"): "attn_output", ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}


class ExportError(ValueError):
    """The model or template cannot be exported: the message names the file and the problem."""


def rope_permute(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's rotate-half pairing (j, j + hd/2) to ggml's adjacent pairs.

    convert_hf_to_gguf's `permute`, done per head so any pruned head count works. Rows move whole, so
    it commutes with block quantization (blocks run along columns)."""
    rows, cols = w.shape
    if rows != n_heads * head_dim:
        raise ExportError(f"q/k weight has {rows} rows, expected {n_heads} heads x {head_dim}")
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tokenizer_fields(template: Path) -> tuple[tuple[str, Any, GGUFValueType, Any], ...]:
    """tokenizer.* fields (vocab, merges, special ids, chat template) of the model's tokenizer GGUF."""
    if not template.is_file():
        raise ExportError(f"{template}: tokenizer GGUF not found")
    try:
        return tokenizer_fields(template.resolve(), template.stat().st_mtime_ns)
    except TokenizerGGUFError as e:
        raise ExportError(str(e)) from None


def _check_tokenizer(tokenizer: Any, fields: dict[str, Any], vocab: int, template: Path) -> None:
    n_tokens = len(fields["tokenizer.ggml.tokens"])
    if n_tokens != vocab:
        raise ExportError(f"{template}: tokenizer has {n_tokens} tokens but the model's vocab is {vocab}")
    if tokenizer is None:
        return
    if len(tokenizer) > n_tokens:  # fewer is fine: ids past the tokenizer's are padding rows
        raise ExportError(f"{template}: {n_tokens} tokens, but the model's tokenizer has {len(tokenizer)}")
    for key, ours in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id)):
        theirs = fields.get(f"tokenizer.ggml.{key}")
        if theirs is not None and ours is not None and int(theirs) != ours:
            raise ExportError(f"{template}: tokenizer.ggml.{key}={theirs}, the model's tokenizer has {ours}")


def _matrix(m: QLinear) -> tuple[torch.Tensor, int | str]:
    return m.weight.detach()[: m.active_out, : m.active_in].float().cpu(), dump_choice(m.bits)


def _tensors(model: TailorForCausalLM, blocks: list, q_per_kv: int, head_dim: int
             ) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """(GGUF name, weight, bits or None for a float32 vector) in file order (`_tensor_specs`' order)."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        # One table for both uses at the head's bits (as TailorForCausalLM quantizes it); with no
        # output.weight llama.cpp builds the output projection from token_embd.
        yield "token_embd.weight", *_matrix(model.lm_head)
    else:  # the input table at the head's bits, plain round-to-nearest (TailorForCausalLM.input_table)
        yield "token_embd.weight", model.model.embed_tokens.weight.detach().float().cpu(), dump_choice(model.lm_head.bits)
        yield "output.weight", *_matrix(model.lm_head)
    yield "output_norm.weight", model.model.norm.weight, None
    factors = _rope_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", factors, None
    for i, block in enumerate(blocks):
        yield f"blk.{i}.attn_norm.weight", block.input_layernorm.weight, None
        yield f"blk.{i}.ffn_norm.weight", block.post_attention_layernorm.weight, None
        kv = block.self_attn.kv_heads
        for (part, proj), name in _MATRICES.items():
            lin = getattr(getattr(block, part), proj)
            w, bits = _matrix(lin)
            heads = kv * q_per_kv if name == "attn_q" else kv
            if name in ("attn_q", "attn_k"):
                w = rope_permute(w, heads, head_dim)
            yield f"blk.{i}.{name}.weight", w, bits
            if lin.bias is not None:  # rows moved by rope_permute take their biases along
                b = lin.active_bias().detach().float().cpu()[:, None]
                b = rope_permute(b, heads, head_dim) if name in ("attn_q", "attn_k") else b
                yield f"blk.{i}.{name}.bias", b[:, 0], None


def _rope_factors(cfg: Any) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` (head_dim/2,) for scaled RoPE: it divides each base frequency by its
    factor, so factor = base inverse frequency / scaled one; None for plain RoPE."""
    scaling = getattr(cfg, "rope_freq_scaling", None)
    if not scaling:
        return None
    base = rope_inv_freq(cfg.head_dim, float(cfg.rope_theta))
    return base / rope_inv_freq(cfg.head_dim, float(cfg.rope_theta), scaling)


def _add(writer: GGUFWriter, name: str, w: torch.Tensor, bits: int | str | None) -> int:
    """Add one tensor (bits None = float32 vector); return its data bytes."""
    if bits is None:
        data = w.detach().float().cpu().numpy().astype(np.float32)
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F32)
    else:
        qtype = ggml_type(bits)
        data = pack(w, bits, name)  # refuses values float16 fields cannot hold, naming the tensor
        if qtype == GGMLQuantizationType.F16:
            data = data.view(np.float16)  # element shape, so the writer sees [rows, cols]
        writer.add_tensor(name, data, raw_dtype=qtype)
    return int(data.nbytes)


def _add_metadata(writer: GGUFWriter, arch: str, name: str, tok_fields: tuple, vocab: int, ctx_len: int, hidden: int,
                  head_dim: int, rope_theta: float, eps: float, ffn: list[int], heads: list[int], kv: list[int]) -> None:
    writer.add_name(name)
    for key, value, vtype, sub in tok_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_vocab_size(vocab)
    writer.add_context_length(ctx_len)
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(kv))
    # llama.cpp derives head size as n_embd / head_count(layer 0) unless told: pruned heads break that
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(eps)
    per_layer = {"feed_forward_length": ffn, "attention.head_count": heads, "attention.head_count_kv": kv}
    for key, vals in per_layer.items():
        if arch == "llama":
            writer.add_uint32(f"{arch}.{key}", vals[0])
        else:
            writer.add_key_value(f"{arch}.{key}", [int(v) for v in vals], GGUFValueType.ARRAY,
                                 sub_type=GGUFValueType.UINT32)
    writer.add_quantization_version(2)


def _tensor_specs(sub: SubnetConfig, a: BaseArch, rope_scaled: bool = False
                  ) -> Iterator[tuple[str, int, int, int | None]]:
    """(GGUF name, rows, cols, bits or None for a float32 vector) of subnet `sub`, in `_tensors`' order."""
    yield "token_embd.weight", a.vocab, a.hidden, sub.embed_bits
    if not a.tied:
        yield "output.weight", a.vocab, a.hidden, sub.embed_bits
    yield "output_norm.weight", 1, a.hidden, None
    if rope_scaled:
        yield "rope_freqs.weight", 1, a.head_dim // 2, None
    for i, layer in enumerate(lay for lay in sub.layers if lay.keep):
        q, kv = layer.kv_groups * a.q_per_kv * a.head_dim, layer.kv_groups * a.head_dim
        yield f"blk.{i}.attn_norm.weight", 1, a.hidden, None
        yield f"blk.{i}.ffn_norm.weight", 1, a.hidden, None
        shapes = {"q": (q, a.hidden), "k": (kv, a.hidden), "v": (kv, a.hidden), "o": (a.hidden, q),
                  "gate": (layer.ffn, a.hidden), "up": (layer.ffn, a.hidden), "down": (a.hidden, layer.ffn)}
        for m, gname in zip(MATRICES, _MATRICES.values()):
            yield f"blk.{i}.{gname}.weight", *shapes[m], layer.bits[m]
            if a.qkv_bias and m in ("q", "k", "v"):
                yield f"blk.{i}.{gname}.bias", 1, shapes[m][0], None


def predicted_file_bytes(sub: SubnetConfig, a: BaseArch, template: Path | None = None,
                         name: str = "tailor model", rope_scaled: bool = False) -> int:
    """Bytes of the GGUF `export` writes for subnet `sub`, from the config alone: the cost model's
    tensor bytes plus the container (header, metadata with the tokenizer, tensor index, alignment, and
    the `rope_freqs` constant of scaled RoPE), laid out by gguf-py's own writer with tensor infos but no
    data. Off by the model name's length. `template`: the model's tokenizer GGUF (default: SmolLM2's)."""
    template = Path(template) if template is not None else gguf_path()
    tok_fields = _tokenizer_fields(template)
    kept = [lay for lay in sub.layers if lay.keep]
    kv, ffn = [lay.kv_groups for lay in kept], [lay.ffn for lay in kept]
    arch = "llama" if len(set(kv)) == 1 and len(set(ffn)) == 1 else "deci"
    with tempfile.TemporaryDirectory() as d:
        writer = GGUFWriter(Path(d) / "m.gguf", arch)
        _add_metadata(writer, arch, name, tok_fields, a.vocab, 8192, a.hidden, a.head_dim, 1e5, 1e-5, ffn,
                      [k * a.q_per_kv for k in kv], kv)
        data, align = 0, writer.data_alignment
        for tname, rows, cols, bits in _tensor_specs(sub, a, rope_scaled):
            nbytes = 4 * cols if bits is None else matrix_bytes("gguf", bits, rows, cols)
            raw = GGMLQuantizationType.F32 if bits is None else ggml_type(bits)
            writer.add_tensor_info(tname, (cols,) if bits is None else (rows, cols), np.float32, nbytes, raw_dtype=raw)
            data += -(-nbytes // align) * align  # every tensor's data is padded to the alignment
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        meta = (Path(d) / "m.gguf").stat().st_size
    return -(-meta // align) * align + data


def export(model: TailorForCausalLM, tokenizer: Any, path: Path, template: Path | None = None,
           arch: str | None = None) -> dict[str, Any]:
    """Write `model` as a llama.cpp GGUF at `path` (atomically); return file facts.

    `arch` forces "llama" or "deci"; by default llama when all layers match, deci otherwise.
    Returns {"file_bytes", "weight_bytes" (sum of tensor data bytes), "sha256", "arch"}."""
    path = Path(path)
    template = Path(template) if template is not None else gguf_path()
    cfg = model.config
    blocks = [b for b in model.model.layers if b.active]  # an inactive block is the identity: drop it
    if not blocks:
        raise ExportError(f"{path}: the model has no active layers")
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if tied != bool(cfg.tie_word_embeddings):
        raise ExportError(f"{path}: lm_head {'is' if tied else 'is not'} tied to embed_tokens but config.json "
                          f"says tie_word_embeddings={cfg.tie_word_embeddings}")

    other = sorted({m.fmt for m in model.modules() if isinstance(m, QLinear)} - {"gguf"})
    if other:
        raise ExportError(f"{path}: the model is quantized on {other} grids; GGUF export needs quant_format 'gguf'")

    head_dim, q_per_kv = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    kv = [b.self_attn.kv_heads for b in blocks]
    heads = [k * q_per_kv for k in kv]
    ffn = [b.mlp.gate_proj.active_out for b in blocks]
    uniform = len(set(kv)) == 1 and len(set(ffn)) == 1
    arch = arch or ("llama" if uniform else "deci")
    if arch not in ("llama", "deci") or (arch == "llama" and not uniform):
        raise ExportError(f"{path}: architecture {arch!r} cannot hold these layers "
                          f"(kv heads {kv}, ffn {ffn}); use 'deci' for per-layer sizes")

    tok_fields = _tokenizer_fields(template)
    _check_tokenizer(tokenizer, {k: v for k, v, *_ in tok_fields}, cfg.vocab_size, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = GGUFWriter(tmp, arch)
    try:
        _add_metadata(writer, arch, f"tailor {cfg.name_or_path or 'model'}".strip(), tok_fields, cfg.vocab_size,
                      cfg.max_position_embeddings, cfg.hidden_size, head_dim, float(cfg.rope_theta),
                      float(cfg.rms_norm_eps), ffn, heads, kv)
        nbytes = 0
        for name, w, bits in _tensors(model, blocks, q_per_kv, head_dim):
            try:
                n = _add(writer, name, w, bits)
                nbytes += 0 if name == "rope_freqs.weight" else n  # a derived constant, not a weight
            except PrecisionError:  # names the tensor itself; the temp path would only confuse
                raise
            except ValueError as e:  # e.g. columns not in whole blocks: say which file and tensor
                raise ExportError(f"{path}: tensor {name}: {e}") from None

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {"file_bytes": path.stat().st_size, "weight_bytes": nbytes, "sha256": sha256_file(path), "arch": arch}

