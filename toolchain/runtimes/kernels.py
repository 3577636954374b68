"""Matrix products on quantized weights as stored, dequantized in registers (Triton), with plain-torch references.

Weights are read in the layout the artifact stores them (compressed-tensors, toolchain.runtimes.weights):
  int4  packed int32 (N, K/8): element k of a row in word k // 8, bits 4*(k % 8).., as unsigned q = code + 8;
        scale (N, K/group); zero (N, K/group) as unsigned z = zero + 8 (absent: 8). w = (q - z) * scale
  fp8   float8_e4m3fn (N, K) with one float32 scale per output channel. w = weight * scale
y = x @ w^T, x (M, K) in bf16/fp16/fp32, accumulated in float32.

Two kernel shapes, both splitting K across programs when N alone gives too few (atomic float32 adds):
  gemv  M <= GEMV_MAX_M: one program per (row block, K slice, token); multiply-add on the CUDA cores, reduced
        per group before the scale is applied (int4) or per row (fp8). Reads every packed byte once per token.
  dot   larger M: tiles dequantized to the activation dtype in registers, then tl.dot on the tensor cores.
Autotuned per (N, K) on the GPU. TRITON_INTERPRET=1 runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references below do the work
    triton = None

GEMV_MAX_M = 4
DOT_TUNED_MAX_M = 64  # above: prefill-sized products, one fixed tile shape (autotuning each length would cost more)
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2}  # the interpreter cannot autotune
# Products smaller than this (weights) take SMALL_CONFIG: autotuning them costs seconds and gains microseconds.
SMALL_WEIGHTS = 1 << 22
SMALL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1}


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device` (TOOLCHAIN_KERNELS=0 turns them off)."""
    if triton is None or os.environ.get("TOOLCHAIN_KERNELS", "1") == "0":
        return False
    return device.type == "cuda" or interpret()


# -- references (plain torch, any device) ---------------------------------------------------------------------

def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/8) int32 -> (N, K) int32 unsigned nibbles, element k from bits 4*(k % 8) of word k // 8."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).to(torch.float32)
    z = 8.0 if zero is None else zero.to(torch.float32).repeat_interleave(group, dim=1)
    return ((q - z) * scale.to(torch.float32).repeat_interleave(group, dim=1)).to(dtype)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (weight.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)).to(dtype)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 (E4M3) activations, as compressed-tensors' FP8_DYNAMIC scheme asks: one scale per
    row, amax / 448."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / fmax).clamp(min=1e-12)
    return (x.float() / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn), scale


