"""RMSNorm of the decode step spread over many programs (residual_norm), and the SiLU product that applies
its scale (silu_product), each with its float64 reference."""

from __future__ import annotations

import torch

from ..config import EngineConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references do the work
    triton = None

DEFAULTS = EngineConfig()

# -- the residual add and RMSNorm of a decode step, across many programs -------------------------------------
# RMSNorm's 1 / rms is one number per row, so it commutes with the linear that follows: W (w h / rms) =
# (W (w h)) / rms. residual_norm stores h and w h and, per program, its share of the sum of squares of h; the
# consumer of the next product (the attention kernel, the SiLU product) applies the scale. A norm computed
# whole needs every column of a row in one program: one program per row at batch 1, which on the H200 took
# 4.6-6.3 us per norm, two norms per block (BENCHMARKS.md). Columns per program, measured on the H200 in the
# decoder (Llama-2-7B, batch 1): 128 for the norm (256: 0.02 ms per step slower), 128 for silu_product (256:
# 0.014 ms slower; 1,024: 2.0 us per call where inductor's kernel, more programs, took 1.2): EngineConfig's
# norm_block and silu_block.

if triton is not None:

    @triton.jit
    def _residual_norm(h_ptr, d_ptr, w_ptr, hout_ptr, u_ptr, ss_ptr, N, stride_ds, stride_dm, stride_hm,
                       stride_ssm, S: tl.constexpr, BLOCK: tl.constexpr):
        # h + (the sum of the S partial sums d, cast to h's dtype: as `summed(d).to(h.dtype)` rounds it), then
        # u = w h in h's dtype and the sum of squares of this program's columns of h (float32).
        m, p = tl.program_id(0), tl.program_id(1)
        cols = p * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(h_ptr + m * stride_hm + cols, mask=mask, other=0.0)
        if S > 0:
            d = tl.load(d_ptr + m * stride_dm + cols, mask=mask, other=0.0)
            for s in tl.static_range(1, S):
                d += tl.load(d_ptr + s * stride_ds + m * stride_dm + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + d.to(h.dtype).to(tl.float32)).to(h.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        hf = h.to(tl.float32)
        tl.store(hout_ptr + m * stride_hm + cols, h, mask=mask)
        tl.store(u_ptr + m * stride_hm + cols, (w.to(tl.float32) * hf).to(h.dtype), mask=mask)
        tl.store(ss_ptr + m * stride_ssm + p, tl.sum(hf * hf, 0))

    @triton.jit
    def _silu_product(p_ptr, ss_ptr, out_ptr, INTER, stride_ps, stride_pm, stride_ssm, stride_om, inv_n, eps,
                      S: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
        # The gate/up product's partial sums (S, M, 2 INTER) summed, scaled by the row's 1 / rms, then
        # silu(gate) * up in out's dtype.
        m, c = tl.program_id(0), tl.program_id(1)
        rp = tl.arange(0, BLOCK_P)
        ss = tl.sum(tl.load(ss_ptr + m * stride_ssm + rp, mask=rp < P, other=0.0), 0)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INTER
        row = p_ptr + m * stride_pm + cols
        gate = tl.load(row, mask=mask, other=0.0)
        up = tl.load(row + INTER, mask=mask, other=0.0)
        for s in tl.static_range(1, S):
            gate += tl.load(row + s * stride_ps, mask=mask, other=0.0)
            up += tl.load(row + s * stride_ps + INTER, mask=mask, other=0.0)
        r = 1.0 / tl.sqrt(ss * inv_n + eps)
        gate, up = gate * r, up * r
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + m * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def norm_programs(n: int, block: int = DEFAULTS.norm_block) -> int:
    """How many partial sums of squares residual_norm returns per row of n columns."""
    return -(-n // block)


def residual_norm(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, block: int = DEFAULTS.norm_block
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (M, N) plus the partial sums d (S, M, N) float32 (or None), and RMSNorm's weight w (N,): returns the new
    h, u = w h (both in h's dtype) and ss (M, norm_programs(N, block)) float32, partial sums of squares of the new h
    (`block` columns per program).
    RMSNorm(h) W^T = rms_scale(ss, N, eps) * (u W^T)."""
    h = h.contiguous()
    m, n = h.shape
    hout, u = torch.empty_like(h), torch.empty_like(h)
    ss = torch.empty((m, norm_programs(n, block)), device=h.device, dtype=torch.float32)
    s = 0 if d is None else d.shape[0]
    d = h if d is None else d.contiguous()
    _residual_norm[(m, ss.shape[1])](h, d, w, hout, u, ss, n, d.stride(0) if s else 0, d.stride(1) if s else 0,
                                      h.stride(0), ss.stride(0), S=s, BLOCK=block,
                                      num_warps=max(1, min(4, block // 128)))
    return hout, u, ss


def rms_scale(ss: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """1 / rms per row from residual_norm's partial sums of squares (M, P), as P - 1 adds (fuses when compiled)."""
    total = ss[:, 0]
    for i in range(1, ss.shape[1]):
        total = total + ss[:, i]
    return torch.rsqrt(total / n + eps)


def residual_norm_reference(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor,
                            block: int = DEFAULTS.norm_block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """residual_norm in plain torch: the same roundings to h's dtype, sums of squares in float64 (tests)."""
    if d is not None:
        h = (h.double() + d.double().sum(0).to(h.dtype).double()).to(h.dtype)
    u = (w.double() * h.double()).to(h.dtype)
    m, n = h.shape
    p = norm_programs(n, block)
    hf = torch.nn.functional.pad(h.double(), (0, p * block - n))
    return h, u, (hf.view(m, p, block) ** 2).sum(-1)


def silu_product(parts: torch.Tensor, ss: torch.Tensor, n: int, eps: float, dtype: torch.dtype,
                 block: int = DEFAULTS.silu_block) -> torch.Tensor:
    """The MLP's silu(gate) * up from the gate/up product's partial sums (S, M, 2 I) of residual_norm's w h,
    scaled by rms_scale(ss, n, eps) first: (M, I) in `dtype`. One launch (inductor, given the same expression,
    computed the scale in kernels of its own: two more launches per block on the H200)."""
    s, m, two_i = parts.shape
    parts = parts.contiguous()
    out = torch.empty((m, two_i // 2), device=parts.device, dtype=dtype)
    _silu_product[(m, triton.cdiv(two_i // 2, block))](
        parts, ss, out, two_i // 2, parts.stride(0), parts.stride(1), ss.stride(0), out.stride(0), 1.0 / n, eps,
        S=s, P=ss.shape[1], BLOCK_P=triton.next_power_of_2(ss.shape[1]), BLOCK=block, num_warps=2)
    return out


def silu_product_reference(parts: torch.Tensor, ss: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """silu_product in float64 (tests)."""
    gu = parts.double().sum(0) * rms_scale(ss.double(), n, eps)[:, None]
    inter = gu.shape[-1] // 2
    return torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
