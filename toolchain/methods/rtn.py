"""method: rtn: round-to-nearest integer codes per group or channel, symmetric or with a zero point
(toolchain.quant.rtn)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from .base import Method, QuantizeBase, check_int_recipe


class RTNSpec(QuantizeBase):
    method: Literal["rtn"] = "rtn"

    @model_validator(mode="after")
    def _coherent(self) -> RTNSpec:
        check_int_recipe(self, "rtn")
        return self


def quantize(w: Any, q: dict[str, Any], scale_dtype: Any) -> Any:
    from ..quant.rtn import quantize_rtn

    return quantize_rtn(w, q["bits"], q["group_size"], q["symmetric"], q["strategy"], scale_dtype)


METHOD = Method("rtn", RTNSpec, "RTN", tensor=quantize, same_bytes_on_gpu=True)
