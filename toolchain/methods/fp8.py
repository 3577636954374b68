"""method: fp8: FP8 E4M3 weights with per-channel, per-tensor or per-128x128-block scales; activations are quantized
per token (per 1x128 group for blocks) at run time by the serving kernel (toolchain.quant.fp8)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from .base import Method, QuantizeBase

BLOCK = (128, 128)  # toolchain.quant.fp8.BLOCK (this module stays torch-free)


class FP8Spec(QuantizeBase):
    method: Literal["fp8"]
    # Per-channel weights by default: leaving bits/strategy out must not trip the int4 defaults.
    bits: int = 8
    # block: 128x128 weight blocks, each with its scale, and activations in dynamic 1x128 groups (DeepSeek-V3,
    # Qwen3-FP8; compressed-tensors FP8_BLOCK, ModelOpt fp8_pb_wo).
    strategy: Literal["group", "channel", "tensor", "block"] = "channel"
    group_size: int | None = None

    @model_validator(mode="after")
    def _coherent(self) -> FP8Spec:
        if self.bits != 8:
            raise ValueError("fp8 is 8 bits: set bits: 8 (or leave it out)")
        if self.strategy == "group":
            raise ValueError("fp8 weights use strategy channel, tensor or block, not group")
        if self.strategy == "block" and self.group_size is not None:
            raise ValueError("fp8 strategy block uses 128x128 blocks (what every block-FP8 kernel takes); "
                             "remove group_size")
        return self


def check_block_shapes(cfg: dict[str, Any], q: Any) -> None:
    """Block FP8 kernels tile every quantized weight in whole 128x128 blocks: vLLM refuses a merged or
    tensor-parallel output partition (and a row-parallel input partition) that is not a multiple of 128
    (vllm/model_executor/layers/quantization/utils/fp8_utils.py validate_fp8_block_shape), and TensorRT-LLM's
    FP8_BLOCK_SCALES GEMM takes whole blocks. Said at plan time, naming the layer."""
    from .. import arch
    from ..errors import InputError

    if getattr(q, "method", None) != "fp8" or q.strategy != "block":
        return
    bo, bi = BLOCK
    bad = [(n, o, i) for n, o, i in arch.linear_shapes(cfg)
           if not arch.is_ignored(n, q.ignore) and (o % bo or i % bi)]
    if bad:
        name, o, i = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise InputError(f"quantize.strategy: block needs every quantized linear in whole {bo}x{bi} blocks; {name} "
                         f"is ({o}, {i}){more}. Add it to quantize.ignore, or use strategy: channel")


def quantize(w: Any, q: dict[str, Any], scale_dtype: Any) -> Any:
    from ..quant.fp8 import quantize_fp8

    return quantize_fp8(w, q["strategy"], scale_dtype)


METHOD = Method("fp8", FP8Spec, "FP8", tensor=quantize, same_bytes_on_gpu=True, precision="fp8")
