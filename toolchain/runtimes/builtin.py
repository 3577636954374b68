"""Our built-in GPU runtime: a Llama-style decoder running a checkpoint's own bytes, built to sit near the memory
bandwidth limit at small batch.

- Static KV cache (batch, kv_heads, input_len + output_len, head_dim).
- Decode: each decoder block compiled once by torch.compile (every block has the same shapes, the weights are
  arguments), the whole step (embedding, 32 blocks, lm_head, greedy argmax, position + 1) captured in one CUDA
  graph and replayed per token. Per block: the Triton linears return per-program partial sums, which the next
  kernel sums; both norms by kernels.residual_norm (the residual add, w h and partial sums of squares, many
  programs per row: 1 / rms commutes with the linear after it), the attention kernel (rotary, the cache write,
  attention from the q/k/v product's partial sums) and kernels.silu_product applying 1 / rms; the MLP output is
  added to the stream in the next block's first norm.
- Linears by kind (toolchain.runtimes.weights): bf16 by the Triton GEMV up to kernels.GEMV_MAX_M rows (partial
  sums, as below), by cuBLAS above; INT4 W4A16 and FP8 weight-only by the Triton
  kernels of toolchain.runtimes.kernels (packed weights read once, dequantized in registers; INT4 of groups of
  128k permuted once at load into mma tiles, the same values, for the tensor-core GEMV); FP8 with more than
  `fp8_weight_only_max_m` rows (prefill, large batches) as the checkpoint asks: dynamic per-token FP8 activations
  by torch._scaled_mm.
- Every variant switch (tiles, dense GEMV, split norm, groups per slice, block sizes) comes from the model's
  EngineConfig (toolchain.engine.config), which the speed stage's key holds; custom ops take what they need of
  it as arguments, so it is also in each compiled graph's code.
- `use_kernels=False` is the reference: the same model in float32 from the same stored bytes, plain torch
  (SDPA attention), which `block_errors` compares block by block.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.config import EngineConfig
from ..errors import BuildError
from . import kernels
from .weights import Checkpoint, Linear

BLOCK_LINEARS = ("qkv", "o", "gate_up", "down")
# The runtime's arithmetic is gated block by block (block_errors): each decoder block, and the head, on the fast
# model's own input against a float32 twin that rounds FP8 activations where the model does. Measured on a
# random-weight Llama-2-7B on the H200 (2026-11-30, BENCHMARKS.md), worst block, relative to its update: bf16 and
# INT4 1.4e-2, FP8 decode (weight-only) 1.5e-2, FP8 prefill (W8A8) 5.9e-2: there a one-ulp bf16 difference moves
# an activation to the neighbouring E4M3 value (a 6-12% step) in a few percent of elements. BLOCK_TOLERANCE is
# about twice those. The logits of the whole model are reported against the same twin and against the
# checkpoint's own scheme (FP8: W8A8 everywhere, as transformers computes it) but not gated: through 32 blocks of
# random weights rounding differences grow (bf16 alone: 6.7e-2; FP8: 0.47 where every block is within 6e-2).
BLOCK_TOLERANCE = {"dense": 3e-2, "int4": 3e-2, "fp8": 1.2e-1}
LOGITS_TOLERANCE = {"dense": 1e-1, "int4": 1e-1, "fp8": 1.5e-1}  # reported: whether the whole model is within


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
                     eps: float, warps: int) -> torch.Tensor:
    return kernels.decode_attention(qkv, kc, vc, cos, sin, pos, n_heads, n_kv, ss, n, eps, warps)


@decode_attention.register_fake
def _(qkv, kc, vc, cos, sin, pos, n_heads, n_kv, ss, n, eps, warps):
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


def concat(parts: list[Linear]) -> Linear:
    """Linears sharing an input, stacked along the output dimension (q,k,v; gate,up): one launch instead of
    several. Rows are stored independently in every kind, so this is a concatenation of stored bytes."""
    kind = parts[0].kind
    if any(p.kind != kind or p.group != parts[0].group for p in parts):
        raise BuildError("the built-in runtime needs q/k/v (and gate/up) quantized alike")
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts, 0))  # noqa: E731
    if any(p.tiled for p in parts):
        raise ValueError("concatenate INT4 linears before tiling them")
    return Linear(kind, (sum(p.shape[0] for p in parts), parts[0].shape[1]), cat([p.weight for p in parts]),
                  cat([p.scale for p in parts]), cat([p.zero for p in parts]), parts[0].group)


def _tiled(lin: Linear) -> Linear:
    fits = lin.kind == "int4" and kernels.tiles_fit(lin.shape[0], lin.shape[1], lin.group)
    return lin.as_tiles() if fits else lin


def linear_partials(x: torch.Tensor, lin: Linear, use_kernels: bool, wo_max_m: int | None = None,
                    act_round: torch.dtype | None = None, engine: EngineConfig = kernels.DEFAULTS) -> torch.Tensor:
    """x (M, K) -> partial sums (S, M, N) of the product, S >= 1 (the kernels' split of K; one slice elsewhere).
    `act_round`: the reference rounds activations to this dtype before quantizing them to FP8, as the fast model
    (whose activations are in that dtype) does; else both would round to other E4M3 values wherever bf16 and
    float32 straddle a boundary, and that differs by whole E4M3 steps."""
    m = x.shape[0]
    wo_max_m = engine.fp8_weight_only_max_m if wo_max_m is None else wo_max_m
    if lin.kind == "dense":
        if use_kernels and m <= kernels.GEMV_MAX_M and engine.dense_gemv and kernels.available(x.device):
            return dense_mm(x, lin.weight.to(x.dtype), kernels.partials_split(lin.weight.shape[0], x.shape[1], m))
        return F.linear(x, lin.weight.to(x.dtype))[None]
    if lin.kind == "fp8" and m > wo_max_m:  # the checkpoint's own scheme: dynamic per-token FP8 activations
        if use_kernels:
            return kernels.fp8_scaled_mm(x, lin.weight, lin.scale)[None]
        xq, xs = kernels.quantize_fp8_per_token(x if act_round is None else x.to(act_round).to(x.dtype))
        return ((xq.to(torch.float32) * xs) @ lin.dense(torch.float32).T).to(x.dtype)[None]
    if not use_kernels:
        return (x.to(torch.float32) @ lin.dense(torch.float32).T).to(x.dtype)[None]
    if lin.kind == "int4":
        split = kernels.partials_split(lin.weight.shape[0], x.shape[1], m, lin.tiled, engine)
        return int4_mm(x, lin.weight, lin.scale, lin.zero, lin.group, lin.tiled, split, engine.tiled_max_m,
                       engine.tiled_groups_per_slice)
    return fp8_mm(x, lin.weight, lin.scale, kernels.partials_split(lin.weight.shape[0], x.shape[1], m))


def summed(parts: torch.Tensor) -> torch.Tensor:
    """The sum of partial sums (S, M, N) as S - 1 elementwise adds, not a reduction: torch.compile fuses
    elementwise ops into the kernel that reads them (a norm, the SiLU product), where it keeps a reduction over
    the first dimension as a kernel of its own (seen on the H200: 0.12 ms per decode step)."""
    out = parts[0]
    for i in range(1, parts.shape[0]):
        out = out + parts[i]
    return out


def apply_linear(x: torch.Tensor, lin: Linear, use_kernels: bool, wo_max_m: int | None = None,
                 act_round: torch.dtype | None = None, engine: EngineConfig = kernels.DEFAULTS) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype (linear_partials, summed)."""
    return summed(linear_partials(x, lin, use_kernels, wo_max_m, act_round, engine)).to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    return w.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Model:
    """A loaded checkpoint on one device. Weights stay as stored; `dtype` is the activation dtype; `engine` the
    variant switches (None: EngineConfig.from_env(), the defaults as the environment sets them)."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 use_kernels: bool = True, engine: EngineConfig | None = None):
        from ..arch import head_dim

        self.engine = engine = EngineConfig.from_env() if engine is None else engine
        use_kernels = use_kernels and engine.kernels
        cfg = ckpt.config
        if cfg.get("rope_scaling") not in (None, {}) and (cfg["rope_scaling"] or {}).get("rope_type") != "default":
            raise BuildError(f"the built-in runtime has no rope_scaling {cfg['rope_scaling']!r}")
        self.cfg, self.device, self.dtype, self.use_kernels = cfg, device, dtype, use_kernels
        self.mode = ckpt.mode
        self.n_layers, self.hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
        self.n_heads, self.head_dim = cfg["num_attention_heads"], head_dim(cfg)
        self.n_kv = cfg.get("num_key_value_heads", self.n_heads)
        self.eps, self.vocab = cfg.get("rms_norm_eps", 1e-6), cfg["vocab_size"]
        self.parts = self._load(ckpt)
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                                        / self.head_dim))
        freqs = torch.outer(torch.arange(cfg.get("max_position_embeddings", 4096), dtype=torch.float64), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device, dtype)
        self.sin = emb.sin().to(device, dtype)
        first = self.parts["layers"][0]
        self.block_kinds = [(first[k].kind, first[k].group, first[k].tiled) for k in BLOCK_LINEARS]
        layers = self.parts["layers"]
        if any([(lay[k].kind, lay[k].group, lay[k].tiled) for k in BLOCK_LINEARS] != self.block_kinds
               for lay in layers):
            raise BuildError("the built-in runtime needs every decoder block quantized alike")
        self.block, self.head = self._block, self._head
        self.wo_max_m = engine.fp8_weight_only_max_m  # FP8: weight-only up to this many rows, W8A8 above
        self.act_round: torch.dtype | None = None  # see apply_linear
        self.caches: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.w8a8 = self._check_w8a8() if use_kernels and self.block_kinds[0][0] == "fp8" else None
        # Decode attention by one Triton kernel (rotary, cache write, attention; it reads the q/k/v product's
        # partial sums): where the kernels run and the head shape allows; the float32 twin keeps torch's SDPA.
        hd = self.head_dim
        self.fused_attention = use_kernels and kernels.available(device) and hd >= 32 and not hd & (hd - 1) \
            and self.n_heads % self.n_kv == 0
        # Norms by residual_norm where the attention kernel runs. Not in fp16: w h un-normalized can leave fp16's
        # range where the residual stream holds large values (bf16 has float32's range).
        self.split_norm = self.fused_attention and dtype != torch.float16 and engine.split_norm

    def _check_w8a8(self) -> dict[str, Any]:
        """torch._scaled_mm against the float32 product of the same FP8 operands, on this card, before trusting
        it: where they disagree (seen on the H200, 2026-11-30: 0.47 relative error in the logits, not yet
        explained), every FP8 product takes the weight-only kernels instead, and the result says so."""
        lin = self.parts["layers"][0]["qkv"]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn((96, lin.weight.shape[1]), generator=g, device=self.device).to(self.dtype)
        try:
            got = kernels.fp8_scaled_mm(x, lin.weight, lin.scale).double()
            err = None
        except RuntimeError as e:
            got, err = None, f"{type(e).__name__}: {e}"
        xq, xs = kernels.quantize_fp8_per_token(x)
        ref = ((xq.double() * xs.double()) @ lin.dense(torch.float64).T)
        if got is not None:
            rel = float((got - ref).norm() / ref.norm())
            if rel < 1e-2:
                return {"used": True, "rel_err": rel}
            err = f"relative error {rel:.3g} against float64"
        self.wo_max_m = 1 << 30
        return {"used": False, "reason": f"torch._scaled_mm disagreed ({err}): weight-only kernels at every size"}

    def _load(self, ckpt: Checkpoint) -> dict[str, Any]:
        from ..arch import linear_shapes

        shapes = {n: (o, i) for n, o, i in linear_shapes(self.cfg)}
        dev, dt = self.device, self.dtype

        def lin(name):
            return ckpt.linear(name, shapes[name]).to(dev, dt)

        layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            q, k, v = (lin(f"{p}.self_attn.{x}_proj") for x in "qkv")
            gate, up = lin(f"{p}.mlp.gate_proj"), lin(f"{p}.mlp.up_proj")
            layers.append({"ln1": ckpt.get(f"{p}.input_layernorm.weight").to(dev, dt),
                           "ln2": ckpt.get(f"{p}.post_attention_layernorm.weight").to(dev, dt),
                           "qkv": concat([q, k, v]), "o": lin(f"{p}.self_attn.o_proj"),
                           "gate_up": concat([gate, up]), "down": lin(f"{p}.mlp.down_proj")})
        embed = ckpt.get("model.embed_tokens.weight").to(dev, dt)
        if ckpt.has("lm_head.weight") or ckpt.has("lm_head.weight_packed"):
            head = lin("lm_head")
        else:  # tied embeddings
            head = Linear("dense", tuple(embed.shape), embed)
        if self.use_kernels and self.engine.int4_tiles and kernels.tiles_run(dev, dt):  # INT4 as mma tiles (kernels.py)
            for lay in layers:
                for k in BLOCK_LINEARS:
                    lay[k] = _tiled(lay[k])
            head = _tiled(head)
        return {"layers": layers, "embed": embed, "norm": ckpt.get("model.norm.weight").to(dev, dt), "lm_head": head}

    # -- sizes ---------------------------------------------------------------------------------------------

    def weight_bytes_per_step(self, batch: int) -> int:
        """Bytes a decode step must read besides the KV cache: every linear as stored, the norms, and the
        embedding rows of the batch's tokens."""
        lins = [lay[k] for lay in self.parts["layers"] for k in ("qkv", "o", "gate_up", "down")]
        norms = sum(lay["ln1"].numel() * 2 * lay["ln1"].element_size() for lay in self.parts["layers"])
        return sum(x.nbytes() for x in lins) + self.parts["lm_head"].nbytes() + norms + \
            batch * self.hidden * self.parts["embed"].element_size()

    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    # -- forward ---------------------------------------------------------------------------------------------

    def alloc_cache(self, batch: int, max_len: int) -> None:
        self.caches = None
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.caches = ([torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)],
                       [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)])
        self.max_len = max_len
        self.positions = torch.arange(max_len, device=self.device)

    def _lin(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        return apply_linear(x, lin, self.use_kernels, self.wo_max_m, self.act_round, self.engine)

    def _partials(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        return linear_partials(x, lin, self.use_kernels, self.wo_max_m, self.act_round, self.engine)

    def _block(self, h, d, kc, vc, pos, cos, sin, mask, ln1, ln2, *w):
        """One decoder block for one new token per sequence: the residual stream h (B, hidden) and the previous
        block's MLP output d as partial sums (S, B, hidden), or None; cos/sin the whole rotary tables. Returns
        (h, d) the same way: the next block adds d in the kernel of its first norm (one launch per block fewer
        than adding it here). Tensors only (w: weight, scale, zero of qkv, o, gate_up, down), so that one
        compiled graph serves every layer."""
        qkv_l, o_l, gu_l, down_l = (self._as_linear(i, *w[3 * i : 3 * i + 3]) for i in range(4))
        b = h.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if self.split_norm:
            return self._split_norm_block(h, d, kc, vc, pos, cos, sin, ln1, ln2, qkv_l, o_l, gu_l, down_l)
        if d is not None:
            h = h + summed(d).to(h.dtype)
        x = rms_norm(h, ln1, self.eps)
        if self.fused_attention:
            att = decode_attention(self._partials(x, qkv_l), kc, vc, cos, sin, pos, nh, nkv, None, 1, 0.0,
                                   self.engine.attention_warps)
        else:
            qkv = self._lin(x, qkv_l)
            q = qkv[:, : nh * hd].view(b, nh, 1, hd)
            k = qkv[:, nh * hd : (nh + nkv) * hd].view(b, nkv, 1, hd)
            v = qkv[:, (nh + nkv) * hd :].view(b, nkv, 1, hd)
            c, s = cos.index_select(0, pos.view(1))[0], sin.index_select(0, pos.view(1))[0]
            q, k = rotate(q, c, s), rotate(k, c, s)
            kc.index_copy_(2, pos.view(1), k)
            vc.index_copy_(2, pos.view(1), v)
            att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.view(1, 1, 1, -1), enable_gqa=nkv != nh)
            att = att.reshape(b, nh * hd)
        h = h + self._lin(att, o_l)
        x = rms_norm(h, ln2, self.eps)
        gu = summed(self._partials(x, gu_l))  # float32 until the SiLU product (one fused kernel when compiled)
        inter = gu.shape[-1] // 2
        return h, self._partials((F.silu(gu[:, :inter]) * gu[:, inter:]).to(h.dtype), down_l)

    def _split_norm_block(self, h, d, kc, vc, pos, cos, sin, ln1, ln2, qkv_l, o_l, gu_l, down_l):
        """`_block` with both norms by residual_norm (many programs per row): the products take w h, and the
        attention kernel and the SiLU product apply 1 / rms (kernels.residual_norm says why)."""
        eng = self.engine
        h, u, ss = residual_norm(h, d, ln1, eng.norm_block)
        att = decode_attention(self._partials(u, qkv_l), kc, vc, cos, sin, pos, self.n_heads, self.n_kv, ss,
                               self.hidden, self.eps, eng.attention_warps)
        h, u, ss = residual_norm(h, self._partials(att, o_l), ln2, eng.norm_block)
        act = silu_product(self._partials(u, gu_l), ss, self.hidden, self.eps, h.dtype, eng.silu_block)
        return h, self._partials(act, down_l)

    def block_output(self, h, *args) -> torch.Tensor:
        """One block's output (the stream after it) on the stream h: `_block` with its MLP output added."""
        h, d = self._block(h, None, *args)
        return h + summed(d).to(h.dtype)

    def _as_linear(self, i: int, weight, scale, zero) -> Linear:
        kind, group, tiled = self.block_kinds[i]
        return Linear(kind, (weight.shape[0], 0), weight, scale, zero, group, tiled)

    @staticmethod
    def _flat(lay: dict[str, Any]) -> list:
        return [t for k in BLOCK_LINEARS for t in (lay[k].weight, lay[k].scale, lay[k].zero)]

    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids (B, 1) at position `pos` (a 0-d device tensor) -> logits (B, vocab). Uses the static cache."""
        # No indexing by a 0-d tensor here: PyTorch reads such an index back to the host, which a CUDA graph
        # capture forbids.
        h = F.embedding(ids[:, 0], self.parts["embed"]).to(self.dtype)
        mask = self.positions <= pos
        kcs, vcs = self.caches
        d = None
        for i, lay in enumerate(self.parts["layers"]):
            h, d = self.block(h, d, kcs[i], vcs[i], pos, self.cos, self.sin, mask, lay["ln1"], lay["ln2"],
                              *self._flat(lay))
        return self.head(h, d)

    def _head(self, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The stream h plus the last block's MLP output d (partial sums), the final norm and lm_head: logits."""
        if self.split_norm:
            h, u, ss = residual_norm(h, d, self.parts["norm"], self.engine.norm_block)
            logits = summed(self._partials(u, self.parts["lm_head"]))
            return (logits * kernels.rms_scale(ss, self.hidden, self.eps)[:, None]).to(self.dtype)
        h = h + summed(d).to(h.dtype)
        return self._lin(rms_norm(h, self.parts["norm"], self.eps), self.parts["lm_head"])

    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """ids (B, T) from position 0 -> logits (B, vocab) of the last position (or (B, T, vocab))."""
        b, t = ids.shape
        h = self.parts["embed"][ids].reshape(b * t, self.hidden).to(self.dtype)
        for i in range(self.n_layers):
            h = self.prefill_block(i, h, b, t)
        h = rms_norm(h.view(b, t, -1) if all_logits else h.view(b, t, -1)[:, -1], self.parts["norm"], self.eps)
        return self._lin(h.reshape(-1, self.hidden), self.parts["lm_head"]).view(*h.shape[:-1], -1)

    def prefill_block(self, i: int, h: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Decoder block `i` on h (B*T, hidden) of positions 0..T-1; fills the block's cache when there is one."""
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        lay = self.parts["layers"][i]
        x = rms_norm(h, lay["ln1"], self.eps)
        qkv = self._lin(x, lay["qkv"]).view(b, t, -1)
        q = qkv[..., : nh * hd].view(b, t, nh, hd).transpose(1, 2)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, t, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(b, t, nkv, hd).transpose(1, 2)
        q, k = rotate(q, self.cos[:t], self.sin[:t]), rotate(k, self.cos[:t], self.sin[:t])
        if self.caches is not None:
            self.caches[0][i][:, :, :t] = k
            self.caches[1][i][:, :, :t] = v
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
        h = h + self._lin(att.transpose(1, 2).reshape(b * t, nh * hd), lay["o"])
        x = rms_norm(h, lay["ln2"], self.eps)
        gu = self._lin(x, lay["gate_up"])
        inter = gu.shape[-1] // 2
        return h + self._lin(F.silu(gu[:, :inter]) * gu[:, inter:], lay["down"])


def reference_of(model: Model, weight_only_max_m: int | None = None, same_rounding: bool = False) -> Model:
    """The float32, plain-torch twin of `model`, sharing its stored weights (dequantized layer by layer).
    `weight_only_max_m=0` makes every FP8 product W8A8, the checkpoint's own scheme (what transformers computes).
    `same_rounding`: FP8 activations rounded to the model's dtype before their quantization, as in the model."""
    ref = Model.__new__(Model)
    ref.__dict__.update(model.__dict__)
    ref.dtype, ref.use_kernels, ref.caches = torch.float32, False, None
    ref.block, ref.head = ref._block, ref._head
    ref.fused_attention = ref.split_norm = False
    ref.cos, ref.sin = model.cos.float(), model.sin.float()
    if weight_only_max_m is not None:
        ref.wo_max_m = weight_only_max_m
    ref.act_round = model.dtype if same_rounding else None
    return ref


# -- decoding in one CUDA graph --------------------------------------------------------------------------------

class DecodeGraph:
    """One decode step, argmax and position + 1 captured in a CUDA graph: `replay()` emits the next token."""

    def __init__(self, model: Model, batch: int, warmup: int = 3):
        self.model = model
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, autotune and allocate outside the capture
            for _ in range(warmup):
                self._step()
                self.pos.zero_()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        logits = self.model.decode(self.ids, self.pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def start(self, first_ids: torch.Tensor, position: int) -> None:
        self.ids.copy_(first_ids.view(-1, 1))
        self.pos.fill_(position)

    def replay(self) -> None:
        self.graph.replay()


# -- measurement ----------------------------------------------------------------------------------------------

def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """A device-to-device copy, counting bytes read plus bytes written (median of `reps`)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def card_info(device: torch.device) -> dict[str, Any]:
    from .select import cuda_card

    props = torch.cuda.get_device_properties(device)
    smi = cuda_card() or {}
    return {"kind": "cuda", "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "driver": smi.get("driver"), "memory_mib": props.total_memory >> 20,
            "multiprocessors": props.multi_processor_count}


def block_errors(model: Model, seed: int = 0, tokens: int = 96) -> dict[str, float]:
    """Each decoder block of `model` against its float32 plain-torch twin on the same input (the fast model's own
    hidden state), for a prefill of `tokens` and one decode step after it: the error of the block's update
    (output - input), relative to that update, worst block. Unlike the logits, this does not grow through the
    depth of the model, so it isolates the kernels' arithmetic from the amplification of rounding differences
    that random-weight models show (bf16 alone: 6.7e-2 in the logits of a random Llama-2-7B)."""
    ref = reference_of(model, same_rounding=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (1, tokens + 1), generator=g).to(model.device)
    model.alloc_cache(1, tokens + 1)
    ref.alloc_cache(1, tokens + 1)

    def rel(out, want, h_in):
        want = want.double()
        return float((out.double() - want).norm() / (want - h_in.double()).norm().clamp_min(1e-30))

    def head(m, h):
        return m._lin(rms_norm(h, m.parts["norm"], m.eps), m.parts["lm_head"]).double()

    def head_rel(h):
        got, want = head(model, h), head(ref, h.float())
        return float((got - want).norm() / want.norm())

    worst = {"prefill": 0.0, "decode": 0.0}
    h = model.parts["embed"][ids[:, :tokens]].reshape(tokens, model.hidden).to(model.dtype)
    for i in range(model.n_layers):
        out = model.prefill_block(i, h, 1, tokens)
        want = ref.prefill_block(i, h.float(), 1, tokens)
        worst["prefill"] = max(worst["prefill"], rel(out, want, h))
        h = out
    head_prefill = head_rel(h)
    for i in range(model.n_layers):  # the reference decodes on the fast model's cache, in float32
        ref.caches[0][i].copy_(model.caches[0][i])
        ref.caches[1][i].copy_(model.caches[1][i])
    pos = torch.tensor(tokens, device=model.device)
    h = F.embedding(ids[:, tokens], model.parts["embed"]).to(model.dtype)
    mask = model.positions <= pos
    for i, lay in enumerate(model.parts["layers"]):
        out = model.block_output(h, model.caches[0][i], model.caches[1][i], pos, model.cos, model.sin, mask,
                                 lay["ln1"], lay["ln2"], *model._flat(lay))
        want = ref.block_output(h.float(), ref.caches[0][i], ref.caches[1][i], pos, ref.cos, ref.sin, mask,
                                lay["ln1"], lay["ln2"], *model._flat(lay))
        worst["decode"] = max(worst["decode"], rel(out, want, h))
        h = out
    head_decode = head_rel(h)
    model.caches = ref.caches = None
    return {"prefill_max_rel_err": worst["prefill"], "decode_max_rel_err": worst["decode"],
            "head_prefill_rel_err": head_prefill, "head_decode_rel_err": head_decode}


def logits_check(model: Model, seed: int = 0, tokens: int = 96) -> dict[str, Any]:
    """Prefill and one decode step against float32 references from the same bytes: the same dataflow in plain
    torch (the kernels' error), and the checkpoint's own scheme (for FP8: W8A8 everywhere, as transformers and
    the accuracy stage compute it; the weight-only decode path skips the activation rounding). 96 prompt tokens:
    FP8 prefill takes the W8A8 path, its decode step the weight-only one."""
    refs = {"same_dataflow": reference_of(model, same_rounding=True), "checkpoint_scheme": reference_of(model, 0)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (1, tokens), generator=g).to(model.device)
    outs = {}
    for name, m in (("fast", model), *refs.items()):
        m.alloc_cache(1, tokens + 1)
        pre = m.prefill(ids, all_logits=True).float()
        step = m.decode(ids[:, -1:], torch.tensor(tokens, device=model.device)).float()
        outs[name] = (pre, step)
        m.caches = None

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    kind = model.parts["layers"][0]["o"].kind
    result = {"tolerance": LOGITS_TOLERANCE[kind], "tokens": tokens,
              "reference": "float32 plain-torch forward of the same stored bytes (tests/test_speed.py checks it "
                           "against transformers loading the checkpoint)"}
    for name in refs:
        result[name] = {"prefill_rel_err": rel(outs["fast"][0], outs[name][0]),
                        "decode_rel_err": rel(outs["fast"][1], outs[name][1])}
    result["prefill_rel_err"] = result["checkpoint_scheme"]["prefill_rel_err"]
    result["decode_rel_err"] = result["checkpoint_scheme"]["decode_rel_err"]
    result["logits_within_tolerance"] = max(result["prefill_rel_err"], result["decode_rel_err"]) <= \
        result["tolerance"]
    blocks = block_errors(model, seed, tokens)
    result["blocks"] = {**blocks, "tolerance": BLOCK_TOLERANCE[kind]}
    result["passed"] = max(blocks.values()) <= BLOCK_TOLERANCE[kind]
    return result


def time_batch(model: Model, batch: int, input_len: int, output_len: int, iterations: int, copy_gbs: float,
               seed: int = 0) -> dict[str, Any]:
    from .speed import batch_result, mean_context

    model.alloc_cache(batch, input_len + output_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab, (batch, input_len), generator=g).to(model.device)
    model.prefill(ids)  # warm-up (autotuning of the prefill shapes)
    graph = DecodeGraph(model, batch)
    ttfts, itls = [], []
    for _ in range(iterations + 1):
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(output_len + 1)]
        events[0].record()
        first = model.prefill(ids).argmax(-1)
        events[1].record()
        graph.start(first, input_len)
        for t in range(output_len - 1):
            graph.replay()
            events[t + 2].record()
        torch.cuda.synchronize()
        ttfts.append(events[0].elapsed_time(events[1]))
        itls.append([events[i].elapsed_time(events[i + 1]) for i in range(1, output_len)])
    ttfts, itls = ttfts[1:], itls[1:]  # the first round warms the graph and the allocator
    step_bytes = model.weight_bytes_per_step(batch) + batch * mean_context(input_len, output_len) * \
        model.kv_bytes_per_token()
    res = batch_result(batch, input_len, output_len, statistics.median(ttfts), [x for r in itls for x in r],
                       step_bytes, copy_gbs, "per decode step, CUDA events around each graph replay")
    del graph
    model.caches = None
    return res


def compile_blocks(model: Model) -> str:
    """torch.compile each decoder block (one compiled graph serves every layer); returns what was done."""
    # Dynamo caches compiled graphs per function, and `_block` is one function for every model in the process:
    # each model (linear kinds, partial-sum splits), the first block (no previous output) and batch sizes add
    # variants. The default limit of 8 was reached by the third model of one process on the H200 (2026-11-30),
    # which then ran eager; 64 covers a build's targets.
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64 if "accumulated" not in name else 512))
    try:
        model.block = torch.compile(model._block, dynamic=True, fullgraph=False)  # one graph for every batch size
        model.head = torch.compile(model._head, dynamic=True, fullgraph=False)  # its sums fuse: ~20 launches fewer
        return f"torch.compile (inductor, torch {torch.__version__})"
    except Exception as e:  # noqa: BLE001  (an old or broken compiler: run eager, say so)
        model.block, model.head = model._block, model._head
        return f"eager (torch.compile unavailable: {type(e).__name__}: {e})"


def compile_fallbacks() -> int:
    """How many times dynamo has given up on a frame for its recompile limit in this process. It then runs the
    frame eagerly and only logs a warning, so a timing that claims compiled blocks checks this count."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    marks = ("recompile limit", "recompile_limit", "cache_size_limit", "cache size limit")
    return sum(n for reason, n in counters["unimplemented"].items() if any(m in reason.lower() for m in marks))


def blocks_after(how: str, fallbacks_before: int) -> str:
    """`how` the blocks ran (compile_blocks' answer), corrected if dynamo fell back to eager since the count."""
    if how.startswith("torch.compile") and compile_fallbacks() > fallbacks_before:
        return "eager (torch.compile hit dynamo's recompile limit and ran the blocks uncompiled)"
    return how


def measure(export: Path, settings: dict[str, Any], reporter, ckpt: Checkpoint | None = None,
            engine: EngineConfig | None = None) -> dict[str, Any]:
    """The speed stage's figures for a checkpoint on the first CUDA device, under `engine` (the stage passes the
    one in its key; None: EngineConfig.from_env())."""
    if not torch.cuda.is_available():
        raise BuildError("the built-in runtime needs a CUDA GPU (torch sees none)")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    ckpt = ckpt or Checkpoint.open(export)
    model = Model(ckpt, device, torch.bfloat16, use_kernels=kernels.available(device), engine=engine)
    load_s = time.perf_counter() - t0
    copy_gbs = copy_bandwidth_gbs(device)
    check = logits_check(model)
    blocks = check["blocks"]
    reporter.info(f"  {model.mode}: each block vs its float32 twin: prefill {blocks['prefill_max_rel_err']:.2e}, "
                  f"decode {blocks['decode_max_rel_err']:.2e} (tolerance {blocks['tolerance']:.0e}); whole-model "
                  f"logits vs float32: prefill {check['prefill_rel_err']:.2e}, decode {check['decode_rel_err']:.2e};"
                  f" copy bandwidth {copy_gbs:.0f} GB/s")
    compiled = compile_blocks(model)
    fallbacks = compile_fallbacks()
    per_batch = []
    for b in settings["batch_sizes"]:
        try:
            per_batch.append(time_batch(model, b, settings["input_len"], settings["output_len"],
                                        settings["iterations"], copy_gbs))
        except torch.cuda.OutOfMemoryError as e:
            model.caches = None
            torch.cuda.empty_cache()
            per_batch.append({"batch_size": b, "skipped": f"out of GPU memory: {str(e).splitlines()[0]}"})
        except Exception as e:
            if not compiled.startswith("torch.compile"):
                raise
            reporter.warn(f"torch.compile failed ({type(e).__name__}: {e}); timing eager blocks instead")
            model.block, compiled = model._block, f"eager (torch.compile failed: {type(e).__name__})"
            per_batch.append(time_batch(model, b, settings["input_len"], settings["output_len"],
                                        settings["iterations"], copy_gbs))
    compiled = blocks_after(compiled, fallbacks)
    result = {
        "mode": model.mode, "card": card_info(device), "copy_bandwidth_gbs": copy_gbs,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": getattr(kernels.triton, "__version__", None)},
        "method": {"kv_cache": "static", "decode": "one CUDA graph per step", "blocks": compiled,
                   "linears": "Triton W4A16 / FP8 weight-only kernels" if model.use_kernels else "torch",
                   "fp8_weight_only_max_m": model.wo_max_m, "fp8_w8a8": model.w8a8,
                   "load_seconds": round(load_s, 2),
                   "bytes_per_step": "linears as stored + norms + embedding rows + K/V of the mean context"},
        "engine": model.engine.canonical(), "logits_check": check, "per_batch": per_batch,
    }
    if not check["passed"]:
        worst = max(check["blocks"][k] for k in check["blocks"] if k != "tolerance")
        result["failed"] = (f"the runtime's blocks differ from their float32 twin on the same input beyond "
                            f"{check['blocks']['tolerance']:.0e} (worst {worst:.2e}): its kernels are wrong here")
    return result
