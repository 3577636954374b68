"""Round-to-nearest integer weight quantization (INT4/INT8; symmetric or asymmetric; per group, channel or
tensor), in plain torch.

Conventions follow compressed-tensors so its own decompression reproduces our weights exactly:
  symmetric:  scale = max|w| / ((qmax - qmin) / 2),  zero = 0
  asymmetric: scale = (max(w, 0) - min(w, 0)) / (qmax - qmin),  zero = qmin - round(min(w, 0) / scale)
  codes = clamp(round(w / scale) + zero, qmin, qmax),  with signed qmin = -2^(b-1), qmax = 2^(b-1) - 1.
Scales are rounded to the storage dtype *before* the codes are computed, so what we store is what we meant.
"""

from __future__ import annotations

import torch

from ..ir import QuantizedLinear

EPS = torch.finfo(torch.float32).tiny


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_scale_zero(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) from per-group min/max, both shaped (..., n_groups)."""
    qmin, qmax = int_range(bits)
    wmin = torch.clamp(wmin, max=0)
    wmax = torch.clamp(wmax, min=0)
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax)
        scale = amax / ((qmax - qmin) / 2)
    else:
        scale = (wmax - wmin) / (qmax - qmin)
    # A zero group still needs a usable scale; the smallest normal of the storage dtype keeps codes at 0.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))
    scale = scale.to(scale_dtype)
    if symmetric:
        return scale, None
    zero = torch.clamp(qmin - torch.round(wmin / scale.float()), qmin, qmax).to(torch.int8)
    return scale, zero


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, g_idx: torch.Tensor
) -> torch.Tensor:
    """Integer codes of `w` (out, in) for given per-group scale/zero (out, n_groups) and column groups."""
    qmin, qmax = int_range(bits)
    s = scale.float()[:, g_idx]
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + zero.float()[:, g_idx]
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, strategy: str, scale_dtype: torch.dtype
) -> QuantizedLinear:
    out_f, in_f = w.shape
    wf = w.float()
    meta = {"bits": bits, "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size if strategy == "group" else None}
    if strategy == "tensor":
        scale, zero = compute_scale_zero(wf.min().reshape(1), wf.max().reshape(1), bits, symmetric, scale_dtype)
        qmin, qmax = int_range(bits)
        q = torch.round(wf / scale.float())
        if zero is not None:
            q = q + zero.float()
        codes = torch.clamp(q, qmin, qmax).to(torch.int8)
        return QuantizedLinear("int", (out_f, in_f), scale, codes=codes, zero=zero, meta=meta)
    gs = in_f if strategy == "channel" else group_size
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    grouped = wf.reshape(out_f, in_f // gs, gs)
    scale, zero = compute_scale_zero(grouped.amin(-1), grouped.amax(-1), bits, symmetric, scale_dtype)
    g_idx = torch.arange(in_f, device=w.device) // gs
    codes = quantize_with(wf, scale, zero, bits, g_idx)
    return QuantizedLinear("int", (out_f, in_f), scale, codes=codes, zero=zero, meta=meta)
