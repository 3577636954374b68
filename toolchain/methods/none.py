"""method: none: the weights are kept as they are (exporters write them unquantized)."""

from __future__ import annotations

from typing import Literal

from .base import Method, QuantizeBase


class NoneSpec(QuantizeBase):
    method: Literal["none"]


METHOD = Method("none", NoneSpec, "unquantized")
