"""FP8 E4M3 weight quantization with per-channel, per-tensor or per-128x128-block scales (the weights of FP8_DYNAMIC
and FP8_BLOCK; activations are quantized per token, or per 1x128 group, at run time by the serving kernel, so
nothing is calibrated here)."""

from __future__ import annotations

import torch

from ..ir import QuantizedLinear, expand_block_scale

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# DeepSeek-V3 / Qwen3-FP8's blocks, the only ones vLLM's CUTLASS/DeepGEMM kernels, TensorRT-LLM's
# FP8_BLOCK_SCALES and compressed-tensors' FP8_BLOCK preset use.
BLOCK = (128, 128)


__all__ = ["BLOCK", "FP8", "FP8_MAX", "block_amax", "expand_block_scale", "quantize_fp8"]


def block_amax(wf: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """|w| max of each (block[0] x block[1]) tile, (ceil(out/b0), ceil(in/b1)); a ragged edge tile is padded with
    zeros (compressed-tensors and ModelOpt pad the same way), which changes no maximum."""
    (out_f, in_f), (bo, bi) = wf.shape, block
    po, pi = -out_f % bo, -in_f % bi
    padded = torch.nn.functional.pad(wf.abs(), (0, pi, 0, po))
    return padded.reshape((out_f + po) // bo, bo, (in_f + pi) // bi, bi).amax(dim=(1, 3))


def quantize_fp8(w: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> QuantizedLinear:
    wf = w.float()
    if strategy == "block":
        amax = block_amax(wf)
    else:
        amax = wf.abs().amax(dim=1, keepdim=True) if strategy == "channel" else wf.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    full = expand_block_scale(scale.float(), wf.shape) if strategy == "block" else scale.float()
    q = torch.clamp(wf / full, -FP8_MAX, FP8_MAX).to(FP8)
    meta = {"bits": 8, "strategy": strategy, "activations": "dynamic-per-token"}
    if strategy == "block":
        meta.update(block_structure=list(BLOCK), activations="dynamic-per-token-group", act_group_size=BLOCK[1])
    return QuantizedLinear("float8", tuple(w.shape), scale, weight_fp8=q, meta=meta)

