"""Scheme presets, named as llm-compressor names them: `quantize: {preset: W4A16}` is shorthand for the explicit
fields below, expanded before validation, so a preset and its explicit recipe have the same stage keys.

A preset fixes the scheme (bits, groups, symmetry); the algorithm stays the profile's (`method: gptq` with
`preset: W4A16` is GPTQ at W4A16), except where the scheme is a method of its own (FP8_DYNAMIC, NF4). An explicit
field that disagrees with the preset is refused (exit 2): which one is meant cannot be guessed.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

# The integer presets leave `method` alone (rtn when left out, or gptq / awq).
INT_METHODS = ("rtn", "gptq", "awq")

PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": {"bits": 4, "strategy": "group", "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"bits": 4, "strategy": "group", "group_size": 128, "symmetric": False},
    "W8A16": {"bits": 8, "strategy": "channel", "group_size": None, "symmetric": True},
    # FP8 E4M3 weights per channel, activations per token at run time: llm-compressor's FP8_DYNAMIC.
    "FP8_DYNAMIC": {"method": "fp8", "bits": 8, "strategy": "channel", "group_size": None},
    "NF4": {"method": "nf4"},
}

# llm-compressor names with no method here: said so, with what to use instead.
UNAVAILABLE = {
    "FP8": "static FP8 activation scales need activation calibration, which no method here does; "
           "use preset: FP8_DYNAMIC (activations scaled per token at run time)",
    "W8A8": "integer activations (SmoothQuant + INT8 activations) are not implemented; use preset: W8A16 or "
            "FP8_DYNAMIC",
    "FP8_BLOCK": "FP8 with 128x128 weight blocks is not implemented; use preset: FP8_DYNAMIC",
    "W4A8": "4-bit weights with 8-bit activations are not implemented; use preset: W4A16",
}


def _same(a: Any, b: Any) -> bool:
    """Equal and both booleans or both not (YAML `1` is not `true`)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def expand(quantize: Any) -> tuple[Any, str | None]:
    """`quantize:` with its preset expanded -> (the explicit mapping, the preset's name or None)."""
    if not isinstance(quantize, dict) or "preset" not in quantize:
        return quantize, None
    name = quantize["preset"]
    if not isinstance(name, str):  # a number, NaN, a list: not a name
        raise InputError(f"quantize.preset: a preset name, e.g. `preset: W4A16` (got {name!r}); known: "
                         f"{', '.join(PRESETS)}")
    key = name.upper()
    if key in UNAVAILABLE:
        raise InputError(f"quantize.preset: {name}: {UNAVAILABLE[key]}")
    if key not in PRESETS:
        raise InputError(f"quantize.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    recipe = PRESETS[key]
    given = {k: v for k, v in quantize.items() if k != "preset"}
    if "method" not in recipe and given.get("method", "rtn") not in INT_METHODS:
        raise InputError(f"quantize.method: {given['method']} does not take preset {key} (an integer scheme for "
                         f"{', '.join(INT_METHODS)}); drop the method or the preset")
    for field, value in recipe.items():
        if field in given and not _same(given[field], value):
            raise InputError(f"quantize.{field}: {given[field]!r} conflicts with preset {key} ({field}: "
                             f"{value!r}); drop one of the two")
    return {**recipe, **given}, key


def describe(quantize: dict[str, Any]) -> str:
    """The explicit recipe, one line: `method rtn, bits 4, strategy group, group_size 128, symmetric true`."""
    keys = ("method", "bits", "strategy", "group_size", "symmetric", "blocksize", "double_quant")
    shown = [f"{k} {str(quantize[k]).lower() if isinstance(quantize[k], bool) else quantize[k]}"
             for k in keys if k in quantize and quantize[k] is not None]
    return ", ".join(shown)
