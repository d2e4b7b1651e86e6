"""The model seam: one module per model family knows how that family's Hugging Face config and tensors
map onto Tailor's decoder (`tailor.models.model`), and refuses by name what it cannot compute exactly.

Adding a family is adding a module here that defines a `Family` (see `_common.Family`) and listing it in
`FAMILIES`. Nothing else in the library reads a family's config keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tailor.models.families import llama, mistral, qwen2
from tailor.models.families._common import Family, ModelFileError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY)}


def family_of(hf_config: dict[str, Any], where: Path | str) -> Family:
    """The family of a Hugging Face `config.json` dict; ModelFileError naming `where` when unknown."""
    mt = hf_config.get("model_type")
    if mt not in FAMILIES:
        raise ModelFileError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[mt]


def tailor_config_kwargs(hf_config: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """`TailorConfig` keyword arguments for a Hugging Face config dict, checked by its family."""
    return family_of(hf_config, where).config_kwargs(hf_config, where)


__all__ = ["FAMILIES", "Family", "ModelFileError", "family_of", "tailor_config_kwargs"]
