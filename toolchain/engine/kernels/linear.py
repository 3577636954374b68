"""Linears: products on quantized weights as stored, dequantized in registers (Triton), with plain-torch references.

Weights are read in the layout the artifact stores them (compressed-tensors, toolchain.engine.weights):
  int4  packed int32 (N, K/8): element k of a row in word k // 8, bits 4*(k % 8).., as unsigned q = code + 8;
        scale (N, K/group); zero (N, K/group) as unsigned z = zero + 8 (absent: 8). w = (q - z) * scale
  fp8   float8_e4m3fn (N, K) with one float32 scale per output channel. w = weight * scale
y = x @ w^T, x (M, K) in bf16/fp16/fp32, accumulated in float32.

INT4 weights of groups that are multiples of 128 and row counts that 16 divides are, on the GPU, first permuted
once into mma tiles (`tile_int4`: the same codes, scales and zero points, laid out as the tensor cores' fragments;
`untile_int4` inverts it exactly) and multiplied by `int4_tiled_partials` (below). Elsewhere (other groups, the
interpreter) they are read as stored by three kernel shapes. Each splits K across `split_k(N, K, M)` programs
when N alone gives too few; every program stores its own partial sums, (split, M, N) float32, and the caller adds
them (in the compiled decoder that sum and the cast fuse into the next elementwise kernel: no zero-fill, no
atomics, no separate cast, deterministic).
  gemv     M <= GEMV_MAX_M: multiply-add on the CUDA cores, reduced per group before the scale is applied (int4)
           or per row (fp8; bf16 / fp16 weights take the same kernel without scales). Reads every packed byte
           once per token.
  int4_tc  larger M, INT4 groups of at least 128 (16 packed words): each nibble position unpacked to 16-bit
           floats (128 + q in bf16, 1024 + q in fp16: an and-or per two weights, `lop3` in PTX), multiplied on
           the tensor cores, zero point and scale applied once per group. At M=16 on the H200 1.4-2.3x faster
           than dot; at M=1 7-80% slower than gemv (BENCHMARKS.md).
  dot      larger M otherwise: tiles dequantized to the activation dtype in registers, then tl.dot.
  tiled    INT4 mma tiles, any M: each warp takes 16 rows and one group of 128 of K per step, 8 packed words
           per thread, unpacked two weights per `lop3` (128 + q in bf16, 1024 + q in fp16) straight into the
           A fragments of `mma.sync.m16n8k16` (no shared memory, no shuffle), x as the B fragment (the 8 columns
           of the product are 8 rows of x; a grid dimension takes further chunks of 8), a second mma with an
           all-ones A gives the group's sum of x for the zero point. Per weight about 2.1 instructions where the
           CUDA-core GEMV needs about 4.5: on the H200 at M=1 (the Llama-2-7B linears, the runtime's split)
           1.4-1.5x faster except the smallest (4096 x 4096, as fast); 1.1-2.0x faster than int4_tc at M=16;
           a decode step 17-19 % shorter (BENCHMARKS.md).
Autotuned per (N, K) on the GPU. TRITON_INTERPRET=1 runs the same kernels on the CPU (tests), except the tiled
one (PTX); its layout is tested on the CPU by the fragment rules of the PTX ISA (tests/test_int4_tiles.py).
"""

from __future__ import annotations

import os

import torch

from ..config import EngineConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references below do the work
    triton = None

