"""method: nf4: bitsandbytes' 4-bit NormalFloat, one absmax per `blocksize` values of the flattened weight; the
bytes are bitsandbytes' own (toolchain.quant.nf4), so its version is part of the key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from .base import Method, QuantizeBase


class NF4Spec(QuantizeBase):
    method: Literal["nf4"]
    # double_quant stores the absmax values in 8 bits too (bitsandbytes' compress_statistics).
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> NF4Spec:
        if self.bits != 4:
            raise ValueError("nf4 is 4 bits: set bits: 4 (or leave it out)")
        unused = sorted({"group_size", "symmetric", "strategy", "scale_dtype"} & self.model_fields_set)
        if unused:
            raise ValueError(f"{', '.join(unused)}: not used by nf4 (blocks of `blocksize` values, each with a "
                             "float32 absmax, as bitsandbytes stores them); remove them")
        return self


def quantize(w: Any, q: dict[str, Any], scale_dtype: Any) -> Any:
    """bitsandbytes' own bytes; its absmax is always float32 (scale_dtype unused)."""
    from ..quant.nf4 import quantize_nf4

    return quantize_nf4(w, q["blocksize"], q["double_quant"])


METHOD = Method("nf4", NF4Spec, "NF4", tensor=quantize, key_libs=("bitsandbytes",), precision="nf4")
