"""One decode step's attention in one kernel (rotary, the cache write, attention over the cache), and its
float64 reference. Beyond Llama's attention: a q/k/v bias (Qwen2) and an RMSNorm over each head of q and k before
the rotary (Qwen3), both in float32 inside the same kernel."""

from __future__ import annotations

import torch

from ..config import EngineConfig
from .norm import rms_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references do the work
    triton = None

DEFAULTS = EngineConfig()

# -- decode attention -----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rotated(p_ptr, S: tl.constexpr, stride_ps, base, rd, cos, sin, sign, HALF: tl.constexpr, mask):
        # Rows of heads (base: one offset per row) summed over the partial slices, rotary applied in float32:
        # x cos + rotate_half(x) sin, rotate_half(x) = (-x[HALF:], x[:HALF]).
        partner = (rd + HALF) % (2 * HALF)
        x = tl.load(p_ptr + base[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(p_ptr + base[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(1, S):
            x += tl.load(p_ptr + s * stride_ps + base[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            y += tl.load(p_ptr + s * stride_ps + base[:, None] + partner[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        return x * cos[None, :] + sign[None, :] * y * sin[None, :]

    @triton.jit
    def _prepared(p_ptr, S: tl.constexpr, stride_ps, row, heads, rd, cos, sin, sign, HALF: tl.constexpr, mask, r,
                  b_ptr, HAS_BIAS: tl.constexpr, nw_ptr, NORM: tl.constexpr, HD: tl.constexpr, head_eps):
        # `_rotated` for heads with a bias or a norm (heads: each row's offset inside the q/k/v row): the sum of
        # the slices scaled by r (the split norm's 1 / rms, or 1), plus the bias, then RMSNorm over the head
        # (its weight nw), then the rotary. y is x permuted within its row, so one sum of squares serves both.
        partner = (rd + HALF) % (2 * HALF)
        base = row + heads
        x = tl.load(p_ptr + base[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(p_ptr + base[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(1, S):
            x += tl.load(p_ptr + s * stride_ps + base[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            y += tl.load(p_ptr + s * stride_ps + base[:, None] + partner[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        x, y = x * r, y * r
        if HAS_BIAS:
            x += tl.load(b_ptr + heads[:, None] + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            y += tl.load(b_ptr + heads[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            inv = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HD + head_eps)
            x = x * inv[:, None] * tl.load(nw_ptr + rd).to(tl.float32)[None, :]
            y = y * inv[:, None] * tl.load(nw_ptr + partner).to(tl.float32)[None, :]
        return x * cos[None, :] + sign[None, :] * y * sin[None, :]

    @triton.jit
    def _decode_attention(p_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, ss_ptr, S: tl.constexpr,
                              stride_ps, stride_pb, stride_cb, stride_ch, stride_cl, stride_ob, stride_cos,
                              stride_ssb, sm_scale, inv_n, eps, NH: tl.constexpr, NKV: tl.constexpr,
                              HD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr,
                              BLOCK_P: tl.constexpr, b_ptr, qn_ptr, kn_ptr, head_eps, HAS_BIAS: tl.constexpr,
                              QK_NORM: tl.constexpr, PRE: tl.constexpr):
        # One program per (sequence, KV head): its query heads as the rows of a tile of BLOCK_G >= 16 rows
        # (padded), so the cache is read once per group and q K^T, P V are tensor-core products. Rotary on q and
        # the new k (rotate-half form), the new k and v written into the cache at `pos`, then softmax(q K^T /
        # sqrt(d)) V over positions 0..pos-1 of the cache and the new token (from registers, as rounded for the
        # cache: nothing is read back that this launch wrote). P > 0: the product was of the un-normalized
        # input (residual_norm), and q, k, v are scaled here by the row's 1 / rms from its P partial sums of
        # squares (loaded first: their latency overlaps the rest).
        # One program per (sequence, KV head) also where that leaves most of the card idle (32 programs for
        # Llama-2-7B at batch 1): splitting the positions over 4 programs, combined by the last to finish,
        # made the decode step 0.2 ms slower on the H200 (BENCHMARKS.md).
        b, kvh = tl.program_id(0), tl.program_id(1)
        if P > 0:
            rp = tl.arange(0, BLOCK_P)
            r = 1.0 / tl.sqrt(tl.sum(tl.load(ss_ptr + b * stride_ssb + rp, mask=rp < P, other=0.0), 0) * inv_n + eps)
        G: tl.constexpr = NH // NKV
        HALF: tl.constexpr = HD // 2
        kdt = kc_ptr.dtype.element_ty
        rg = tl.arange(0, BLOCK_G)
        rd = tl.arange(0, HD)
        gmask = rg < G
        pos = tl.load(pos_ptr)
        cos = tl.load(cos_ptr + pos * stride_cos + rd).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cos + rd).to(tl.float32)
        sign = tl.where(rd < HALF, -1.0, 1.0)
        row = b * stride_pb
        one = rg < 1
        if PRE:  # a bias or q/k norms (Qwen2 / Qwen3): scale, bias and norm before the rotary (_prepared)
            if P > 0:
                rs = r
            else:
                rs = 1.0
            q = _prepared(p_ptr, S, stride_ps, row, (kvh * G + rg) * HD, rd, cos, sin, sign, HALF, gmask[:, None],
                          rs, b_ptr, HAS_BIAS, qn_ptr, QK_NORM, HD, head_eps)
            q = q * sm_scale
            k = _prepared(p_ptr, S, stride_ps, row, (NH + kvh) * HD + rg * 0, rd, cos, sin, sign, HALF,
                          one[:, None], rs, b_ptr, HAS_BIAS, kn_ptr, QK_NORM, HD, head_eps)
            v = tl.load(p_ptr + row + (NH + NKV + kvh) * HD + rd).to(tl.float32)
            for s in tl.static_range(1, S):
                v += tl.load(p_ptr + s * stride_ps + row + (NH + NKV + kvh) * HD + rd).to(tl.float32)
            v = v * rs
            if HAS_BIAS:
                v += tl.load(b_ptr + (NH + NKV + kvh) * HD + rd).to(tl.float32)
        else:  # Llama: the rotary on the sums, 1 / rms after it (it commutes)
            q = _rotated(p_ptr, S, stride_ps, row + (kvh * G + rg) * HD, rd, cos, sin, sign, HALF, gmask[:, None])
            q = q * sm_scale
            k = _rotated(p_ptr, S, stride_ps, row + (NH + kvh) * HD + rg * 0, rd, cos, sin, sign, HALF,
                         one[:, None])
            v = tl.load(p_ptr + row + (NH + NKV + kvh) * HD + rd).to(tl.float32)
            for s in tl.static_range(1, S):
                v += tl.load(p_ptr + s * stride_ps + row + (NH + NKV + kvh) * HD + rd).to(tl.float32)
            if P > 0:
                q, k, v = q * r, k * r, v * r
        k = tl.sum(k, 0).to(kdt)  # row 0 only (the others masked to zero)
        v = v.to(kdt)
        cache = b * stride_cb + kvh * stride_ch
        tl.store(kc_ptr + cache + pos * stride_cl + rd, k)
        tl.store(vc_ptr + cache + pos * stride_cl + rd, v)
        m = tl.sum(q * k.to(tl.float32)[None, :], 1)  # the new token's scores: a finite running maximum
        den = m * 0.0 + 1.0
        acc = tl.zeros((BLOCK_G, HD), tl.float32) + v.to(tl.float32)[None, :]
        qd = q.to(kdt)
        rl = tl.arange(0, BLOCK_L)
        for l0 in range(0, pos, BLOCK_L):
            lmask = (l0 + rl) < pos
            at = cache + (l0 + rl)[:, None] * stride_cl + rd[None, :]
            kb = tl.load(kc_ptr + at, mask=lmask[:, None], other=0.0)
            vb = tl.load(vc_ptr + at, mask=lmask[:, None], other=0.0)
            sc = tl.dot(qd, tl.trans(kb))
            sc = tl.where(lmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kdt), vb)
            m = m_new
        o = out_ptr + b * stride_ob + (kvh * G + rg)[:, None] * HD + rd[None, :]
        tl.store(o, acc / den[:, None], mask=gmask[:, None])


# Measured on the H200 (BENCHMARKS.md), Llama-2-7B heads, 160 cached positions: 64-position blocks at batch 1
# (6.2-6.5 us), 32 at batch 16 (13.9-14.6 us; 64: 18.6-20.1 us), 4 warps (EngineConfig.attention_warps).
def decode_attention(qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     pos: torch.Tensor, n_heads: int, n_kv: int, ss: torch.Tensor | None = None, n: int = 1,
                     eps: float = 0.0, warps: int = DEFAULTS.attention_warps, bias: torch.Tensor | None = None,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                     head_eps: float = 1e-6) -> torch.Tensor:
    """One decode step's attention from the q/k/v product's partial sums `qkv` (S, B, (n_heads + 2 n_kv) d):
    rotary at position `pos` (a 0-d device tensor), the new k and v written into the caches (B, n_kv, L, d) at
    `pos`, attention over positions 0..pos. Returns (B, n_heads d) in the caches' dtype. With `ss` (B, P), the
    partial sums of squares of residual_norm over n columns, q, k and v are first scaled by rms_scale(ss, n,
    eps): the product was taken of the norm's un-normalized output. `bias` ((n_heads + 2 n_kv) d) is added after
    that scale; `q_norm` and `k_norm` (d,) are the weights of an RMSNorm (epsilon head_eps) over each head of q and
    k, after the bias and before the rotary (Qwen3)."""
    s, b, _ = qkv.shape
    hd = kc.shape[-1]
    if hd & (hd - 1) or hd < 32 or n_heads % n_kv:
        raise ValueError(f"decode attention needs a power-of-two head size of at least 32 (got {hd}) and whole "
                         f"query groups ({n_heads} heads, {n_kv} KV heads)")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("decode attention normalizes q and k heads together: give both q_norm and k_norm or neither")
    out = torch.empty((b, n_heads * hd), device=qkv.device, dtype=kc.dtype)
    p = 0 if ss is None else ss.shape[1]
    _decode_attention[(b, n_kv)](
        qkv, kc, vc, cos, sin, pos, out, out if ss is None else ss, s, qkv.stride(0), qkv.stride(1), kc.stride(0),
        kc.stride(1), kc.stride(2), out.stride(0), cos.stride(0), 0 if ss is None else ss.stride(0), hd ** -0.5,
        1.0 / n, eps, NH=n_heads, NKV=n_kv, HD=hd, BLOCK_L=64 if b <= 4 else 32,
        BLOCK_G=max(16, triton.next_power_of_2(n_heads // n_kv)), P=p, BLOCK_P=triton.next_power_of_2(max(p, 1)),
        b_ptr=qkv if bias is None else bias, qn_ptr=qkv if q_norm is None else q_norm,
        kn_ptr=qkv if k_norm is None else k_norm, head_eps=head_eps, HAS_BIAS=bias is not None,
        QK_NORM=q_norm is not None, PRE=bias is not None or q_norm is not None, num_warps=warps)
    return out


def decode_attention_reference(qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, pos: int, n_heads: int, n_kv: int, ss: torch.Tensor | None = None,
                               n: int = 1, eps: float = 0.0, bias: torch.Tensor | None = None,
                               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                               head_eps: float = 1e-6) -> torch.Tensor:
    """The same step in plain torch, float64 (tests): returns the output and leaves the caches updated."""
    b = qkv.shape[1]
    hd = kc.shape[-1]
    x = qkv.double().sum(0)
    if ss is not None:
        x = x * rms_scale(ss.double(), n, eps)[:, None]
    if bias is not None:
        x = x + bias.double()
    q = x[:, : n_heads * hd].view(b, n_heads, hd)
    k = x[:, n_heads * hd : (n_heads + n_kv) * hd].view(b, n_kv, hd)
    v = x[:, (n_heads + n_kv) * hd :].view(b, n_kv, hd)
    if q_norm is not None:
        def head_norm(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + head_eps) * w.double()

        q, k = head_norm(q, q_norm), head_norm(k, k_norm)
    c, s = cos[pos].double(), sin[pos].double()

    def rot(t):
        return t * c + torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), -1) * s

    q, k = rot(q), rot(k)
    kc[:, :, pos] = k.to(kc.dtype)
    vc[:, :, pos] = v.to(vc.dtype)
    keys = kc[:, :, : pos + 1].double().repeat_interleave(n_heads // n_kv, 1)
    vals = vc[:, :, : pos + 1].double().repeat_interleave(n_heads // n_kv, 1)
    att = torch.softmax((q[:, :, None] @ keys.transpose(-1, -2)) / hd ** 0.5, -1) @ vals
    return att.reshape(b, n_heads * hd)
