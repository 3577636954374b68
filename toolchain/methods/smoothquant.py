"""method: smoothquant: W8A8 INT8, per-channel int8 weights and dynamic per-token int8 activations, with
SmoothQuant's migration of activation outliers into the weights (Xiao et al., 2023), alpha searched per layer on
the calibration samples and the scales folded into the preceding norm (toolchain.quant.smoothquant)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Method, QuantizeBase, check_calibrated


class SmoothQuantSpec(QuantizeBase):
    method: Literal["smoothquant"]
    bits: int = 8
    strategy: Literal["group", "channel", "tensor"] = "channel"
    group_size: int | None = None
    # Fixed migration strength (0: none, 1: all of it into the weights); left out, it is searched per layer
    # on a grid of `smoothquant_grid` points in [0, 1] for the smallest output error with both sides quantized.
    smoothquant_alpha: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    smoothquant_grid: int = Field(default=11, ge=2, le=101)

    @model_validator(mode="after")
    def _coherent(self) -> SmoothQuantSpec:
        check_calibrated(self, "smoothquant")
        if self.bits != 8 or self.strategy != "channel" or not self.symmetric:
            raise ValueError("smoothquant is W8A8: bits 8, strategy channel, symmetric (leave them out)")
        return self


METHOD = Method("smoothquant", SmoothQuantSpec, "SmoothQuant", layerwise="toolchain.quant.smoothquant",
                version="1", precision="int8")
