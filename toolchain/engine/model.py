"""Our built-in GPU runtime: a Llama-style decoder running a checkpoint's own bytes, built to sit near the memory
bandwidth limit at small batch. Families (attention_traits): Llama and Mistral as they are; Qwen2 adds a q/k/v
bias, Qwen3 an RMSNorm over each head of q and k before the rotary (and a head size of its own, 128, where
hidden / heads may differ); a config's attention_bias (Llama, Qwen3) puts a bias on all four projections.

- Static KV cache (batch, kv_heads, input_len + output_len, head_dim).
- Decode: each decoder block compiled once by torch.compile (every block has the same shapes, the weights are
  arguments), the whole step (embedding, 32 blocks, lm_head, greedy argmax, position + 1) captured in one CUDA
  graph and replayed per token. Per block: the Triton linears return per-program partial sums, which the next
  kernel sums; both norms by kernels.residual_norm (the residual add, w h and partial sums of squares, many
  programs per row: 1 / rms commutes with the linear after it), the attention kernel (rotary, the cache write,
  attention from the q/k/v product's partial sums) and kernels.silu_product applying 1 / rms; the MLP output is
  added to the stream in the next block's first norm.
- Linears by kind (toolchain.engine.weights): bf16 by the Triton GEMV up to kernels.GEMV_MAX_M rows (partial
  sums, as below), by cuBLAS above; INT4 W4A16 and FP8 weight-only by the Triton
  kernels of toolchain.engine.kernels (packed weights read once, dequantized in registers; INT4 of groups of
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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BuildError
from . import kernels
from .config import EngineConfig
from .ops import decode_attention, dense_mm, fp8_mm, int4_mm, residual_norm, silu_product
from .weights import Checkpoint, Linear

BLOCK_LINEARS = ("qkv", "o", "gate_up", "down")
# Per-block tensors beside the linears, None where the family has none: passed to every block after the linears'
# tensors (tensors only, so that one compiled graph serves every layer).
BLOCK_EXTRAS = ("qkv_bias", "o_bias", "q_norm", "k_norm")


@dataclass(frozen=True)
class AttentionTraits:
    qkv_bias: bool  # a bias on q, k and v
    o_bias: bool  # a bias on o
    qk_norm: bool  # RMSNorm(head_dim) on each head of q and k after the bias, before the rotary
    window: int | None  # sliding-window attention: positions a token sees (None: all)


def attention_traits(cfg: dict[str, Any]) -> AttentionTraits:
    """What a family's attention adds to Llama's, from its description (toolchain.families): q/k/v (and o)
    biases, per-head q/k RMSNorm, and the sliding window where the config turns it on (Mistral's on every layer,
    Qwen's only under use_sliding_window)."""
    from .. import families
    from ..families.base import O_PROJ, Q_PROJ

    try:
        fam = families.family_of(cfg)
    except families.UnsupportedModel as e:
        raise BuildError(f"the built-in runtime: {e}") from None
    if cfg.get("mlp_bias"):
        raise BuildError("the built-in runtime has no MLP bias (config.json mlp_bias: true)")
    biased = fam.biases(cfg)
    mt = cfg.get("model_type")
    window = cfg.get("sliding_window") if mt == "mistral" or cfg.get("use_sliding_window") else None
    return AttentionTraits(qkv_bias=Q_PROJ in biased, o_bias=O_PROJ in biased,
                           qk_norm=fam.qk_norm, window=window or None)


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
        # transformers 5 writes rope_parameters {rope_type, rope_theta}; older configs rope_theta and rope_scaling
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise BuildError(f"the built-in runtime has no rope scaling {rope!r}")
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        self.cfg, self.device, self.dtype, self.use_kernels = cfg, device, dtype, use_kernels
        self.mode = ckpt.mode
        self.n_layers, self.hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
        self.n_heads, self.head_dim = cfg["num_attention_heads"], head_dim(cfg)
        self.n_kv = cfg.get("num_key_value_heads", self.n_heads)
        self.eps, self.vocab = cfg.get("rms_norm_eps", 1e-6), cfg["vocab_size"]
        self.traits = attention_traits(cfg)
        self.parts = self._load(ckpt)
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
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
        # range where the residual stream holds large values (bf16 has float32's range). A bias comes after the
        # norm's scale: the attention kernel adds it there.
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

        def tensor(name):
            if not ckpt.has(name):
                raise BuildError(f"the checkpoint has no {name}, which its model_type "
                                 f"{self.cfg.get('model_type')!r} needs")
            return ckpt.get(name).to(dev, dt)

        t = self.traits

        layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            q, k, v = (lin(f"{p}.self_attn.{x}_proj") for x in "qkv")
            gate, up = lin(f"{p}.mlp.gate_proj"), lin(f"{p}.mlp.up_proj")
            layers.append({"ln1": ckpt.get(f"{p}.input_layernorm.weight").to(dev, dt),
                           "ln2": ckpt.get(f"{p}.post_attention_layernorm.weight").to(dev, dt),
                           "qkv": concat([q, k, v]), "o": lin(f"{p}.self_attn.o_proj"),
                           "gate_up": concat([gate, up]), "down": lin(f"{p}.mlp.down_proj"),
                           "qkv_bias": torch.cat([tensor(f"{p}.self_attn.{x}_proj.bias") for x in "qkv"])
                           if t.qkv_bias else None,
                           "o_bias": tensor(f"{p}.self_attn.o_proj.bias") if t.o_bias else None,
                           "q_norm": tensor(f"{p}.self_attn.q_norm.weight") if t.qk_norm else None,
                           "k_norm": tensor(f"{p}.self_attn.k_norm.weight") if t.qk_norm else None})
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
        norms += sum(lay[k].numel() * lay[k].element_size() for lay in self.parts["layers"] for k in BLOCK_EXTRAS
                     if lay[k] is not None)  # biases and q/k norms
        return sum(x.nbytes() for x in lins) + self.parts["lm_head"].nbytes() + norms + \
            batch * self.hidden * self.parts["embed"].element_size()

    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    # -- forward ---------------------------------------------------------------------------------------------

    def alloc_cache(self, batch: int, max_len: int) -> None:
        if self.traits.window is not None and max_len > self.traits.window:
            raise BuildError(f"the built-in runtime attends to every position: {max_len} positions exceed the "
                             f"model's sliding window of {self.traits.window}")
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
        compiled graph serves every layer; then BLOCK_EXTRAS, each a tensor or None)."""
        qkv_l, o_l, gu_l, down_l = (self._as_linear(i, *w[3 * i : 3 * i + 3]) for i in range(4))
        qkv_b, o_b, q_n, k_n = w[12:16]
        b = h.shape[0]
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if self.split_norm:
            return self._split_norm_block(h, d, kc, vc, pos, cos, sin, ln1, ln2, qkv_l, o_l, gu_l, down_l, *w[12:16])
        if d is not None:
            h = h + summed(d).to(h.dtype)
        x = rms_norm(h, ln1, self.eps)
        if self.fused_attention:
            att = decode_attention(self._partials(x, qkv_l), kc, vc, cos, sin, pos, nh, nkv, None, 1, 0.0,
                                   self.engine.attention_warps, qkv_b, q_n, k_n, self.eps)
        else:
            q, k, v = self._heads(self._lin(x, qkv_l).view(b, 1, -1), qkv_b, q_n, k_n)
            c, s = cos.index_select(0, pos.view(1))[0], sin.index_select(0, pos.view(1))[0]
            q, k = rotate(q, c, s), rotate(k, c, s)
            kc.index_copy_(2, pos.view(1), k)
            vc.index_copy_(2, pos.view(1), v)
            att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.view(1, 1, 1, -1), enable_gqa=nkv != nh)
            att = att.reshape(b, nh * hd)
        h = h + summed(self._o_partials(att, o_l, o_b)).to(h.dtype)
        x = rms_norm(h, ln2, self.eps)
        gu = summed(self._partials(x, gu_l))  # float32 until the SiLU product (one fused kernel when compiled)
        inter = gu.shape[-1] // 2
        return h, self._partials((F.silu(gu[:, :inter]) * gu[:, inter:]).to(h.dtype), down_l)

    def _split_norm_block(self, h, d, kc, vc, pos, cos, sin, ln1, ln2, qkv_l, o_l, gu_l, down_l, qkv_b, o_b, q_n,
                          k_n):
        """`_block` with both norms by residual_norm (many programs per row): the products take w h, and the
        attention kernel and the SiLU product apply 1 / rms (kernels.residual_norm says why)."""
        eng = self.engine
        h, u, ss = residual_norm(h, d, ln1, eng.norm_block)
        att = decode_attention(self._partials(u, qkv_l), kc, vc, cos, sin, pos, self.n_heads, self.n_kv, ss,
                               self.hidden, self.eps, eng.attention_warps, qkv_b, q_n, k_n, self.eps)
        h, u, ss = residual_norm(h, self._o_partials(att, o_l, o_b), ln2, eng.norm_block)
        act = silu_product(self._partials(u, gu_l), ss, self.hidden, self.eps, h.dtype, eng.silu_block)
        return h, self._partials(act, down_l)

    def _heads(self, qkv: torch.Tensor, bias: torch.Tensor | None, q_norm: torch.Tensor | None,
               k_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q/k/v product (B, T, (heads + 2 kv_heads) d) in the activation dtype -> q, k, v (B, heads, T, d),
        before the rotary: its bias added and each head of q and k normalized where the family has them, in
        transformers' order (the projection with its bias, then the norm in float32 rounded to the dtype)."""
        b, t, _ = qkv.shape
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if bias is not None:
            qkv = qkv + bias.to(qkv.dtype)
        q = qkv[..., : nh * hd].view(b, t, nh, hd)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, t, nkv, hd)
        v = qkv[..., (nh + nkv) * hd :].view(b, t, nkv, hd)
        if q_norm is not None:
            q, k = rms_norm(q, q_norm, self.eps), rms_norm(k, k_norm, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _o_partials(self, att: torch.Tensor, o_l: Linear, o_b: torch.Tensor | None) -> torch.Tensor:
        """The o product's partial sums, its bias (if any) one more slice: every consumer sums the slices."""
        parts = self._partials(att, o_l)
        if o_b is None:
            return parts
        return torch.cat((parts, o_b.to(parts.dtype).expand(1, parts.shape[1], -1)))

    def block_output(self, h, *args) -> torch.Tensor:
        """One block's output (the stream after it) on the stream h: `_block` with its MLP output added."""
        h, d = self._block(h, None, *args)
        return h + summed(d).to(h.dtype)

    def _as_linear(self, i: int, weight, scale, zero) -> Linear:
        kind, group, tiled = self.block_kinds[i]
        return Linear(kind, (weight.shape[0], 0), weight, scale, zero, group, tiled)

    @staticmethod
    def _flat(lay: dict[str, Any]) -> list:
        return [t for k in BLOCK_LINEARS for t in (lay[k].weight, lay[k].scale, lay[k].zero)] + \
            [lay[k] for k in BLOCK_EXTRAS]

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
        q, k, v = self._heads(self._lin(x, lay["qkv"]).view(b, t, -1), lay["qkv_bias"], lay["q_norm"], lay["k_norm"])
        q, k = rotate(q, self.cos[:t], self.sin[:t]), rotate(k, self.cos[:t], self.sin[:t])
        if self.caches is not None:
            self.caches[0][i][:, :, :t] = k
            self.caches[1][i][:, :, :t] = v
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
        h = h + summed(self._o_partials(att.transpose(1, 2).reshape(b * t, nh * hd), lay["o"],
                                        lay["o_bias"])).to(h.dtype)
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
