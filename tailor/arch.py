"""SubnetConfig: the one architecture object every stage hands to the next.

Per decoder layer it says whether the layer is kept, how many KV groups survive (query heads follow
their group so GQA stays valid), how wide the FFN is, and each weight matrix's quantization choice: a
bit-width (the format's type of that width) or a type name such as "Q4_K" (`tailor.quant.formats.Choice`).
It round-trips through dicts and JSON, hashes stably, and (with `tailor.quant.formats`) computes the
exact bytes of the file the device runtime loads.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Union

Choice = Union[int, str]  # = tailor.quant.formats.Choice (this module imports no grid at load time)

SCHEMA_VERSION = 1
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
FFN_STEP = 64  # FFN widths move in steps of 64 so every slice is whole 32-blocks of the down matrix


@dataclass(frozen=True)
class BaseArch:
    """Dimensions of the dense base model (what the supernet's max config equals)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True   # one table serves the embedding and the LM head; untied stores two
    qkv_bias: bool = False  # q/k/v projections carry float biases (Qwen2)

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, cfg: Any) -> "BaseArch":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            ffn=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", True)),
            qkv_bias=bool(getattr(cfg, "attention_bias", False)),
        )

    def matrix_shape(self, name: str, kv_groups: int, ffn: int) -> tuple[int, int]:
        """(rows, cols) = (out_features, in_features) of one weight matrix at the given widths."""
        q = kv_groups * self.q_per_kv * self.head_dim
        kv = kv_groups * self.head_dim
        return {
            "q": (q, self.hidden),
            "k": (kv, self.hidden),
            "v": (kv, self.hidden),
            "o": (self.hidden, q),
            "gate": (ffn, self.hidden),
            "up": (ffn, self.hidden),
            "down": (self.hidden, ffn),
        }[name]


@dataclass(frozen=True)
class LayerConfig:
    keep: bool
    kv_groups: int
    ffn: int
    bits: dict[str, Choice] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "kv_groups": self.kv_groups, "ffn": self.ffn,
                "bits": {m: dump_choice(self.bits[m]) for m in MATRICES}}


def _show(cs: Iterable[Choice]) -> list[Choice]:
    """Choices for a message: bit-widths in order, then type names."""
    return sorted(cs, key=lambda c: (isinstance(c, str), c if isinstance(c, int) else 0, str(c)))


def dump_choice(c: Choice) -> Choice:
    """A choice as JSON holds it: ints stay ints (configs from before named types hash the same)."""
    return c if isinstance(c, str) else int(c)


