"""method: gptq: GPTQ's column sweep with the Hessian of calibration activations, block by block
(toolchain.quant.gptq)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Method, QuantizeBase, check_calibrated


class GPTQSpec(QuantizeBase):
    method: Literal["gptq"]
    # Dampening as a fraction of mean(diag(H)); act_order sweeps columns by decreasing diag(H); static_groups fixes
    # every group's range from the original weights before the sweep (with act_order and without it, groups are
    # formed in sweep order and g_idx is stored); observer picks a group's range: minmax (RTN's), mse, or
    # hessian_mse (range shrink searched, error weighted by diag(H)); true_sequential feeds each linear the outputs
    # of the already-quantized ones before it in the block.
    damp: float = Field(default=0.01, gt=0, le=1)
    act_order: bool = True
    static_groups: bool = True
    observer: Literal["minmax", "mse", "hessian_mse"] = "hessian_mse"
    true_sequential: bool = True

    @model_validator(mode="after")
    def _coherent(self) -> GPTQSpec:
        check_calibrated(self, "gptq")
        return self


METHOD = Method("gptq", GPTQSpec, "GPTQ", layerwise="toolchain.quant.gptq", version="2")
