"""The engine's custom ops: torch.compile treats each Triton launch as an opaque call (toolchain.engine.kernels
does the work; the fakes give the shapes)."""

from __future__ import annotations

import torch

from . import kernels

# -- linears as custom ops: torch.compile treats the Triton launches as opaque calls ---------------------------
# They return the kernels' partial sums, (split, M, N) float32: in a compiled block their sum and the cast to the
# activation dtype fuse into the elementwise kernel that reads the product (rotary, residual add, SiLU), so a
# linear is one launch (no zero-fill, no atomics, no separate cast). The split depends on the shape only
# (kernels.partials_split) and is an argument of each op: the fake gives that shape, and the split is written
# into the compiled graph's code, which keys inductor's on-disk cache. Otherwise a graph cached by a version
# with another split would be reused, its shape checks failing at run time.

def _checked(parts: torch.Tensor, split: int) -> torch.Tensor:
    if parts.shape[0] != split:
        raise RuntimeError(f"the kernels returned {parts.shape[0]} partial sums where the graph expects {split}")
    return parts


@torch.library.custom_op("toolchain::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            group: int, tiled: bool, split: int, tiled_max_m: int, groups_per_slice: int) -> torch.Tensor:
    return _checked(kernels.int4_partials(x, packed, scale, zero, group, tiled=tiled, tiled_max_m=tiled_max_m,
                                          groups_per_slice=groups_per_slice), split)


def _partials_like(x: torch.Tensor, n: int, split: int) -> torch.Tensor:
    """The fake result of a linear custom op: `split` partial sums of x (M, K) times an (N, K) weight."""
    return x.new_empty((split, x.shape[0], n), dtype=torch.float32)


@int4_mm.register_fake
def _(x, packed, scale, zero, group, tiled, split, tiled_max_m, groups_per_slice):
    return _partials_like(x, packed.shape[0], split)


@torch.library.custom_op("toolchain::fp8_mm", mutates_args=())
def fp8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, split: int) -> torch.Tensor:
    return _checked(kernels.fp8_partials(x, weight, scale), split)


@fp8_mm.register_fake
def _(x, weight, scale, split):
    return _partials_like(x, weight.shape[0], split)


@torch.library.custom_op("toolchain::dense_mm", mutates_args=())
def dense_mm(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    return _checked(kernels.dense_partials(x, weight), split)


@dense_mm.register_fake
def _(x, weight, split):
    return _partials_like(x, weight.shape[0], split)


@torch.library.custom_op("toolchain::decode_attention", mutates_args=("kc", "vc"))
def decode_attention(qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     pos: torch.Tensor, n_heads: int, n_kv: int, ss: torch.Tensor | None, n: int,
                     eps: float, warps: int, bias: torch.Tensor | None, q_norm: torch.Tensor | None,
                     k_norm: torch.Tensor | None, head_eps: float) -> torch.Tensor:
    return kernels.decode_attention(qkv, kc, vc, cos, sin, pos, n_heads, n_kv, ss, n, eps, warps, bias, q_norm,
                                    k_norm, head_eps)


@decode_attention.register_fake
def _(qkv, kc, vc, cos, sin, pos, n_heads, n_kv, ss, n, eps, warps, bias, q_norm, k_norm, head_eps):
    return kc.new_empty((qkv.shape[1], n_heads * kc.shape[-1]))


@torch.library.custom_op("toolchain::silu_product", mutates_args=())
def silu_product(parts: torch.Tensor, ss: torch.Tensor, n: int, eps: float, dtype: torch.dtype,
                 block: int) -> torch.Tensor:
    return kernels.silu_product(parts, ss, n, eps, dtype, block)


@silu_product.register_fake
def _(parts, ss, n, eps, dtype, block):
    return parts.new_empty((parts.shape[1], parts.shape[2] // 2), dtype=dtype)


@torch.library.custom_op("toolchain::residual_norm", mutates_args=())
def residual_norm_op(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, programs: int, block: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, u, ss = kernels.residual_norm(h, d, w, block)
    if ss.shape[1] != programs:
        raise RuntimeError(f"the norm returned {ss.shape[1]} partial sums of squares where the graph expects "
                           f"{programs}")
    return h, u, ss


@residual_norm_op.register_fake
def _(h, d, w, programs, block):
    return h.new_empty(h.shape), h.new_empty(h.shape), h.new_empty((h.shape[0], programs), dtype=torch.float32)


def residual_norm(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, block: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.residual_norm as a custom op, its number of partial sums in the graph (see the linears)."""
    return residual_norm_op(h, d, w, kernels.norm_programs(h.shape[1], block), block)