# -- Triton kernels -------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _nibble_times_x(words, xi, NIBBLE: tl.constexpr):
        # Nibble NIBBLE of each word moved to mantissa bits 19..22 under exponent 0x3F8: the float 1 + q / 16, exactly,
        # in one shift and one and-or. The 1 is taken off per group (sum of x), so each weight costs three
        # instructions: shift, and-or, fused multiply-add.
        if 4 * NIBBLE <= 19:
            bits = (words << (19 - 4 * NIBBLE)) & 0x00780000
        else:
            bits = (words >> (4 * NIBBLE - 19)) & 0x00780000  # arithmetic shift: the mask drops the sign bits
        return (bits | 0x3F800000).to(tl.float32, bitcast=True) * xi[None, :]

    @triton.jit
    def _int4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_zn,
                      stride_ym, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # Tiles of (rows x packed words), nibble i of each word taken in turn as the float 1 + q/16 (three
        # instructions per weight); the activations of a block read once, contiguously, then split into the eight
        # nibble positions in registers. Zero point and scale are applied once per group, not per weight:
        #   sum_k (q_k - z) x_k = 16 (sum_k (1 + q_k/16) x_k - sum_k x_k) - z sum_k x_k
        # (the subtraction loses nothing: 1 + q/16 is in [1, 2)). BLOCK_K is a multiple of GROUP; a last block
        # past K is masked, so any K that whole groups divide works. Measured against the earlier 2^23 + q form
        # (shift, and-or, subtract, multiply-add per weight; activations gathered per nibble): 7-11% faster on
        # the Llama-2-7B linears, H200 (BENCHMARKS.md).
        pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        W: tl.constexpr = BLOCK_K // 8
        G: tl.constexpr = BLOCK_K // GROUP
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rw = tl.arange(0, W)
        rk = tl.arange(0, BLOCK_K)
        rg = tl.arange(0, G)
        acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        for c in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k0 = c * BLOCK_K
            wmask = (k0 + rw * 8) < K
            words = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 8 + rw)[None, :],
                            mask=nmask[:, None] & wmask[None, :], other=0, eviction_policy="evict_first")
            xa = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
            even, odd = tl.split(tl.reshape(xa, (W, 2, 2, 2)))  # element 8 w + i: i % 2, then (i // 2) % 2, i // 4
            e0, e1 = tl.split(even)
            o0, o1 = tl.split(odd)
            x0, x4 = tl.split(e0)
            x2, x6 = tl.split(e1)
            x1, x5 = tl.split(o0)
            x3, x7 = tl.split(o1)
            t = _nibble_times_x(words, x0, 0) + _nibble_times_x(words, x1, 1)
            t += _nibble_times_x(words, x2, 2) + _nibble_times_x(words, x3, 3)
            t += _nibble_times_x(words, x4, 4) + _nibble_times_x(words, x5, 5)
            t += _nibble_times_x(words, x6, 6) + _nibble_times_x(words, x7, 7)
            fx = tl.sum(tl.reshape(t, (BLOCK_N, G, GROUP // 8)), axis=2)
            xg = tl.sum(tl.reshape(xa, (G, GROUP)), axis=1)
            gi = k0 // GROUP + rg
            gmask = nmask[:, None] & ((gi * GROUP) < K)[None, :]
            s = tl.load(s_ptr + rn[:, None] * stride_sn + gi[None, :], mask=gmask, other=0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn[:, None] * stride_zn + gi[None, :], mask=gmask, other=8).to(tl.float32)
            else:
                z = tl.full((BLOCK_N, G), 8.0, tl.float32)
            acc += (16.0 * (fx - xg[None, :]) - z * xg[None, :]) * s
        out = tl.sum(acc, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + rn, out, mask=nmask)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + rn, out, mask=nmask)

    @triton.jit
    def _fp8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for c in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k0 = c * BLOCK_K
            kmask = (k0 + rk) < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + rn, out, mask=nmask)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + rn, out, mask=nmask)

    @triton.jit
    def _wq_dot(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # Weight tiles are loaded K-major, (BLOCK_K, BLOCK_N), so tl.dot needs no transpose. INT4: one dot per
        # nibble position i, on the columns k = 8 j + i (no reshapes), each tile dequantized in registers.
        # A last block past K is masked.
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k0 = c * BLOCK_K
            if INT4:
                W: tl.constexpr = BLOCK_K // 8
                rw = tl.arange(0, W)
                wmask = (k0 + rw * 8) < K
                words = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 // 8 + rw)[:, None],
                                mask=nmask[None, :] & wmask[:, None], other=0)
                g = (k0 + rw * 8) // GROUP
                s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=nmask[None, :] & wmask[:, None],
                            other=0)
                s = s.to(tl.float32)
                if HAS_ZERO:
                    zc = tl.load(z_ptr + rn[None, :] * stride_zn + g[:, None], mask=nmask[None, :] & wmask[:, None],
                                 other=8)
                    zc = zc.to(tl.float32) + 8388608.0
                else:
                    zc = tl.full((W, BLOCK_N), 8388616.0, tl.float32)
                for i in tl.static_range(8):
                    x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rw * 8 + i)[None, :],
                                mask=mmask[:, None] & wmask[None, :], other=0.0)
                    qi = ((words >> (4 * i)) & 0xF) | 0x4B000000
                    w = ((qi.to(tl.float32, bitcast=True) - zc) * s).to(x.dtype)
                    acc += tl.dot(x, w, out_dtype=tl.float32)
            else:
                rk = tl.arange(0, BLOCK_K)
                kmask = (k0 + rk) < K
                x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mmask[:, None] & kmask[None, :],
                            other=0.0)
                w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None], mask=nmask[None, :] & kmask[:, None],
                            other=0.0)
                acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)  # E4M3 values are exact in bf16 / fp16
        if not INT4:
            acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc, mask=mmask[:, None] & nmask[None, :])
        else:
            tl.atomic_add(ptrs, acc, mask=mmask[:, None] & nmask[None, :])

    def _gemv_configs():
        # Enough programs in flight matter most at one token: a 4096-row product in 64-row blocks is 64 programs
        # for 132 multiprocessors. Small row blocks and K split across programs fill the card.
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw)
                for bn, nw in ((8, 1), (16, 2), (32, 4), (64, 4)) for bk in (256, 512) for sk in (2, 4, 8)]

    def _fp8_gemv_configs():
        # The FP8 GEMV keeps a (BLOCK_N, BLOCK_K) float32 accumulator (one reduction at the end): 64 per thread.
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw)
                for bn, bk, nw in ((16, 256, 2), (16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 128, 4))
                for sk in (1, 4, 8)]

    def _dot_configs():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4,
                              num_stages=3)
                for bn in (32, 64, 128) for bk in (128, 256) for sk in (1, 2, 4, 8)]

    def _prune_gemv(configs, named_args, **kwargs):
        """Configs whose K block holds whole groups (the INT4 GEMV applies scales per group) and whose split of K
        leaves every program some blocks (a last block past K is masked)."""
        k, group = named_args["K"], kwargs.get("GROUP", 1)
        ok = [c for c in configs if c.kwargs["BLOCK_K"] % group == 0
              and c.kwargs["SPLIT_K"] <= triton.cdiv(k, c.kwargs["BLOCK_K"])]
        return ok or [triton.Config({**configs[0].kwargs, "BLOCK_K": group, "SPLIT_K": 1}, num_warps=4)]

    def _prune_dot(configs, named_args, **kwargs):
        k = named_args["K"]
        return [c for c in configs if c.kwargs["SPLIT_K"] <= triton.cdiv(k, c.kwargs["BLOCK_K"])] or configs[:1]

    _TUNED: dict[str, object] = {}

    def _tuned(name: str, kernel, configs, key, prune):
        if name not in _TUNED:
            _TUNED[name] = triton.autotune(configs=configs(), key=key, reset_to_zero=["y_ptr"],
                                           prune_configs_by={"early_config_prune": prune})(kernel)
        return _TUNED[name]


