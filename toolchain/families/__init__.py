"""The decoder families: one module each (llama, mistral, qwen2, qwen3), one registry line each below.

    family_of(config)  -> Family   the family of a config.json (dict), or UnsupportedModel naming what is supported
    check(config)                  family_of + the family's feature checks (sliding window, rope scaling, ...)
    named_shapes()                 every named synthetic shape (`--source synthetic --arch qwen3-8b`)

What a Family says is documented in toolchain.families.base. Torch-free: read at plan time.
"""

from __future__ import annotations

from typing import Any

from . import llama, mistral, qwen2, qwen3
from .base import FUSED, Family, Shapes, SmoothPair, UnsupportedModel, block_prefix, rope_parameters

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}

# Families people ask for that are not here yet, and why (the error says it).
_NOT_YET = {
    "mixtral": "Mixture-of-Experts (routers and 3-D expert tensors) is not implemented yet",
    "qwen2_moe": "Mixture-of-Experts is not implemented yet",
    "qwen3_moe": "Mixture-of-Experts is not implemented yet",
    "deepseek_v3": "Mixture-of-Experts with multi-head latent attention is not implemented",
    "gpt_oss": "Mixture-of-Experts with attention sinks and MXFP4 experts is not implemented",
}


def supported() -> str:
    """'llama (LlamaForCausalLM), mistral (...)': what error messages list."""
    return ", ".join(f"{', '.join(f.model_types)} ({', '.join(f.architectures)})" for f in FAMILIES.values())


def family_of(config: dict[str, Any]) -> Family:
    mt = config.get("model_type")
    fam = _BY_MODEL_TYPE.get(mt)  # type: ignore[arg-type]
    if fam is None:
        why = f": {_NOT_YET[mt]}" if mt in _NOT_YET else ""
        raise UnsupportedModel(f"model_type {mt!r} is not supported{why}. Supported model types: {supported()}")
    return fam


def check(config: dict[str, Any]) -> Family:
    """The config's family, after refusing what it has that nothing here implements."""
    fam = family_of(config)
    fam.check(config)
    return fam


def named_shapes() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in FAMILIES.values():
        out.update(f.shapes)
    return out


__all__ = ["FAMILIES", "FUSED", "Family", "Shapes", "SmoothPair", "UnsupportedModel", "block_prefix", "check",
           "family_of", "named_shapes", "rope_parameters", "supported"]
