"""The base model: any supported source (`tailor.models.source`), converted once and cached as a plain
Tailor model directory (safetensors + tokenizer + `source.json` + `tokenizer.gguf`) under its content hash.

- A GGUF file (the built-ins are GGUF files): transformers reads it with `gguf_file=` (dequantizing its
  blocks) but flags the result as quantized, so we take its config and state dict and rebuild a plain
  Tailor model through the family seam. Whether the head is tied is read from the file itself (an
  `output.weight` tensor means untied), never assumed.
- A Hugging Face directory: `config.json` + `*.safetensors` (one file or shards) + tokenizer files.
The cached directory reloads in about a second; a test can slice it to its first few layers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tailor.arch import BaseArch
from tailor.hashing import sha256_file  # noqa: F401 (re-exported)
from tailor.models.families import ModelFileError, family_of, tailor_config_kwargs
from tailor.models.model import TailorConfig, TailorForCausalLM
from tailor.models.source import ModelSource, cache_dir, resolve

log = logging.getLogger(__name__)
# Bumped when the conversion changes what it writes: the cache key includes it, so no stale base survives.
CONVERT_VERSION = 2
# Tensors some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED = ("rotary_emb.inv_freq",)


def gguf_path(source: str | None = None) -> Path:
    """The GGUF file of a GGUF source (the default built-in when None)."""
    src = resolve(source)
    if src.kind != "gguf":
        raise ModelFileError(f"{src.path}: not a GGUF source")
    return src.path


def build_model(hf_config: dict[str, Any], state: dict[str, torch.Tensor], where: Path | str,
                source: dict | None = None) -> TailorForCausalLM:
    """A float32 Tailor model from a Hugging Face config dict and state dict, through the family seam.

    Refuses (ModelFileError naming `where`) a family or feature Tailor cannot compute, a missing or an
    unexpected tensor, and a tied config whose checkpoint holds a different `lm_head.weight`."""
    family = family_of(hf_config, where)
    cfg = TailorConfig(**tailor_config_kwargs(hf_config, where), source=source)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED)}
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise ModelFileError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                 "model.embed_tokens.weight (set tie_word_embeddings: false if the head is its own)")
    want = family.state_dict_keys(cfg.num_hidden_layers, cfg.tie_word_embeddings)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ModelFileError(f"{where}: tensors do not match a {family.model_type} of this config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = TailorForCausalLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def _read_gguf(src: ModelSource) -> tuple[dict, dict, Any]:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    reader = GGUFReader(src.path)
    names = {t.name for t in reader.tensors}
    tok = gguf_special_tokens(AutoTokenizer.from_pretrained(src.path.parent, gguf_file=src.path.name), reader)
    hf = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32)
    hf_config = hf.config.to_dict()
    hf_config["tie_word_embeddings"] = "output.weight" not in names  # the file decides, not a default
    hf_config.pop("quantization_config", None)  # transformers marks it GGUF; the tensors are dequantized floats
    state = dict(hf.state_dict())
    if hf_config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return hf_config, state, tok


GGUF_SPECIAL = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_special_tokens(tok: PreTrainedTokenizerBase, reader) -> PreTrainedTokenizerBase:
    """Set the tokenizer's begin/end/padding tokens to the ids the GGUF file itself names (its
    `tokenizer.ggml.*_token_id` keys, ggml's GGUF spec). transformers' GGUF reader does not always keep
    them: 5.17 returns SmolLM2's <|im_start|> (1) as eos and no pad, where the file says eos 2, pad 2;
    5.24 reads them right. The file decides. `reader`: a gguf.GGUFReader of the same file."""
    for attr, key in GGUF_SPECIAL.items():
        field = reader.fields.get(key)
        if field is None:
            continue
        i = int(field.parts[field.data[0]][0])
        if not 0 <= i < len(tok):
            raise ModelFileError(f"{key} = {i}: outside the file's {len(tok)}-token vocabulary")
        if getattr(tok, f"{attr}_id", None) != i:
            setattr(tok, attr, tok.convert_ids_to_tokens(i))
    return tok


def _read_hf_dir(src: ModelSource) -> tuple[dict, dict, Any]:
    path = src.path
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        what = f"pickled weights ({pickles[0]}) are refused, use safetensors" if pickles else "no *.safetensors"
        raise ModelFileError(f"{path}: {what}")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: every shard the index names must be there
        named = set(json.loads(index.read_text()).get("weight_map", {}).values())
        absent = sorted(named - {f.name for f in files})
        if absent:
            raise ModelFileError(f"{path}: shard {absent[0]} named in {index.name} is missing")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, "pt") as fh:
                for k in fh.keys():
                    if k in state:
                        raise ModelFileError(f"{f}: tensor {k} appears in two shards")
                    state[k] = fh.get_tensor(k)
        except ModelFileError:
            raise
        except Exception as e:  # safetensors raises several types for truncated/corrupt headers
            raise ModelFileError(f"{f}: unreadable safetensors ({e})") from None
    hf_config = json.loads((path / "config.json").read_text())
    return hf_config, state, load_tokenizer(path)


def _convert(src: ModelSource, dest: Path) -> None:
    """Source -> plain Tailor model + tokenizer + source.json + tokenizer.gguf in `dest` (written to a
    temp dir, renamed when complete)."""
    from tailor.export.gguf_vocab import write_tokenizer_gguf

    hf_config, state, tok = _read_gguf(src) if src.kind == "gguf" else _read_hf_dir(src)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFileError(f"{src.path}: NaN/Inf in {bad[0]}")
    model = build_model(hf_config, state, src.path, source={"name": src.name, "sha256": src.sha256})
    check_tokenizer(tok, model.config, src.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-base-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # the tokenizer as GGUF metadata, for export: the source's own fields, or built from tokenizer.json
        write_tokenizer_gguf(tmp / "tokenizer.gguf", tok, tmp, model.config.vocab_size,
                             src.path if src.kind == "gguf" else None)
        (tmp / "source.json").write_text(json.dumps(src.to_dict(), indent=1))
        try:
            os.replace(tmp, dest)
        except OSError:
            # another process converted the same content first (its key is the source's hash, and it renamed
            # a whole directory into place): keep that one; anything else is a real failure
            if not (dest / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_dir(source: str | ModelSource | None = None) -> Path:
    """Directory holding the cached plain base model of `source` (default: the built-in SmolLM2);
    converted on first use, keyed by the source's content hash."""
    src = source if isinstance(source, ModelSource) else resolve(source)
    dest = cache_dir() / f"base-{src.key}-c{CONVERT_VERSION}"
    if not (dest / "source.json").is_file():
        _convert(src, dest)
    return dest