GEMV_MAX_M = 4
TC_MIN_GROUP = 128  # the tensor-core INT4 kernel needs K tiles of at least 16 packed words per group
DOT_TUNED_MAX_M = 64  # above: prefill-sized products, one fixed tile shape (autotuning each length would cost more)
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}  # the interpreter cannot autotune
# Products smaller than this (weights) take SMALL_CONFIG: autotuning them costs seconds and gains microseconds.
SMALL_WEIGHTS = 1 << 22
SMALL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}
# The variant switches (tiles, dense GEMV, split norm, groups per slice, block sizes) are no module globals: each
# function takes what it needs as an argument, from the model's EngineConfig; these are the defaults.
DEFAULTS = EngineConfig()


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_k(n: int, k: int, m: int) -> int:
    """How many programs share each output's K. Fixed by the shape alone (not autotuned), so that the partial sums'
    shape is known before the kernel runs (torch.compile traces it): a slice of at least 1,024 of K per program,
    at most 8 slices; none for small products (SmolLM2-sized) and prefill-sized M."""
    if interpret():
        return 2  # the tests then cover the sum of partials
    if n * k < SMALL_WEIGHTS or m > DOT_TUNED_MAX_M:
        return 1
    return max(1, min(8, k // 1024))


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device` (EngineConfig.kernels decides whether they do)."""
    if triton is None:
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


# -- INT4 mma tiles ----------------------------------------------------------------------------------------
# A tile is 16 rows x one group of 128 columns: 32 lanes x 8 words, lane L's word s holding its A fragment of
# mma.m16n8k16 k-step s (PTX ISA, "Matrix Fragments for mma.m16n8k16": a0,a1 row L/4, a2,a3 row L/4 + 8, a4..a7
# the same rows 8 columns on; registers of two 16-bit values), nibble 4 h + 2 b + ro at bits 4 (ro + 2 b) + 16 h:
# register ro + 2 b = (word >> 4 (ro + 2 b)) & 0x000F000F, its half h. Inside a group the k of fragment column
# 2 j + 8 b + h (j = L % 4) at step s is 32 j + 4 s + 2 b + h (any order of k does, applied to W and x alike):
# lane j's x over the 8 steps are then 32 contiguous values, four 16-byte loads. Scales and zero points are
# stored (tiles, groups, 16 rows), each lane's two rows 8 apart.
TILE_ROWS, TILE_K = 16, 128
# Up to EngineConfig.tiled_max_m rows (16) the tiled kernel runs (chunks of 8 rows sharing each tile's words
# through L2; on the H200 M=4 took 1.0-1.05x the time of M=1, M=16 0.5-0.9x int4_tc's); above, the tiles go back
# to the stored layout for the tensor-core kernels (not measured against the tiles there yet).


def tiles_fit(n: int, k: int, group: int) -> bool:
    """Whether an (n, k) INT4 weight of this group can be tiled: 16 divides n, group a multiple of 128 dividing k."""
    return n % TILE_ROWS == 0 and group % TILE_K == 0 and k % group == 0


def _tile_view(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    # (n, k) -> (tiles, k groups, r, j, s, h, b, ro): row 16 t + 8 ro + r, column 128 g + 32 j + 4 s + 2 b + h
    return q.reshape(n // 16, 2, 8, k // 128, 4, 8, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1)


def tile_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stored INT4 (packed (N, K/8) int32, scale and zero (N, K/group)) -> the same values as mma tiles, each
    tensor of its stored shape and dtype. A permutation: `untile_int4` gives back the stored words bit for bit."""
    n, k = packed.shape[0], packed.shape[1] * 8
    if not tiles_fit(n, k, group):
        raise ValueError(f"INT4 tiles need 16 | N and a group that is a multiple of 128 dividing K (N={n}, K={k}, "
                         f"group {group})")
    q = _tile_view(unpack_int4(packed), n, k).reshape(n // 16, k // 128, 32, 8, 8)
    words = pack_nibbles(q).reshape(n, k // 8)

    def rows_last(t: torch.Tensor) -> torch.Tensor:  # (N, G) -> (tiles, G, 16) in the same (N, G) shape
        return t.reshape(n // 16, 16, -1).transpose(1, 2).contiguous().reshape(n, -1)

    return words, rows_last(scale), (rows_last(zero) if zero is not None else None)


def untile_int4(words: torch.Tensor) -> torch.Tensor:
    """mma tiles (N, K/8) int32 -> the stored layout (tests, references)."""
    n, k = words.shape[0], words.shape[1] * 8
    q = unpack_int4(words).reshape(n // 16, k // 128, 8, 4, 8, 2, 2, 2)  # (t, g, r, j, s, h, b, ro)
    return pack_nibbles(q.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(n, k // 8, 8))


def untile_rows(t: torch.Tensor) -> torch.Tensor:
    """Tiled scales or zero points (N, G) -> the stored layout."""
    n = t.shape[0]
    return t.reshape(n // 16, -1, 16).transpose(1, 2).contiguous().reshape(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 8) nibbles -> int32 words, nibble i at bits 4 i (the inverse of unpack_int4; an int64 sum, then the
    same 32 bits as int32)."""
    w = (q.to(torch.int64) << torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def tiles_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the tiled INT4 kernel runs here: compiled Triton on a CUDA card of compute capability >= 8.0
    (mma.sync with bf16), bf16 or fp16 activations (EngineConfig.int4_tiles decides whether it does)."""
    if interpret() or not available(device):
        return False
    return dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(device)[0] >= 8


def tiled_split(n: int, k: int, m: int, groups_per_slice: int = DEFAULTS.tiled_groups_per_slice) -> int:
    """Programs per output sharing K in the tiled kernel: about `groups_per_slice` groups of 128 each, at most
    16. Measured on the H200 in the decoder (Llama-2-7B, batch 1), side by side: with norms of one program per
    row, eight groups per program 2.146 ms per step, four 2.195, two 2.370 (each partial sum costs the norm
    that reads it); with residual_norm spread over many programs, eight 1.879, four 1.792, two 1.887. Each warp
    walks its groups one round trip to memory at a time (two groups per loop step, loads first, was slower:
    ptxas interleaved the second group's loads with the first's products)."""
    if interpret():
        return 2
    return max(1, min(16, k // TILE_K // groups_per_slice))


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
    def _int4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, KW, SPLIT, stride_xm, stride_wn, stride_sn, stride_zn,
                   stride_ys, stride_ym, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1):
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
        for c in tl.range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT, num_stages=STAGES):  # STAGES > 1: loads run ahead
            k0 = c * BLOCK_K
            # KW = K / 8 as an argument: Triton sees that 16 divides it, so the mask is constant over runs of 4
            # words and each load a 16-byte vector (a mask on k0 + 8 w made every word a 4-byte load)
            wmask = (k0 // 8 + rw) < KW
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
            t = _nibble_times_x(words, x0, 0)  # one chain: each product a fused multiply-add into t
            t += _nibble_times_x(words, x1, 1)
            t += _nibble_times_x(words, x2, 2)
            t += _nibble_times_x(words, x3, 3)
            t += _nibble_times_x(words, x4, 4)
            t += _nibble_times_x(words, x5, 5)
            t += _nibble_times_x(words, x6, 6)
            t += _nibble_times_x(words, x7, 7)
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
        tl.store(y_ptr + pid_k * stride_ys + m * stride_ym + rn, tl.sum(acc, axis=1), mask=nmask)

    def _unpack_asm(magic: str) -> str:
        # Two words per call (pack=2): `prmt` gathers bytes 0-1 (then 2-3) of both into one register, then one
        # `lop3` per nibble position leaves (q & 0xF) | magic in each 16-bit half: 128 + q as bf16 (0x4300),
        # 1024 + q as fp16 (0x6400), exactly. Sixteen 16-bit floats for 2 + 6 + 8 = 16 instructions.
        lines = ["{", ".reg .b32 lo, hi, s;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
        for i in range(8):
            src = "lo" if i < 4 else "hi"
            if i % 4:
                lines.append(f"shr.u32 s, {src}, {4 * (i % 4)};")
                src = "s"
            lines.append(f"lop3.b32 ${i}, {src}, 0x000F000F, {magic}, 0xEA;")
        return "\n".join([*lines, "}"])

    _UNPACK_BF16 = tl.constexpr(_unpack_asm("0x43004300"))
    _UNPACK_FP16 = tl.constexpr(_unpack_asm("0x64006400"))

    @triton.jit
    def _nibbles_asm(words, UNPACK: tl.constexpr, DT: tl.constexpr):
        # The asm text comes from the caller as a constant: Triton 3.6 refuses a function whose branches return
        # different dtypes even when the condition is a constant (seen on the H200 with fp16 activations).
        return tl.inline_asm_elementwise(asm=UNPACK, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r", args=[words],
                                         dtype=(DT.value,) * 8, is_pure=True, pack=2)

    @triton.jit
    def _nibble(words, NIB: tl.constexpr, DT: tl.constexpr, BASE: tl.constexpr):
        # The same values in plain Triton (the interpreter has no PTX; its dot misreads bit-cast bf16), exact:
        # base + q has at most 11 significant bits.
        return (((words >> (4 * NIB)) & 0xF).to(tl.float32) + BASE).to(DT)

    @triton.jit
    def _int4_tc(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, SPLIT, stride_xm, stride_wn, stride_sn, stride_zn,
                 stride_ys, stride_ym, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, UNPACK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One group of K per step: its GROUP / 8 words per row, (BLOCK_N, W), rows contiguous in memory; nibble
        # position i of every word is the weight at column k0 + 8 w + i, so eight tensor-core products of
        # (BLOCK_N, W) x (W, BLOCK_M) cover the group with no shuffle of the weights: y^T = W x^T, the unpacked
        # weights the first operand (measured on the H200: 1.4-2.2x faster at M=16 than with x first).
        # The products hold sum x (base + q); the group's zero point and scale come after:
        #   sum x (q - z) s = s (sum x (base + q) - (base + z) sum x).
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        W: tl.constexpr = GROUP // 8
        DT: tl.constexpr = x_ptr.dtype.element_ty
        BASE: tl.constexpr = 128.0 if DT == tl.bfloat16 else (1024.0 if DT == tl.float16 else 0.0)
        IEEE: tl.constexpr = DT == tl.float32
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        rw = tl.arange(0, W)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(pid_k, K // GROUP, SPLIT):
            k0 = g * GROUP
            words = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 8 + rw)[None, :], mask=nmask[:, None], other=0,
                            eviction_policy="evict_first")
            if UNPACK != "":  # the PTX of _unpack_asm; empty in the interpreter
                q0, q1, q2, q3, q4, q5, q6, q7 = _nibbles_asm(words, UNPACK, DT)
            else:
                q0, q1, q2, q3 = _nibble(words, 0, DT, BASE), _nibble(words, 1, DT, BASE), \
                    _nibble(words, 2, DT, BASE), _nibble(words, 3, DT, BASE)
                q4, q5, q6, q7 = _nibble(words, 4, DT, BASE), _nibble(words, 5, DT, BASE), \
                    _nibble(words, 6, DT, BASE), _nibble(words, 7, DT, BASE)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q0, 0, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q1, 1, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q2, 2, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q3, 3, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q4, 4, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q5, 5, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q6, 6, IEEE)
            part, xsum = _nibble_dot(part, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q7, 7, IEEE)
            sc = tl.load(s_ptr + rn * stride_sn + g, mask=nmask, other=0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_zn + g, mask=nmask, other=8).to(tl.float32) + BASE
            else:
                z = tl.full((BLOCK_N,), 8.0 + BASE, tl.float32)
            acc += (part - z[:, None] * xsum[None, :]) * sc[:, None]
        tl.store(y_ptr + pid_k * stride_ys + rm[None, :] * stride_ym + rn[:, None], acc,
                 mask=mmask[None, :] & nmask[:, None])

    @triton.jit
    def _nibble_dot(acc, xsum, x_ptr, rm, mmask, stride_xm, k0, rw, q, NIB: tl.constexpr, IEEE: tl.constexpr):
        xi = tl.load(x_ptr + rm[None, :] * stride_xm + (k0 + rw * 8 + NIB)[:, None], mask=mmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(q, xi, acc, input_precision="ieee")
        else:
            acc = tl.dot(q, xi, acc)
        return acc, xsum + tl.sum(xi.to(tl.float32), axis=0)

    @triton.jit
    def _scaled_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, SPLIT, stride_xm, stride_wn, stride_ys, stride_ym,
                     HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1):
        # Weights of any float dtype (FP8 with one scale per row; bf16 / fp16 without), float32 accumulation.
        pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for c in tl.range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT, num_stages=STAGES):
            k0 = c * BLOCK_K
            kmask = (k0 + rk) < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 + rk)[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out = out * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_k * stride_ys + m * stride_ym + rn, out, mask=nmask)

    @triton.jit
    def _wq_dot(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, SPLIT, stride_xm, stride_wn, stride_sn, stride_zn,
                stride_ys, stride_ym, INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Weight tiles are loaded K-major, (BLOCK_K, BLOCK_N), so tl.dot needs no transpose. INT4 (groups below
        # TC_MIN_GROUP): one dot per nibble position i, on the columns k = 8 j + i (no reshapes), each tile
        # dequantized in registers. A last block past K is masked.
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT):
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
        tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :], acc,
                 mask=mmask[:, None] & nmask[None, :])

    def _tile_asm(fp16: bool) -> str:
        # One group for one warp: $0-$3 the product's C fragment, $4-$7 the sum of x (all-ones A), both from zero;
        # $8-$15 the lane's 8 words (k-steps 0-7), $16-$31 its x pairs (step s: registers 2 s, 2 s + 1).
        magic, one = ("0x64006400", "0x3C003C00") if fp16 else ("0x43004300", "0x3F803F80")
        ty = "f16" if fp16 else "bf16"
        mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
        lines = ["{", ".reg .b32 a0, a1, a2, a3, t, one;", f"mov.b32 one, {one};"]
        lines += [f"mov.f32 ${i}, 0f00000000;" for i in range(8)]
        for s in range(8):
            w = f"${8 + s}"
            lines.append(f"lop3.b32 a0, {w}, 0x000F000F, {magic}, 0xEA;")
            for r in (1, 2, 3):
                lines += [f"shr.u32 t, {w}, {4 * r};", f"lop3.b32 a{r}, t, 0x000F000F, {magic}, 0xEA;"]
            b = f"{{${16 + 2 * s}, ${17 + 2 * s}}}"
            lines.append(f"{mma} {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {b}, {{$0, $1, $2, $3}};")
            lines.append(f"{mma} {{$4, $5, $6, $7}}, {{one, one, one, one}}, {b}, {{$4, $5, $6, $7}};")
        return "\n".join([*lines, "}"])

    _TILE_BF16 = tl.constexpr(_tile_asm(False))
    _TILE_FP16 = tl.constexpr(_tile_asm(True))
    _TILE_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 24))

    @triton.jit
    def _int4_tiled(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, KG, SPLIT, stride_xm, stride_ys, stride_ym,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, FP16: tl.constexpr):
        # x_ptr: the activations as int32 pairs; KG = K / 128. One program = one warp = one 16-row tile (launched
        # with num_warps=1), each thread 4 elements of 128-element tensors laid out as Triton lays them out (4
        # consecutive per thread, then lanes): element 4 L + e is lane L's e-th value, so the inline PTX below sees
        # its own fragment.
        # Outputs: C fragment element e of lane L is row L/4 + 8 (e // 2), column 2 (L % 4) + e % 2 (x row).
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        BASE: tl.constexpr = 1024.0 if FP16 else 128.0
        i = tl.arange(0, 128)
        e = i % 4
        lane = (i // 4) % 32
        tile = pid_n
        r, j = lane // 4, lane % 4
        xrow = pid_m * 8 + r
        xmask = xrow < M
        srow = r + 8 * (e // 2)
        total = tl.zeros((128,), tl.float32)
        for g in range(pid_k, KG, SPLIT):
            wo = ((tile * KG + g) * 32 + lane) * 8 + e
            wa = tl.load(w_ptr + wo, eviction_policy="evict_first")
            wb = tl.load(w_ptr + wo + 4, eviction_policy="evict_first")
            xo = xrow * stride_xm + g * 64 + j * 16 + e
            x0 = tl.load(x_ptr + xo, mask=xmask, other=0)
            x1 = tl.load(x_ptr + xo + 4, mask=xmask, other=0)
            x2 = tl.load(x_ptr + xo + 8, mask=xmask, other=0)
            x3 = tl.load(x_ptr + xo + 12, mask=xmask, other=0)
            if FP16:
                acc, xs = tl.inline_asm_elementwise(asm=_TILE_FP16, constraints=_TILE_CONSTRAINTS,
                                                    args=[wa, wb, x0, x1, x2, x3], dtype=(tl.float32, tl.float32),
                                                    is_pure=True, pack=4)
            else:
                acc, xs = tl.inline_asm_elementwise(asm=_TILE_BF16, constraints=_TILE_CONSTRAINTS,
                                                    args=[wa, wb, x0, x1, x2, x3], dtype=(tl.float32, tl.float32),
                                                    is_pure=True, pack=4)
            so = (tile * (KG // (GROUP // 128)) + g // (GROUP // 128)) * 16 + srow
            sc = tl.load(s_ptr + so).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + so).to(tl.float32) + BASE
            else:
                z = 8.0 + BASE
            # sum x (base + q) s - (base + z) s sum x = s sum x (q - z)
            total += (acc - z * xs) * sc
        col = pid_m * 8 + 2 * j + e % 2
        tl.store(y_ptr + pid_k * stride_ys + col * stride_ym + tile * 16 + srow, total, mask=col < M)

    @triton.jit
    def _untile(w_ptr, out_ptr, KW, KG, total, BLOCK: tl.constexpr):
        # Stored word (n, w) holds columns 8 w .. 8 w + 7 of row n: in the tiles, k-steps s = 2 (w % 4) and s + 1
        # of lane 4 r + j (r = n % 8, j = (w % 16) // 4), nibbles 2 b + ro and 4 + 2 b + ro for b = 0, 1
        # (ro = (n % 16) // 8): two loads per word.
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = o < total
        n, w = o // KW, o % KW
        ro = (n % 16) // 8
        src = (((n // 16) * KG + w // 16) * 32 + 4 * (n % 8) + (w % 16) // 4) * 8 + 2 * (w % 4)
        out = tl.zeros((BLOCK,), tl.int32)
        for half in tl.static_range(2):  # columns 4 half .. 4 half + 3: step s + half
            word = tl.load(w_ptr + src + half, mask=mask, other=0)
            for c in tl.static_range(4):  # column 4 half + c: b = c // 2, h = c % 2
                nib = (word >> (4 * (ro + 2 * (c // 2)) + 16 * (c % 2))) & 0xF
                out = out | (nib << (4 * (4 * half + c)))
        tl.store(out_ptr + o, out, mask=mask)

    def _gemv_configs():
        # Enough programs in flight matter most at one token: a 4096-row product in 64-row blocks is 64 programs
        # for 132 multiprocessors. Small row blocks (and K split across programs, split_k) fill the card.
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=nw)
                for bn, nw in ((8, 1), (16, 2), (32, 4), (64, 4)) for bk in (256, 512) for st in (1, 3)]

    def _scaled_gemv_configs():
        # The FP8 GEMV keeps a (BLOCK_N, BLOCK_K) float32 accumulator (one reduction at the end): 64 per thread.
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=nw)
                for bn, bk, nw in ((8, 256, 1), (16, 256, 2), (16, 512, 4), (32, 256, 4), (32, 512, 8),
                                   (64, 128, 4)) for st in (1, 3)]

    def _tc_configs():
        return [triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                for bn in (64, 128) for nw in (4, 8) for ns in (2, 3, 4)]

    def _dot_configs():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3)
                for bn in (32, 64, 128) for bk in (128, 256)]

    def _prune_gemv(configs, named_args, **kwargs):
        """Configs whose K block holds whole groups (the INT4 GEMV applies scales per group)."""
        group = kwargs.get("GROUP", 1)
        ok = [c for c in configs if c.kwargs["BLOCK_K"] % group == 0]
        return ok or [triton.Config({**configs[0].kwargs, "BLOCK_K": group}, num_warps=4)]

    _TUNED: dict[str, object] = {}

    def _tuned(name: str, kernel, configs, key, prune=None):
        if name not in _TUNED:
            _TUNED[name] = triton.autotune(configs=configs(), key=key,
                                           prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)
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


def _partials(m: int, n: int, split: int, device: torch.device) -> torch.Tensor:
    # Every (slice, row, column) is written by exactly one program: no zero-fill.
    return torch.empty((split, m, n), device=device, dtype=torch.float32)


def int4_partials(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  group: int, config: dict | None = None, path: str | None = None, tiled: bool = False,
                  tiled_max_m: int = DEFAULTS.tiled_max_m,
                  groups_per_slice: int = DEFAULTS.tiled_groups_per_slice) -> torch.Tensor:
    """x (M, K) @ dequant(int4)^T as (partials_split, M, N) float32 partial sums (their sum is the product).
    `tiled`: packed, scale and zero are mma tiles (tile_int4): up to tiled_max_m rows the tiled kernel reads them,
    above it they are put back into the stored layout first. `config` fixes the launch parameters (tests,
    interpreter), otherwise autotuned; `path` ("tc", "gemv", "dot") forces a kernel on the stored layout (tests,
    benchmarks), otherwise: gemv up to GEMV_MAX_M rows, above it tc for groups of at least TC_MIN_GROUP, else dot."""
    if tiled:
        if x.shape[0] <= tiled_max_m:
            return int4_tiled_partials(x, packed, scale, zero, group, groups_per_slice)
        packed, scale = untile_int4_gpu(packed), untile_rows(scale)
        zero = untile_rows(zero) if zero is not None else None
    m, k = x.shape
    n = packed.shape[0]
    _check_group(k, group)
    config = config or _default_config(n, k)
    split = split_k(n, k, m)
    y = _partials(m, n, split, x.device)
    z = zero if zero is not None else scale  # never read without HAS_ZERO
    args = (x, packed, scale, z, y)
    strides = (x.stride(0), packed.stride(0), scale.stride(0), z.stride(0), y.stride(0), y.stride(1))
    path = path or ("gemv" if m <= GEMV_MAX_M else "tc" if group >= TC_MIN_GROUP else "dot")
    if path == "tc":
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        asm = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)  # the interpreter has no PTX
        unpack = (_UNPACK_FP16 if x.dtype == torch.float16 else _UNPACK_BF16).value if asm else ""
        if config is None and m <= DOT_TUNED_MAX_M:
            kern = _tuned("int4_tc", _int4_tc, _tc_configs, ["N", "K", "GROUP", "BLOCK_M", "UNPACK"])
            kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), split, triton.cdiv(m, bm))](
                *args, m, n, k, split, *strides, GROUP=group, HAS_ZERO=zero is not None, UNPACK=unpack,
                BLOCK_M=bm)
        else:
            bn = (config or LARGE_M_CONFIG)["BLOCK_N"]
            bm = (config or LARGE_M_CONFIG).get("BLOCK_M", bm)
            _int4_tc[(triton.cdiv(n, bn), split, triton.cdiv(m, bm))](
                *args, m, n, k, split, *strides, GROUP=group, HAS_ZERO=zero is not None, UNPACK=unpack,
                BLOCK_M=bm, BLOCK_N=bn)
    elif path == "gemv":
        if config is None:
            kern = _tuned("int4_gemv", _int4_gemv, _gemv_configs, ["N", "K", "GROUP"], _prune_gemv)
            kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), split, m)](
                *args, n, k, k // 8, split, *strides, GROUP=group, HAS_ZERO=zero is not None)
        else:
            bk = _pick_block_k(group, config.get("BLOCK_K", 128))
            _int4_gemv[(triton.cdiv(n, config["BLOCK_N"]), split, m)](
                *args, n, k, k // 8, split, *strides, GROUP=group, HAS_ZERO=zero is not None, BLOCK_N=config["BLOCK_N"],
                BLOCK_K=bk)
    else:
        _dot(x, packed, scale, z, y, True, group, zero is not None, config)
    return y


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                config: dict | None = None, path: str | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(int4)^T -> (M, N) in x's dtype, by the Triton kernels (int4_partials, summed)."""
    return int4_partials(x, packed, scale, zero, group, config, path).sum(0).to(x.dtype)


def int4_tiled_partials(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group: int, groups_per_slice: int = DEFAULTS.tiled_groups_per_slice) -> torch.Tensor:
    """x (M, K) in bf16 or fp16 @ the INT4 weight as mma tiles (`tile_int4`) -> (tiled_split, M, N) float32 partial
    sums. CUDA only (inline PTX); M of any size, in chunks of 8 rows (a grid dimension, so that the chunks of one
    tile run together and read its words from L2)."""
    m, k = x.shape
    n = words.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the tiled INT4 kernel takes bf16 or fp16 activations, not {x.dtype}")
    if not tiles_fit(n, k, group):
        raise ValueError(f"no INT4 tiles for N={n}, K={k}, group {group} (16 | N, 128 | group, group | K)")
    split = tiled_split(n, k, m, groups_per_slice)
    y = _partials(m, n, split, x.device)
    xi = x.contiguous().view(torch.int32)
    z = zero if zero is not None else scale  # never read without HAS_ZERO
    _int4_tiled[(triton.cdiv(m, 8), n // TILE_ROWS, split)](  # one warp per program: fastest measured
        xi, words, scale, z, y, m, n, k // TILE_K, split, xi.stride(0), y.stride(0), y.stride(1), GROUP=group,
        HAS_ZERO=zero is not None, FP16=x.dtype == torch.float16, num_warps=1)
    return y


def untile_int4_gpu(words: torch.Tensor) -> torch.Tensor:
    """`untile_int4` by a Triton kernel (the larger products read the stored layout: prefill, big batches)."""
    n, kw = words.shape
    out = torch.empty_like(words)
    block = 1024
    _untile[(triton.cdiv(n * kw, block),)](words, out, kw, kw // 16, n * kw, BLOCK=block)
    return out


def partials_split(n: int, k: int, m: int, tiled: bool = False, engine: EngineConfig = DEFAULTS) -> int:
    """How many partial sums the INT4 / FP8 / dense linears return for an (M, K) x (N, K) product."""
    if tiled and m <= engine.tiled_max_m:
        return tiled_split(n, k, m, engine.tiled_groups_per_slice)
    return split_k(n, k, m)


def fp8_partials(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None
                 ) -> torch.Tensor:
    """x (M, K) @ (weight * scale)^T as (split_k, M, N) float32 partial sums, weight-only: x stays in its dtype."""
    m, k = x.shape
    n = weight.shape[0]
    config = config or _default_config(n, k)
    split = split_k(n, k, m)
    y = _partials(m, n, split, x.device)
    s = scale.reshape(-1).to(torch.float32).contiguous()
    if m <= GEMV_MAX_M:
        _gemv(x, weight, s, y, config)
    else:
        _dot(x, weight, s, s, y, False, 1, False, config)
    return y


def _gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, y: torch.Tensor,
          config: dict | None) -> None:
    m, k = x.shape
    n, split = weight.shape[0], y.shape[0]
    args = (x, weight, scale if scale is not None else y, y, n, k, split, x.stride(0), weight.stride(0), y.stride(0),
            y.stride(1))
    if config is None:
        kern = _tuned("scaled_gemv", _scaled_gemv, _scaled_gemv_configs, ["N", "K", "HAS_SCALE"])
        kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), split, m)](*args, HAS_SCALE=scale is not None)
    else:
        _scaled_gemv[(triton.cdiv(n, config["BLOCK_N"]), split, m)](
            *args, HAS_SCALE=scale is not None, BLOCK_N=config["BLOCK_N"], BLOCK_K=config.get("BLOCK_K", 128))


def dense_partials(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x (M, K) @ weight^T for bf16 / fp16 weights and M <= GEMV_MAX_M, as (split_k, M, N) float32 partial sums
    (the same GEMV as FP8 weight-only, without scales): no split-K reduction kernel of its own, unlike cuBLAS."""
    m, k = x.shape
    if m > GEMV_MAX_M:
        raise ValueError(f"dense_partials is the GEMV for at most {GEMV_MAX_M} rows (got {m})")
    y = _partials(m, weight.shape[0], split_k(weight.shape[0], k, m), x.device)
    _gemv(x, weight, None, y, config or _default_config(weight.shape[0], k))
    return y


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None
               ) -> torch.Tensor:
    """x (M, K) @ (weight * scale)^T -> (M, N) in x's dtype (fp8_partials, summed)."""
    return fp8_partials(x, weight, scale, config).sum(0).to(x.dtype)


def _dot(x, w, s, z, y, int4: bool, group: int, has_zero: bool, config: dict | None) -> None:
    m, k = x.shape
    n, split = w.shape[0], y.shape[0]
    strides = (x.stride(0), w.stride(0), s.stride(0), z.stride(0), y.stride(0), y.stride(1))
    if config is None and m > DOT_TUNED_MAX_M:
        config = LARGE_M_CONFIG
    if config is None:
        kern = _tuned("wq_dot", _wq_dot, _dot_configs, ["N", "K", "INT4", "GROUP", "M"])
        kern[lambda c: (triton.cdiv(n, c["BLOCK_N"]), split, triton.cdiv(m, c["BLOCK_M"]))](
            x, w, s, z, y, m, n, k, split, *strides, INT4=int4, GROUP=group, HAS_ZERO=has_zero)
    else:
        bk = config.get("BLOCK_K", 128)  # tl.dot on BLOCK_K / 8 columns per nibble: at least 128
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        _wq_dot[(triton.cdiv(n, bn), split, triton.cdiv(m, bm))](
            x, w, s, z, y, m, n, k, split, *strides, INT4=int4, GROUP=group, HAS_ZERO=has_zero, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk)


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: dynamic per-token FP8 activations times per-channel FP8 weights on the FP8 tensor cores
    (torch._scaled_mm, row-wise scales; CUDA compute capability >= 8.9)."""
    xq, xs = quantize_fp8_per_token(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.reshape(1, -1).to(torch.float32),
                            out_dtype=x.dtype)
