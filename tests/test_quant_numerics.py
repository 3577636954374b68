"""RTN and FP8 numerics against a float64 reference written independently here."""

from __future__ import annotations

import pytest
import torch

from toolchain.quant.fp8 import FP8_MAX, quantize_fp8
from toolchain.quant.rtn import quantize_rtn


def reference_rtn(w: torch.Tensor, bits: int, gs: int, symmetric: bool) -> torch.Tensor:
    """Textbook RTN in float64, one group at a time (no shared code with toolchain.quant.rtn)."""
    out = torch.empty_like(w, dtype=torch.float64)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], gs):
            x = w[r, g : g + gs].double()
            mn, mx = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            if symmetric:
                s = max(-mn, mx) / ((hi - lo) / 2)
                z = 0
            else:
                s = (mx - mn) / (hi - lo)
                z = lo - round(mn / s)
            q = torch.clamp(torch.round(x / s) + z, lo, hi)
            out[r, g : g + gs] = (q - z) * s
    return out


@pytest.mark.parametrize("bits,gs,symmetric", [(4, 32, True), (4, 64, False), (8, 64, True), (8, 32, False)])
def test_rtn_matches_float64_reference(bits, gs, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    q = quantize_rtn(w, bits, gs, symmetric, "group", torch.float32)
    ours, ref = q.dequantize().double(), reference_rtn(w, bits, gs, symmetric)
    # Identical but for float32-vs-float64 rounding: a value sitting on a .5 tie (the group's extreme maps to
    # exactly +-7.5 in symmetric mode) may round the other way, which moves it by exactly one step.
    step = q.scale.double().repeat_interleave(gs, dim=1)
    off = (ours - ref).abs() > 0.01 * step  # float32 scale rounding moves values by far less
    assert ((ours - ref).abs()[off] <= step[off] * 1.001).all()
    assert off.float().mean() < 0.01
    assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1


def test_rtn_error_bound_and_exact_zero():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    w[0, :32] = 0  # an all-zero group must stay zero (no division by zero)
    q = quantize_rtn(w, 4, 32, False, "group", torch.float32)
    deq = q.dequantize()
    assert torch.all(deq[0, :32] == 0)
    step = q.scale.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all(), "asymmetric RTN never clips: error <= half a step"


def test_rtn_channel_and_tensor_strategies():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    ch = quantize_rtn(w, 8, None, True, "channel", torch.float32)
    assert ch.scale.shape == (8, 1)
    torch.testing.assert_close(ch.scale[:, 0], w.abs().amax(1) / 127.5)
    t = quantize_rtn(w, 8, None, True, "tensor", torch.float32)
    assert t.scale.numel() == 1
    assert (t.dequantize() - w).abs().max() <= t.scale.item()


def test_scales_are_rounded_to_storage_dtype_before_codes():
    torch.manual_seed(3)
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    q = quantize_rtn(w, 4, 32, True, "group", torch.bfloat16)
    assert q.scale.dtype == torch.bfloat16
    # Codes were computed with the stored (bf16) scale: re-deriving them from it gives the same codes.
    again = torch.clamp(torch.round(w.float() / q.scale.float().repeat_interleave(32, 1)), -8, 7).to(torch.int8)
    assert torch.equal(again, q.codes)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_against_direct_cast(strategy):
    torch.manual_seed(4)
    w = torch.randn(16, 64) * 0.1
    q = quantize_fp8(w, strategy, torch.float32)
    amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax()
    scale = amax.double() / 448.0
    direct = (w.double() / scale).float().to(torch.float8_e4m3fn)
    assert (q.weight_fp8.float() != direct.float()).float().mean() < 0.01  # float32 vs float64 scale ties
    rel = ((q.dequantize() - w).abs() / w.abs().clamp(min=1e-3)).median()
    assert rel < 2**-4, "E4M3 keeps 3 mantissa bits: relative error well under 1/16"
    assert q.weight_fp8.float().abs().max() <= FP8_MAX