def _default_config(n: int, k: int) -> dict | None:
    """Fixed launch parameters where autotuning is impossible (interpreter) or not worth it; None: autotune."""
    if interpret():
        return INTERPRET_CONFIG
    return SMALL_CONFIG if n * k < SMALL_WEIGHTS else None


def _pick_block_k(group: int, prefer: int) -> int:
    """A K block of at least `prefer` that holds whole groups (a last block past K is masked)."""
    return max(prefer, group)


def _check_group(k: int, group: int) -> None:
    if group < 8 or group & (group - 1) or k % group:
        raise ValueError(f"the INT4 kernels need a power-of-two group of at least 8 that divides K (group {group}, "
                         f"K={k})")

def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                config: dict | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(int4)^T -> (M, N) in x's dtype, by the Triton kernels. `config` fixes the launch
    parameters (tests, interpreter); otherwise they are autotuned."""
    m, k = x.shape
    n = packed.shape[0]
    _check_group(k, group)
    config = config or _default_config(n, k)
    y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    z = zero if zero is not None else scale  # never read without HAS_ZERO
    args = (x, packed, scale, z, y)
    if m <= GEMV_MAX_M:
        strides = (x.stride(0), packed.stride(0), scale.stride(0), z.stride(0), y.stride(0))
        if config is None:
            kern = _tuned("int4_gemv", _int4_gemv, _gemv_configs, ["N", "K", "GROUP"], _prune_gemv)
            kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"], m)](
                *args, n, k, *strides, GROUP=group, HAS_ZERO=zero is not None)
        else:
            bk = _pick_block_k(group, config.get("BLOCK_K", 128))
            _int4_gemv[(triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"], m)](
                *args, n, k, *strides, GROUP=group, HAS_ZERO=zero is not None, BLOCK_N=config["BLOCK_N"],
                BLOCK_K=bk, SPLIT_K=config["SPLIT_K"])
    else:
        _dot(x, packed, scale, z, y, True, group, zero is not None, config)
    return y.to(x.dtype)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None
               ) -> torch.Tensor:
    """x (M, K) @ (weight * scale)^T, weight-only: x stays in its dtype (no activation quantization)."""
    m, k = x.shape
    n = weight.shape[0]
    config = config or _default_config(n, k)
    y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    s = scale.reshape(-1).to(torch.float32).contiguous()
    if m <= GEMV_MAX_M:
        strides = (x.stride(0), weight.stride(0), y.stride(0))
        if config is None:
            kern = _tuned("fp8_gemv", _fp8_gemv, _fp8_gemv_configs, ["N", "K"], _prune_gemv)
            kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"], m)](x, weight, s, y, n, k, *strides)
        else:
            bk = config.get("BLOCK_K", 128)
            _fp8_gemv[(triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"], m)](
                x, weight, s, y, n, k, *strides, BLOCK_N=config["BLOCK_N"], BLOCK_K=bk, SPLIT_K=config["SPLIT_K"])
    else:
        _dot(x, weight, s, s, y, False, 1, False, config)
    return y.to(x.dtype)


def _dot(x, w, s, z, y, int4: bool, group: int, has_zero: bool, config: dict | None) -> None:
    m, k = x.shape
    n = w.shape[0]
    strides = (x.stride(0), w.stride(0), s.stride(0), z.stride(0), y.stride(0))
    if config is None and m > DOT_TUNED_MAX_M:
        config = LARGE_M_CONFIG
    if config is None:
        kern = _tuned("wq_dot", _wq_dot, _dot_configs, ["N", "K", "INT4", "GROUP", "M"], _prune_dot)
        kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"], triton.cdiv(m, c["BLOCK_M"]))](
            x, w, s, z, y, m, n, k, *strides, INT4=int4, GROUP=group, HAS_ZERO=has_zero)
    else:
        bk = config.get("BLOCK_K", 128)  # tl.dot on BLOCK_K / 8 columns per nibble: at least 128
        bm, bn, sk = config["BLOCK_M"], config["BLOCK_N"], config["SPLIT_K"]
        _wq_dot[(triton.cdiv(n, bn), sk, triton.cdiv(m, bm))](
            x, w, s, z, y, m, n, k, *strides, INT4=int4, GROUP=group, HAS_ZERO=has_zero, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, SPLIT_K=sk)


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: dynamic per-token FP8 activations times per-channel FP8 weights on the FP8 tensor cores
    (torch._scaled_mm, row-wise scales; CUDA compute capability >= 8.9)."""
    xq, xs = quantize_fp8_per_token(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.reshape(1, -1).to(torch.float32),
                            out_dtype=x.dtype)
