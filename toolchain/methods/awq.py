"""method: awq: activation-aware scales searched on calibration samples, then integer codes, block by block
(toolchain.quant.awq)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Method, QuantizeBase, check_calibrated


class AWQSpec(QuantizeBase):
    method: Literal["awq"]
    # Points of the scale search's alpha grid in [0, 1]; clipping search of each group's range; fold the scales
    # into the preceding norm/linear (false: keep them as pre_quant_scale).
    awq_grid: int = Field(default=20, ge=2, le=200)
    awq_clip: bool = True
    awq_fold: bool = True

    @model_validator(mode="after")
    def _coherent(self) -> AWQSpec:
        check_calibrated(self, "awq")
        return self


METHOD = Method("awq", AWQSpec, "AWQ", layerwise="toolchain.quant.awq", version="1")