@dataclass(frozen=True)
class SubnetConfig:
    layers: tuple[LayerConfig, ...]
    embed_bits: int = 8
    version: int = SCHEMA_VERSION

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def max(cls, arch: BaseArch, bits: Choice = 16, embed_bits: int = 16) -> "SubnetConfig":
        layer = LayerConfig(True, arch.n_kv_heads, arch.ffn, {m: bits for m in MATRICES})
        return cls(tuple(layer for _ in range(arch.n_layers)), embed_bits=embed_bits)

    @classmethod
    def uniform(cls, arch: BaseArch, bits: Choice, embed_bits: int = 8, ffn_frac: float = 1.0,
                kv_groups: int | None = None, drop: Iterable[int] = ()) -> "SubnetConfig":
        ffn = round_ffn(arch.ffn * ffn_frac, arch.ffn)
        kv = arch.n_kv_heads if kv_groups is None else kv_groups
        dropped = set(drop)
        return cls(tuple(LayerConfig(i not in dropped, kv, ffn, {m: bits for m in MATRICES})
                         for i in range(arch.n_layers)), embed_bits=embed_bits)

    def with_layer(self, i: int, **changes: Any) -> "SubnetConfig":
        layers = list(self.layers)
        layers[i] = replace(layers[i], **changes)
        return replace(self, layers=tuple(layers))

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "embed_bits": self.embed_bits,
                "layers": [lc.to_dict() for lc in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetConfig":
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"SubnetConfig version {version!r} is not supported (expected {SCHEMA_VERSION})")
        from tailor.quant.formats import parse_choice
        layers = []
        for i, ld in enumerate(d["layers"]):
            missing = [m for m in MATRICES if m not in ld.get("bits", {})]
            if missing:
                raise ValueError(f"SubnetConfig layers[{i}].bits lacks {missing}")
            layers.append(LayerConfig(bool(ld["keep"]), int(ld["kv_groups"]), int(ld["ffn"]),
                                      {m: parse_choice(ld["bits"][m]) for m in MATRICES}))
        return cls(tuple(layers), embed_bits=int(d["embed_bits"]), version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "SubnetConfig":
        return cls.from_dict(json.loads(s))

    @property
    def hash(self) -> str:
        """Stable 16-hex id: the same architecture always gets the same id."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # ---- facts --------------------------------------------------------------------------------
    @property
    def kept(self) -> list[int]:
        return [i for i, lc in enumerate(self.layers) if lc.keep]

    def validate(self, arch: BaseArch, allowed_bits: Iterable[Choice] | None = None) -> None:
        """Raise ValueError naming the first field that cannot be built on `arch`: also a matrix whose
        columns are not whole blocks of its type (a K-quant's 256: `ffn_down` at an FFN width that is not
        a multiple of 256 cannot be Q4_K; llama.cpp would store another type)."""
        from tailor.quant.formats import block_of

        if len(self.layers) != arch.n_layers:
            raise ValueError(f"SubnetConfig has {len(self.layers)} layers, base has {arch.n_layers}")
        if not self.kept:
            raise ValueError("SubnetConfig drops every layer")
        allowed = set(allowed_bits) if allowed_bits is not None else None
        if allowed is not None and self.embed_bits not in allowed:
            raise ValueError(f"SubnetConfig embed_bits={self.embed_bits} not in allowed {_show(allowed)}")
        for i, lc in enumerate(self.layers):
            if not 1 <= lc.kv_groups <= arch.n_kv_heads:
                raise ValueError(f"SubnetConfig layers[{i}].kv_groups={lc.kv_groups} outside 1..{arch.n_kv_heads}")
            if not (FFN_STEP <= lc.ffn <= arch.ffn and lc.ffn % FFN_STEP == 0):
                raise ValueError(f"SubnetConfig layers[{i}].ffn={lc.ffn} must be a multiple of {FFN_STEP} in 64..{arch.ffn}")
            for m, b in lc.bits.items():
                if allowed is not None and b not in allowed:
                    raise ValueError(f"SubnetConfig layers[{i}].bits.{m}={b} not in allowed {_show(allowed)}")
                cols = arch.matrix_shape(m, lc.kv_groups, lc.ffn)[1]
                if cols % block_of(b):
                    raise ValueError(f"SubnetConfig layers[{i}].bits.{m}={b}: {b} needs the input dimension in whole "
                                     f"{block_of(b)}s, {m} has {cols} columns at kv_groups={lc.kv_groups}, ffn={lc.ffn}")

    def param_count(self, arch: BaseArch) -> int:
        """Parameters the exported model holds (a tied embedding counted once; norms and biases included)."""
        tables = 1 if arch.tied else 2
        n = tables * arch.vocab * arch.hidden + arch.hidden  # embedding (+ untied head) + final norm
        for lc in self.layers:
            if lc.keep:
                n += sum(r * c for r, c in (arch.matrix_shape(m, lc.kv_groups, lc.ffn) for m in MATRICES))
                n += 2 * arch.hidden + sum(_bias_sizes(arch, lc))
        return n

    def nbytes(self, arch: BaseArch, fmt: str) -> int:
        """Exact bytes of the weights in export format `fmt` (see tailor.quant.formats)."""
        from tailor.quant.formats import matrix_bytes

        total = fixed_bytes(arch, fmt, self.embed_bits)
        for lc in self.layers:
            if not lc.keep:
                continue
            for m in MATRICES:
                rows, cols = arch.matrix_shape(m, lc.kv_groups, lc.ffn)
                total += matrix_bytes(fmt, lc.bits[m], rows, cols)
            total += layer_vector_bytes(arch, fmt, lc.kv_groups)
        return total

    def bits_per_param(self, arch: BaseArch, fmt: str) -> float:
        """Effective bits per *base* parameter: the file's weight bytes over the dense model's
        parameter count, so pruning and quantization are compared on one scale (scales included)."""
        return 8.0 * self.nbytes(arch, fmt) / SubnetConfig.max(arch).param_count(arch)


def _bias_sizes(arch: BaseArch, lc: LayerConfig) -> tuple[int, ...]:
    """Lengths of a kept layer's q, k, v biases (none without qkv_bias)."""
    if not arch.qkv_bias:
        return ()
    kv = lc.kv_groups * arch.head_dim
    return (kv * arch.q_per_kv, kv, kv)


def fixed_bytes(arch: BaseArch, fmt: str, embed_bits: int) -> int:
    """Bytes every subnet holds whatever its layers: the token table (and an untied head, a second
    [vocab, hidden] table at the same bits) and the final norm."""
    from tailor.quant.formats import embedding_bytes, vector_bytes

    tables = 1 if arch.tied else 2
    return tables * embedding_bytes(fmt, embed_bits, arch.vocab, arch.hidden) + vector_bytes(fmt, arch.hidden)


def layer_vector_bytes(arch: BaseArch, fmt: str, kv_groups: int) -> int:
    """Bytes of a kept layer's float vectors: its two norms and, with qkv_bias, its q/k/v biases at
    `kv_groups` (they shrink with the pruned heads)."""
    from tailor.quant.formats import vector_bytes

    lc = LayerConfig(True, kv_groups, arch.ffn)
    return 2 * vector_bytes(fmt, arch.hidden) + sum(vector_bytes(fmt, n) for n in _bias_sizes(arch, lc))


def round_ffn(width: float, max_ffn: int) -> int:
    """Nearest legal FFN width (multiple of FFN_STEP, at least one step, at most the base width)."""
    return int(min(max_ffn, max(FFN_STEP, round(width / FFN_STEP) * FFN_STEP)))
