"""GPTQ's inner sweep over one block of columns as a single Triton kernel (CUDA only).

GPTQ treats the rows of W independently: within a block of B columns, each row's columns are quantized one
after the other and the rounding error of column j is spread over the later columns by row j of U (the upper
Cholesky factor of H^-1). The torch loop in toolchain.quant.gptq launches ~10 small kernels per column; here one
program owns R rows x B columns in registers and runs all B columns itself, so a block costs one launch.

Only for fixed group ranges (static groups, or one range per row): ranges computed from the updated columns
during the sweep stay with the torch loop. Arithmetic is the torch loop's: IEEE division, round half to even,
clamp to the code range, so codes agree with it except where a multiply-add rounds differently by an ulp
(checked side by side on the GPU: tests/test_gptq.py::test_triton_sweep_matches_the_torch_loop).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # no Triton (CPU-only installs): the torch loop does the sweep
    triton = None

ROWS = 16  # rows per program: 16 x 128 fp32 tiles stay in registers, and 4096-row weights fill an H100


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device` (TOOLCHAIN_GPTQ_TRITON=0 turns it off)."""
    return triton is not None and device.type == "cuda" and os.environ.get("TOOLCHAIN_GPTQ_TRITON", "1") != "0"


if triton is not None:

    @triton.jit
    def _sweep_kernel(w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, e_ptr, n_rows, n_cols, stride_w, stride_u, stride_s,
                      stride_q, qmin, qmax, HAS_ZERO: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        cols = tl.arange(0, B)
        rmask = rows < n_rows
        cmask = cols < n_cols
        m2 = rmask[:, None] & cmask[None, :]
        tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
        s_tile = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m2, other=1.0)
        if HAS_ZERO:
            z_tile = tl.load(z_ptr + rows[:, None] * stride_s + cols[None, :], mask=m2, other=0.0)
        q_tile = tl.zeros((R, B), dtype=tl.float32)
        e_tile = tl.zeros((R, B), dtype=tl.float32)
        for j in range(0, n_cols):
            sel = (cols == j)[None, :]
            w = tl.sum(tl.where(sel, tile, 0.0), axis=1)
            s = tl.sum(tl.where(sel, s_tile, 0.0), axis=1)
            q = libdevice.rint(tl.div_rn(w, s))
            if HAS_ZERO:
                z = tl.sum(tl.where(sel, z_tile, 0.0), axis=1)
                q = tl.minimum(tl.maximum(q + z, qmin), qmax)
                dq = (q - z) * s
            else:
                q = tl.minimum(tl.maximum(q, qmin), qmax)
                dq = q * s
            d = tl.load(u_ptr + j * stride_u + j)
            e = tl.div_rn(w - dq, d)
            u_row = tl.load(u_ptr + j * stride_u + cols, mask=cmask & (cols >= j), other=0.0)
            tile = tile - e[:, None] * u_row[None, :]
            q_tile = tl.where(sel, q[:, None], q_tile)
            e_tile = tl.where(sel, e[:, None], e_tile)
        tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q_tile.to(tl.int8), mask=m2)
        tl.store(e_ptr + rows[:, None] * stride_w + cols[None, :], e_tile, mask=m2)


def sweep_block(w1: torch.Tensor, u1: torch.Tensor, scale_cols: torch.Tensor, zero_cols: torch.Tensor | None,
                qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize columns w1 (out, b) in order with the OBS update inside the block. u1 (b, b): U's diagonal block;
    scale_cols/zero_cols (out, b): each column's float32 scale and zero. Returns (codes int8, errors e) (out, b),
    e_j = (w_j - dequant(q_j)) / U_jj, as the torch loop computes them."""
    out_f, b = w1.shape
    w1, u1, scale_cols = w1.contiguous(), u1.contiguous(), scale_cols.contiguous()
    zero_cols = zero_cols.contiguous() if zero_cols is not None else scale_cols
    codes = torch.empty(out_f, b, dtype=torch.int8, device=w1.device)
    errors = torch.empty_like(w1)
    width = triton.next_power_of_2(b)
    _sweep_kernel[(triton.cdiv(out_f, ROWS),)](
        w1, u1, scale_cols, zero_cols, codes, errors, out_f, b, w1.stride(0), u1.stride(0), scale_cols.stride(0),
        codes.stride(0), float(qmin), float(qmax), HAS_ZERO=zero_cols is not scale_cols, R=ROWS, B=width)
    return codes, errors
