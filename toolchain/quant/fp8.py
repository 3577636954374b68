"""FP8 E4M3 weight quantization with per-channel or per-tensor scales (the weights of FP8_DYNAMIC; activations
are quantized per token at run time by the serving kernel, so nothing is calibrated here)."""

from __future__ import annotations

import torch

from ..ir import QuantizedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(w: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> QuantizedLinear:
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if strategy == "channel" else wf.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = torch.clamp(wf / scale.float(), -FP8_MAX, FP8_MAX).to(FP8)
    meta = {"bits": 8, "strategy": strategy, "activations": "dynamic-per-token"}
    return QuantizedLinear("float8", tuple(w.shape), scale, weight_fp8=q, meta=meta)