def load_base(source: str | None = None, n_layers: int | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[TailorForCausalLM, PreTrainedTokenizerBase]:
    """The dense base model of `source` (optionally only its first `n_layers` layers) and its tokenizer."""
    path = base_dir(source)
    model = load_model_dir(path, n_layers=n_layers)
    tok = load_tokenizer(path, model)
    return model.to(device=device, dtype=dtype).eval(), tok


def base_source(source: str | None = None) -> dict[str, str]:
    """{"name", "kind", "path", "sha256"} of the base model (what runs and registry versions record)."""
    return json.loads((base_dir(source) / "source.json").read_text())


def check_tokenizer(tok: PreTrainedTokenizerBase, cfg, where: Path | str) -> None:
    """A tokenizer must fit the model it feeds: every id it produces inside the embedding (else an
    index error, or worse, silently wrong rows) and the same end/begin tokens (else generation and
    perplexity use the wrong ones)."""
    n = len(tok)
    if n > cfg.vocab_size:
        raise ModelFileError(f"{where}: tokenizer does not match the model ({n} tokens, model vocab_size "
                             f"{cfg.vocab_size})")
    for name in ("eos_token_id", "bos_token_id"):
        want, got = getattr(cfg, name, None), getattr(tok, name, None)
        if want is not None and got is not None and want != got:
            raise ModelFileError(f"{where}: tokenizer does not match the model (tokenizer {name} {got}, "
                                 f"config.json {want})")


def load_tokenizer(path: Path, model: TailorForCausalLM | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory, checked against the model when given."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: no usable tokenizer ({' '.join(str(e).split())[:160]})") from None
    if model is not None:
        check_tokenizer(tok, model.config, path)
    return tok


def is_tailor_dir(path: Path) -> bool:
    """A directory Tailor wrote (its config.json names Tailor's model type), not a Hugging Face checkpoint."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == TailorConfig.model_type
    except (OSError, ValueError):
        return False


def load_model_dir(path: Path, n_layers: int | None = None) -> TailorForCausalLM:
    """Load a model directory (safetensors only), checking the weights are finite: a Tailor directory as
    it is, a Hugging Face checkpoint through the family seam (converted once into the cache)."""
    path = Path(path)
    cfg_file = path / "config.json"
    weights = path / "model.safetensors"
    if not cfg_file.is_file():
        raise ModelFileError(f"{path}: no config.json")
    if not is_tailor_dir(path):
        path = base_dir(str(path))
        cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        what = f"pickled weights ({pickles[0]}) are refused, use safetensors" if pickles else "no model.safetensors"
        raise ModelFileError(f"{path}: {what}")
    cfg = TailorConfig.from_pretrained(path)
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise ModelFileError(f"{weights}: unreadable safetensors ({e})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFileError(f"{weights}: NaN/Inf in {bad[0]}")
    if n_layers is not None and n_layers < cfg.num_hidden_layers:
        cfg = slice_config(cfg, n_layers)
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    model = TailorForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".qclip")]  # no learned clipping stored = none (1.0)
    if missing or unexpected:
        raise ModelFileError(f"{weights}: does not match config.json (missing {missing[:2]}, unexpected {unexpected[:2]})")
    model.tie_weights()
    return model.eval()


def slice_config(cfg: TailorConfig, n_layers: int) -> TailorConfig:
    d = cfg.to_dict()
    d.update(num_hidden_layers=n_layers, layer_kv_heads=cfg.layer_kv_heads[:n_layers],
             layer_ffn=cfg.layer_ffn[:n_layers], layer_bits=cfg.layer_bits[:n_layers])
    return TailorConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})


def base_arch(model: TailorForCausalLM) -> BaseArch:
    return BaseArch.from_hf(model.config)


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp file + rename; the temp name is per process, since
    torchrun's ranks may write the same file)."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
