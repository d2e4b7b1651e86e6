"""Export a Tailor model as one ONNX file for onnxruntime (CPU), built by hand with onnx.helper.

Graph: input_ids [batch, seq] int64 -> logits [batch, seq, vocab] float32, a full forward per call
(no KV cache). Per kept layer: RMSNormalization, q/k/v/o and gate/up/down projections (q/k/v + bias
for Qwen2), rotary embedding (Hugging Face rotate_half convention, cos/sin computed in-graph from
positions, llama3-scaled frequencies where the model has them), causal GQA `Attention` (opset 23),
SiLU-gated MLP; then the final norm and the LM head (tied or untied).

Weights are stored exactly as `tailor.quant.onnx_grid` counts them, as the only initializers:
- 2/4/8 bits: com.microsoft::MatMulNBits tensors (B, float32 scales, packed uint8 zero points), packed
  from the same integers the fake quantizer produces, so onnxruntime sees the trained values bit for bit;
- 16 bits: a float16 matrix, Cast to float32 (onnxruntime folds the Cast once at load);
- biases float32;
- the tied embedding once (an untied model: its input table and its head, each like this): float16 [vocab, hidden] read by Gather and by the LM head MatMul, or packed
  MatMulNBits tensors read by the LM head and (through a Reshape to [vocab, hidden*bits/8], the layout
  GatherBlockQuantized expects) by com.microsoft::GatherBlockQuantized;
- norm weights float32.
Small graph constants (shapes, rotary inverse frequencies) are Constant nodes, not initializers, so the
sum of initializer bytes is exactly `SubnetConfig.nbytes(arch, "onnx")`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from tailor.formats.base import sha256_files
from tailor.models.model import QLinear, TailorForCausalLM, rope_inv_freq
from tailor.quant import onnx_grid, onnx_pack
from tailor.quant.f16 import to_f16

OPSET = 23  # first opset with Attention (GQA, is_causal) and RMSNormalization
IR_VERSION = 11  # the IR version that introduced opset 23; onnxruntime 1.32 reads it
MS = "com.microsoft"
EXACT, INT8_ACTIVATIONS = 0, 4  # MatMulNBits accuracy_level: float32 activations / int8 activations
PROTOBUF_LIMIT = 2**31 - 2**24  # one protobuf must stay under 2 GiB; keep a margin for the graph


class OnnxExportError(ValueError):
    """The model cannot be exported as asked; the message names the tensor or setting."""


class _Graph:
    """Collects nodes and initializers; every tensor name is unique."""

    def __init__(self, accuracy_level: int = 0) -> None:
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_bytes = 0
        self._n = 0

    def tmp(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def node(self, op: str, inputs: list[str], hint: str | None = None, domain: str = "", out: str | None = None,
             **attrs: Any) -> str:
        out = out or self.tmp(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", domain=domain, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        out = self.tmp(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out + "_node",
                                           value=numpy_helper.from_array(np.asarray(value), out)))
        return out

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.weight_bytes += array.nbytes
        return name


def _f16(w: torch.Tensor, name: str = "weight") -> np.ndarray:
    return to_f16(w.detach().float().cpu(), name).numpy()  # refuses values beyond float16, naming the tensor


def _linear(g: _Graph, x: str, lin: QLinear, name: str) -> str:
    """y = x @ W^T for the active slice of `lin`, on the grid the torch model fake-quantizes to."""
    w = lin.weight[: lin.active_out, : lin.active_in].detach().float().cpu()
    n, k = w.shape
    if lin.bits >= 16:
        wt = g.weight(name + ".weight", _f16(w, name + ".weight").T)  # stored [in, out] so MatMul needs no Transpose
        return g.node("MatMul", [x, g.node("Cast", [wt], to=TensorProto.FLOAT)], hint=name)
    if lin.bits not in onnx_pack.PACK_BITS:
        raise OnnxExportError(f"{name}: {lin.bits} bits cannot be exported (MatMulNBits runs {onnx_pack.PACK_BITS}, or 16)")
    if lin.fmt != "onnx":
        raise OnnxExportError(f"{name}: fake-quantized on the {lin.fmt!r} grid, not 'onnx'; packing would change its values")
    p = onnx_pack.pack(w, lin.bits)
    ins = [x, g.weight(name + ".qweight", p.b), g.weight(name + ".scales", p.scales),
           g.weight(name + ".qzeros", p.zero_points)]
    return g.node("MatMulNBits", ins, hint=name, domain=MS, K=k, N=n, bits=lin.bits,
                  block_size=onnx_grid.BLOCK, accuracy_level=g.accuracy_level)


def _affine(g: _Graph, x: str, lin: QLinear, name: str) -> str:
    """`_linear` plus the float32 bias of the active rows, when the projection has one (Qwen2's q/k/v)."""
    y = _linear(g, x, lin, name)
    if lin.bias is None:
        return y
    b = g.weight(name + ".bias", lin.active_bias().detach().float().cpu().numpy())
    return g.node("Add", [y, b], hint=name + "_b")


def _rms(g: _Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    w = g.weight(name + ".weight", weight.detach().float().cpu().numpy())
    return g.node("RMSNormalization", [x, w], hint=name, axis=-1, epsilon=float(eps))


def _rotary_tables(g: _Graph, ids: str, head_dim: int, theta: float, scaling: dict | None) -> tuple[str, str]:
    """cos, sin [seq, head_dim] from positions 0..seq-1 — the arithmetic of model.rope_tables."""
    inv = rope_inv_freq(head_dim, theta, scaling)  # the same float32 frequencies torch uses
    seq = g.node("Gather", [g.node("Shape", [ids]), g.const(np.array(1, np.int64))], hint="seq_len")
    pos = g.node("Range", [g.const(np.array(0, np.int64)), seq, g.const(np.array(1, np.int64))], hint="pos")
    pos = g.node("Unsqueeze", [g.node("Cast", [pos], to=TensorProto.FLOAT), g.const(np.array([1], np.int64))])
    freqs = g.node("Mul", [pos, g.const(inv.numpy()[None, :], "inv_freq")], hint="freqs")  # (T, hd/2)
    emb = g.node("Concat", [freqs, freqs], hint="rope_angles", axis=-1)  # (T, hd)
    return g.node("Cos", [emb], hint="cos"), g.node("Sin", [emb], hint="sin")


def _rope(g: _Graph, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) over the last axis."""
    x1, x2 = g.tmp("x1"), g.tmp("x2")
    g.nodes.append(helper.make_node("Split", [x], [x1, x2], name=x1 + "_node", axis=-1, num_outputs=2))
    rot = g.node("Concat", [g.node("Neg", [x2]), x1], axis=-1)
    return g.node("Add", [g.node("Mul", [x, cos]), g.node("Mul", [rot, sin])], hint="roped")


def _heads(g: _Graph, x: str, n: int, hd: int) -> str:
    """(B, T, n*hd) -> (B, n, T, hd)"""
    x = g.node("Reshape", [x, g.const(np.array([0, 0, n, hd], np.int64), "shape")])
    return g.node("Transpose", [x], perm=[0, 2, 1, 3])


def _layer(g: _Graph, x: str, block: Any, i: int, cos: str, sin: str, eps: float) -> str:
    att, mlp, p = block.self_attn, block.mlp, f"model.layers.{i}"
    nq, nkv, hd = att.kv_heads * att.q_per_kv, att.kv_heads, att.head_dim
    h = _rms(g, x, block.input_layernorm.weight, eps, f"{p}.input_layernorm")
    q = _rope(g, _heads(g, _affine(g, h, att.q_proj, f"{p}.self_attn.q_proj"), nq, hd), cos, sin)
    k = _rope(g, _heads(g, _affine(g, h, att.k_proj, f"{p}.self_attn.k_proj"), nkv, hd), cos, sin)
    v = _heads(g, _affine(g, h, att.v_proj, f"{p}.self_attn.v_proj"), nkv, hd)
    y = g.node("Attention", [q, k, v], hint=f"{p}.attn", is_causal=1)  # (B, nq, T, hd), GQA by head counts
    y = g.node("Reshape", [g.node("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, -1], np.int64))])
    x = g.node("Add", [x, _linear(g, y, att.o_proj, f"{p}.self_attn.o_proj")], hint=f"{p}.resid_attn")
    h = _rms(g, x, block.post_attention_layernorm.weight, eps, f"{p}.post_attention_layernorm")
    gate = _linear(g, h, mlp.gate_proj, f"{p}.mlp.gate_proj")
    act = g.node("Mul", [gate, g.node("Sigmoid", [gate])], hint="silu")
    hid = g.node("Mul", [act, _linear(g, h, mlp.up_proj, f"{p}.mlp.up_proj")])
    return g.node("Add", [x, _linear(g, hid, mlp.down_proj, f"{p}.mlp.down_proj")], hint=f"{p}.resid_mlp")


def _table(g: _Graph, w: torch.Tensor, bits: int, name: str) -> tuple[str, tuple[str, ...] | None]:
    """One [vocab, hidden] table as initializers: float16 (returns its name, None) or MatMulNBits-packed
    (returns the B name and (B, scales, zero points))."""
    if bits >= 16:
        return g.weight(name + ".weight", _f16(w, name + ".weight")), None
    if bits not in onnx_pack.PACK_BITS:
        raise OnnxExportError(f"embed_bits={bits} cannot be exported (allowed {onnx_pack.PACK_BITS} or 16)")
    p = onnx_pack.pack(w, bits)
    packed = (g.weight(name + ".qweight", p.b), g.weight(name + ".scales", p.scales),
              g.weight(name + ".qzeros", p.zero_points))
    return packed[0], packed


def _embedding(g: _Graph, ids: str, model: TailorForCausalLM) -> tuple[str, Any]:
    """Token embedding of `ids` and a function emitting the LM head. A tied table is stored once and
    read by both; an untied model stores its input table and its head, each at the head's bits."""
    head = model.lm_head
    tied = model.model.embed_tokens.weight.data_ptr() == head.weight.data_ptr()
    if tied != bool(model.config.tie_word_embeddings):
        raise OnnxExportError(f"lm_head {'is' if tied else 'is not'} tied to the embedding but config.json says "
                              f"tie_word_embeddings={model.config.tie_word_embeddings}")
    w = head.weight.detach().float().cpu()
    vocab, hidden = w.shape
    bits = int(head.bits)
    emb_name = "model.embed_tokens" if tied else "model.embed_in"
    table = w if tied else model.model.embed_tokens.weight.detach().float().cpu()
    e, packed = _table(g, table, bits, emb_name)
    if packed is None:
        x = g.node("Cast", [g.node("Gather", [e, ids], hint="embed")], to=TensorProto.FLOAT)
    else:
        rows = g.node("Reshape", [e, g.const(np.array([vocab, -1], np.int64))], hint="embed_rows")  # same bytes
        x = g.node("GatherBlockQuantized", [rows, ids, packed[1], packed[2]], hint="embed", domain=MS, bits=bits,
                   block_size=onnx_grid.BLOCK, gather_axis=0, quantize_axis=1)
    if not tied:
        e, packed = _table(g, w, bits, "lm_head")

    def lm_head(h: str) -> str:
        if packed is None:
            et = g.node("Transpose", [g.node("Cast", [e], to=TensorProto.FLOAT)], perm=[1, 0])  # folded at load
            return g.node("MatMul", [h, et], out="logits")
        return g.node("MatMulNBits", [h, *packed], out="logits", domain=MS, K=hidden, N=vocab,
                      bits=bits, block_size=onnx_grid.BLOCK, accuracy_level=g.accuracy_level)
    return x, lm_head


def build(model: TailorForCausalLM, tokenizer: Any = None, accuracy_level: int = EXACT
          ) -> tuple[onnx.ModelProto, int]:
    """The ONNX model of `model`'s active network and the bytes of its weight initializers."""
    cfg = model.config
    if accuracy_level not in (EXACT, INT8_ACTIVATIONS):
        raise OnnxExportError(f"accuracy_level={accuracy_level}: use {EXACT} (exact) or {INT8_ACTIVATIONS} (fast, int8 activations)")
    if cfg.quant_format != "onnx":
        raise OnnxExportError(f"model quant_format={cfg.quant_format!r}: its fake quantization is not the ONNX grid "
                              "(fine-tune with quant_format='onnx' before exporting to ONNX)")
    g = _Graph(accuracy_level)
    x, lm_head = _embedding(g, "input_ids", model)
    cos, sin = _rotary_tables(g, "input_ids", cfg.head_dim, cfg.rope_theta, getattr(cfg, "rope_freq_scaling", None))
    kept = [i for i, b in enumerate(model.model.layers) if b.active]
    for j, i in enumerate(kept):  # dropped (inactive) layers are the identity: renumber the kept ones
        x = _layer(g, x, model.model.layers[i], j, cos, sin, cfg.rms_norm_eps)
    x = _rms(g, x, model.model.norm.weight, cfg.rms_norm_eps, "model.norm")
    lm_head(x)
    inp = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])
    graph = helper.make_graph(g.nodes, "tailor_llama", [inp], [out], initializer=g.inits)
    proto = helper.make_model(graph, producer_name="tailor", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
    meta = {"n_layers": len(kept), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "subnet": cfg.subnet,
            "tokenizer": getattr(tokenizer, "name_or_path", None), "accuracy_level": accuracy_level}
    helper.set_model_props(proto, {"tailor": json.dumps(meta, sort_keys=True, default=str)})
    return proto, g.weight_bytes


def export(model: TailorForCausalLM, tokenizer: Any, path: Path, accuracy_level: int = EXACT) -> dict[str, Any]:
    """Write `model` to `path` (temp file + rename); {"file_bytes", "weight_bytes", "sha256"}.

    accuracy_level is MatMulNBits's: EXACT (0) keeps activations float32, so the file computes what the
    fake-quantized torch model computes; INT8_ACTIVATIONS (4) quantizes them to int8 per 32-block,
    which onnxruntime 1.32 needs for fast 2- and 8-bit kernels (its float32 path for those widths
    dequantizes the whole matrix on every call) but moves results by ~0.5% relative."""
    path = Path(path)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise OnnxExportError(f"{path}: tokenizer has {len(tokenizer)} tokens, model vocab is {model.config.vocab_size}")
    with torch.no_grad():
        proto, weight_bytes = build(model, tokenizer, accuracy_level)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    files = [path]
    try:
        if weight_bytes < PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(tmp), save_as_external_data=False)
        else:  # a protobuf cannot hold it: weights go to one side file, named in the graph
            data = path.name + ".data"
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
            files.append(path.with_name(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file_bytes": sum(f.stat().st_size for f in files), "weight_bytes": int(weight_bytes),
            "sha256": sha256_files(files)}
