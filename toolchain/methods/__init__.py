"""The quantization methods: one module each (its profile model and its entry, toolchain.methods.base.Method).
Adding a method: its module here, its numerics (toolchain.quant), and its module named on the registry's import
line and in its tuple below.

`quantize:` in a profile stays flat: `method` picks the model (a discriminated union, rtn when left out), and an
option of another method is refused with that method's name."""

from __future__ import annotations

import operator
from functools import reduce
from typing import Annotated, Any

from pydantic import BeforeValidator, Discriminator, Tag

from . import awq, fp8, gptq, nf4, none, rtn, smoothquant
from .base import CalibrationSpec, Method, QuantizeBase

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (none, rtn, fp8, gptq, awq, nf4, smoothquant)}
DEFAULT = "rtn"


def _method_of(data: Any) -> Any:
    return data.get("method", DEFAULT) if isinstance(data, dict) else getattr(data, "method", None)


def _foreign_options(data: Any) -> Any:
    """An option of another method (damp with method: rtn) names the method it belongs to."""
    method = METHODS.get(_method_of(data))
    if not isinstance(data, dict) or method is None:
        return data
    own = method.spec.model_fields
    for other in METHODS.values():
        stray = sorted(k for k in data if k not in own and k in other.spec.own_fields())
        if stray:
            raise ValueError(f"{', '.join(stray)}: {other.label} options (method: {other.name})")
    return data


# One member per registered method, told apart by `method` (rtn when left out).
QuantizeSpec = Annotated[
    reduce(operator.or_, [Annotated[m.spec, Tag(m.name)] for m in METHODS.values()]),
    Discriminator(_method_of),
    BeforeValidator(_foreign_options),
]

__all__ = ["METHODS", "DEFAULT", "QuantizeSpec", "QuantizeBase", "CalibrationSpec", "Method"]
