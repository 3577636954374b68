"""The engine's Triton kernels, one module per op, each with its launcher, its launch configs and its float64 (or
plain-torch) reference beside it:

  linear     products on weights as stored (INT4 W4A16, FP8 weight-only and W8A8, bf16 GEMV), INT4 mma tiles
  norm       the decode step's residual add and RMSNorm across many programs, and the SiLU product
  attention  one decode step's attention: rotary, the cache write, attention over the cache

The names below are re-exported so that callers write `kernels.int4_partials`, `kernels.residual_norm`, ...
"""

from .attention import decode_attention, decode_attention_reference
from .linear import (
    DEFAULTS,
    DOT_TUNED_MAX_M,
    GEMV_MAX_M,
    INTERPRET_CONFIG,
    LARGE_M_CONFIG,
    SMALL_CONFIG,
    SMALL_WEIGHTS,
    TC_MIN_GROUP,
    TILE_K,
    TILE_ROWS,
    available,
    dense_partials,
    dequantize_fp8,
    dequantize_int4,
    fp8_matmul,
    fp8_partials,
    fp8_scaled_mm,
    int4_matmul,
    int4_partials,
    int4_tiled_partials,
    interpret,
    pack_nibbles,
    partials_split,
    quantize_fp8_per_token,
    split_k,
    tile_int4,
    tiled_split,
    tiles_fit,
    tiles_run,
    triton,
    unpack_int4,
    untile_int4,
    untile_int4_gpu,
    untile_rows,
)
from .norm import norm_programs, residual_norm, residual_norm_reference, rms_scale, silu_product, silu_product_reference

__all__ = [
    "DEFAULTS", "DOT_TUNED_MAX_M", "GEMV_MAX_M", "INTERPRET_CONFIG", "LARGE_M_CONFIG", "SMALL_CONFIG", "SMALL_WEIGHTS",
    "TC_MIN_GROUP", "TILE_K", "TILE_ROWS", "available", "decode_attention", "decode_attention_reference",
    "dense_partials", "dequantize_fp8", "dequantize_int4", "fp8_matmul", "fp8_partials", "fp8_scaled_mm",
    "int4_matmul", "int4_partials", "int4_tiled_partials", "interpret", "norm_programs", "pack_nibbles",
    "partials_split", "quantize_fp8_per_token", "residual_norm", "residual_norm_reference", "rms_scale",
    "silu_product", "silu_product_reference", "split_k", "tile_int4", "tiled_split", "tiles_fit", "tiles_run",
    "triton", "unpack_int4", "untile_int4", "untile_int4_gpu", "untile_rows",
]
