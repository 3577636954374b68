"""method: fp8: FP8 E4M3 weights with per-channel or per-tensor scales; activations are quantized per token at run
time by the serving kernel (toolchain.quant.fp8)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from .base import Method, QuantizeBase


class FP8Spec(QuantizeBase):
    method: Literal["fp8"]
    # Per-channel weights by default: leaving bits/strategy out must not trip the int4 defaults.
    bits: int = 8
    strategy: Literal["group", "channel", "tensor"] = "channel"
    group_size: int | None = None

    @model_validator(mode="after")
    def _coherent(self) -> FP8Spec:
        if self.bits != 8:
            raise ValueError("fp8 is 8 bits: set bits: 8 (or leave it out)")
        if self.strategy == "group":
            raise ValueError("fp8 weights use strategy channel or tensor, not group")
        return self


def quantize(w: Any, q: dict[str, Any], scale_dtype: Any) -> Any:
    from ..quant.fp8 import quantize_fp8

    return quantize_fp8(w, q["strategy"], scale_dtype)


METHOD = Method("fp8", FP8Spec, "FP8", tensor=quantize, same_bytes_on_gpu=True, precision="fp8")
