"""AWQ: activation-aware weight quantization (Lin et al., 2023; llm-awq), in plain torch.

A few input channels of each linear carry large activations; their weights matter most. AWQ multiplies those
weight columns by s > 1 before rounding (and divides the activation by s), so they lose less to quantization.
Per decoder block, for each group of linears that read one activation (the family's smoothing pairs,
toolchain.families; Llama, Mistral, Qwen2 and Qwen3 all use these four, each family module says why they are exact):
    input_layernorm -> q, k, v      v_proj -> o_proj      post_attention_layernorm -> gate, up      up_proj -> down
A producer's bias is divided with its rows (Qwen2's v_proj). Qwen3's q_norm/k_norm follow q_proj/k_proj, so no
pair may have q_proj or k_proj as producer (the norm would undo the scale); toolchain.families refuses one.
1. Statistics of the activation over the calibration tokens: mean|x| per channel and H = X^T X / n.
2. Scale search: s = mean|x|^alpha (normalised so that max * min = 1) for alpha on a grid in [0, 1]; keep the
   alpha whose quantized W diag(s), fed with x / s, gives the smallest output MSE of the group's linears. With H
   that MSE is exact over every calibration token without running them again: ||X E^T||^2 / n = sum((E H) * E),
   E the effective weight error. alpha = 0 is plain RTN, so the search never does worse than RTN on it.
   Each candidate is scored as it will end: after the clipping search of step 4 (llm-awq scores before).
3. Fold: W's columns are multiplied by s and the producer (norm weight, or the previous linear's output rows)
   divided by s; the float model is unchanged. Unfolded (profile `awq_fold: false`), the producer stays and each
   scaled linear keeps `pre_quant_scale` = s in the IR: its input is x / s (toolchain.ir's convention; ModelOpt's
   `pre_quant_scale` multiplies the input, so its exporter writes 1 / s).
4. Clipping search (`awq_clip`): per row and group, shrink the quantization range to r * [min, max] for r on a
   grid down to 0.5, keeping the r with the smallest output MSE of that group's partial products (llm-awq's
   objective, exact here through H's diagonal block). Applied to q and k too (llm-awq skips them): the
   objective is their own output error, and on SmolLM2 clipping them lowered the perplexity increase.
5. Quantize with RTN (toolchain.quant.rtn), so codes, scales and zero points follow the project's conventions.

GQA: v_proj has fewer output channels than o_proj has inputs; each v channel feeds n_heads / n_kv_heads o
columns (transformers' repeat_kv). The scale is searched per v channel and repeated over those columns, which
keeps the fold exact. llm-awq and llm-compressor skip this group instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ir import QuantizedLinear
from .rtn import compute_scale_zero, int_range, quantize_rtn

QuantFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class IntSpec:
    """The RTN scheme every weight ends in: what the search must quantize with."""

    bits: int
    group_size: int | None
    symmetric: bool
    strategy: str
    scale_dtype: torch.dtype

    def quantize(self, w: torch.Tensor) -> QuantizedLinear:
        return quantize_rtn(w, self.bits, self.group_size, self.symmetric, self.strategy, self.scale_dtype)

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """w after quantization and dequantization, in float32: the same arithmetic as
        quantize(w).dequantize() (tests check bit equality), by broadcasting over groups instead of indexing
        columns, which makes the searches' many calls several times cheaper."""
        out_f, in_f = w.shape
        gs = self.group_width(in_f)
        if gs is None:
            return self.quantize(w).dequantize(torch.float32)
        wg = w.float().reshape(out_f, in_f // gs, gs)
        return _fake_groups(wg, wg.amin(-1), wg.amax(-1), self).reshape(out_f, in_f)

    def group_width(self, in_features: int) -> int | None:
        if self.strategy == "tensor":
            return None
        return in_features if self.strategy == "channel" else self.group_size


def _fake_groups(wg: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Groups wg (out, n_groups, size) quantized and dequantized with the scale and zero point RTN derives
    from the groups' min and max (out, n_groups)."""
    scale, zero = compute_scale_zero(wmin, wmax, spec.bits, spec.symmetric, spec.scale_dtype)
    s = scale.float()[..., None]
    q = torch.round(wg / s)
    qmin, qmax = int_range(spec.bits)
    if zero is None:
        return torch.clamp(q, qmin, qmax) * s
    z = zero.float()[..., None]
    return (torch.clamp(q + z, qmin, qmax) - z) * s


@dataclass(frozen=True)
class AWQOptions:
    grid: int = 20  # alpha points in [0, 1], ends included
    clip: bool = True
    fold: bool = True
    clip_grid: int = 20  # shrink steps of 1 / clip_grid ...
    max_shrink: float = 0.5  # ... down to a range of (1 - max_shrink)
    duo: bool = False  # also try llm-compressor's s = mean|x|^a / mean|w~|^(1-a) candidates
    clip_in_search: bool = True  # score each candidate scale after the clipping search (not before)
    clip_qk: bool = True  # clip q_proj and k_proj too (llm-awq does not)


class InputStats:
    """Running mean|x| per channel and H = X^T X / n of one activation, fed batch by batch."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.gram.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        return self.gram / max(self.n, 1)


def output_mse(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Sum over output channels of the mean squared output error of x -> w_hat x against x -> w x, with
    h = E[x x^T]: sum((E h) * E), E = w - w_hat."""
    e = (w - w_hat).float()
    return ((e @ h) * e).sum()


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^alpha (llm-awq), or with `w_mean` mean|x|^alpha / mean|w~|^(1-alpha) (llm-compressor's duo
    scaling; w~ is |w| over its group's max), normalised so that max(s) * min(s) = 1: the magnitude is free."""
    s = x_mean.float().clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = (s / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def weight_mean(weights: list[torch.Tensor], group: int | None) -> torch.Tensor:
    """Per input column, the mean over all rows of |w| divided by its group's max (llm-compressor's w_mean)."""
    rows = []
    for w in weights:
        out_f, in_f = w.shape
        gs = group or in_f
        a = w.float().abs().reshape(out_f, in_f // gs, gs)
        rows.append((a / (a.amax(-1, keepdim=True) + 1e-6)).reshape(out_f, in_f))
    return torch.cat(rows).mean(0)


@dataclass
class ScaleSearch:
    scale: torch.Tensor  # per channel of the activation (before any repeat)
    alpha: float
    loss: float  # output MSE at the chosen candidate
    loss_rtn: float  # at alpha = 0 without duo, i.e. plain RTN (with clipping when the search clips)
    losses: list[float] = field(default_factory=list)
    duo: bool = False  # the chosen candidate is a duo one


ClipFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def search_scale(weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, quant: QuantFn,
                 grid: int = 20, index: torch.Tensor | None = None, w_mean: torch.Tensor | None = None,
                 clips: list[ClipFn | None] | None = None) -> ScaleSearch:
    """Best AWQ scale for linears that share one input. `weights` (out_i, in) each, `h` = E[x x^T] (in, in).
    `index`, when given, maps each input column to its entry of `x_mean`/the scale (the GQA repeat).
    `w_mean` adds the duo candidates; `clips[i](w, h)`, when given, clips weight i (scaled, with the
    activation's H as the scaled input sees it) before it is quantized, so candidates are scored as they end."""
    alphas = [i / (grid - 1) for i in range(grid)] if grid > 1 else [0.0]
    candidates = [(a, False) for a in alphas] + ([(a, True) for a in alphas] if w_mean is not None else [])
    clips = clips or [None] * len(weights)
    losses = []
    best: tuple[float, float, bool, torch.Tensor] | None = None
    for alpha, duo in candidates:
        s = candidate_scales(x_mean, alpha, w_mean if duo else None)
        cols = s[index] if index is not None else s
        h_s = h / (cols[:, None] * cols[None, :]) if any(clips) else None
        loss = 0.0
        for w, clip in zip(weights, clips, strict=True):
            ws = w.float() * cols
            loss += output_mse(w, quant(clip(ws, h_s) if clip else ws) / cols, h).item()
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, duo, s)
    return ScaleSearch(scale=best[3], alpha=best[1], loss=best[0], loss_rtn=losses[0], losses=losses, duo=best[2])


def search_clip(w: torch.Tensor, h: torch.Tensor, spec: IntSpec, grid: int = 20, max_shrink: float = 0.5
                ) -> torch.Tensor:
    """w with each (row, group) clamped to r * [min, max], r chosen per (row, group) to minimise that group's
    partial output error e^T H_gg e. Quantizing the result with RTN gives the clipped scales."""
    out_f, in_f = w.shape
    gs = spec.group_width(in_f)
    if gs is None:
        return w
    ng = in_f // gs
    wg = w.float().reshape(out_f, ng, gs)
    h_blocks = torch.stack([h[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)])  # (ng, gs, gs)
    hi = wg.amax(-1).clamp(min=0)
    lo = wg.amin(-1).clamp(max=0)
    if spec.symmetric:
        hi = hi.maximum(-lo)
        lo = -hi
    best_err = torch.full((out_f, ng), float("inf"), device=w.device)
    best_r = torch.ones(out_f, ng, device=w.device)
    for i in range(int(max_shrink * grid)):
        r = 1 - i / grid
        # The clamped group's min and max are exactly lo * r and hi * r: no need to measure them again.
        lo_r, hi_r = lo * r, hi * r
        cw = torch.minimum(torch.maximum(wg, lo_r[..., None]), hi_r[..., None])
        e = (wg - _fake_groups(cw, lo_r, hi_r, spec)).transpose(0, 1)  # (ng, out, gs)
        err = (torch.bmm(e, h_blocks) * e).sum(-1).T
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, r, best_r)
    lo_b, hi_b = (lo * best_r)[..., None], (hi * best_r)[..., None]
    return torch.minimum(torch.maximum(wg, lo_b), hi_b).reshape(out_f, in_f).to(w.dtype)


def gqa_index(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each input column of o_proj, the v_proj output channel it reads (transformers' repeat_kv)."""
    heads = torch.arange(num_heads) // (num_heads // num_kv_heads)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def reduce_to_index(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of x's entries over the columns that share one index."""
    # On the CPU: index_add_ on CUDA accumulates with atomics, in no fixed order, and the scale search would
    # then pick differently from run to run.
    xc, ic = x.float().cpu(), index.cpu()
    total = torch.zeros(size).index_add_(0, ic, xc)
    count = torch.zeros(size).index_add_(0, ic, torch.ones_like(xc))
    return (total / count).to(x.device)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (relative names) reading one activation, and what produces it: a norm weight or a linear."""

    producer: str  # "input_layernorm" (a norm: fold into .weight) or "self_attn.v_proj" (a linear: its rows)
    consumers: tuple[str, ...]
    stats: str  # which InputStats describes the activation: the first consumer's input

    @property
    def producer_is_norm(self) -> bool:
        return self.producer.endswith("norm")


def groups_of(model_type: str) -> tuple[ScaleGroup, ...]:
    """The scale groups of a family: its smoothing pairs (toolchain.families, where each family says why they are
    exact for it), each described by its first consumer's input statistics."""
    from ..families import family_of

    return tuple(ScaleGroup(p.producer, p.consumers, p.consumers[0])
                 for p in family_of({"model_type": model_type}).smoothing)


LLAMA_GROUPS = groups_of("llama")
NO_CLIP = ("q_proj", "k_proj")  # llm-awq's choice (clipping query/key hurts attention scores); see clip_qk


@dataclass
class ScaledBlock:
    """A block after the scale search, before quantization: float weights with s in their columns, producers
    divided by s (when folding), and the activation statistics as the scaled linears now see them."""

    weights: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    col_scale: dict[str, torch.Tensor]  # per consumer: the s its columns were multiplied by
    hessians: dict[str, torch.Tensor]
    searches: dict[str, ScaleSearch]
    changed: set[str]  # producers divided by s


def scale_block(linears: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], stats: dict[str, InputStats],
                quantize: set[str], spec: IntSpec, opts: AWQOptions, attn_shape: tuple[int, int, int],
                biases: dict[str, torch.Tensor] | None = None,
                groups: tuple[ScaleGroup, ...] = LLAMA_GROUPS) -> ScaledBlock:
    """The scale search of one decoder block given as tensors (see awq_block for the arguments)."""
    w = {k: v.float().clone() for k, v in linears.items()}
    b = {k: v.float().clone() for k, v in (biases or {}).items()}
    norm_w = {k: v.float().clone() for k, v in norms.items()}
    out = ScaledBlock(w, norm_w, b, {}, {k: st.hessian for k, st in stats.items()}, {}, set())
    x_mean = {k: st.mean_abs for k, st in stats.items()}
    for g in groups:
        consumers = [c for c in g.consumers if c in w]
        if not consumers or not all(c in quantize for c in consumers) or g.producer not in {**w, **norm_w}:
            continue  # scaling helps only the quantized; a float consumer would just change for nothing
        index = None
        mean = x_mean[g.stats]
        if g.producer == "self_attn.v_proj" and w[g.producer].shape[0] != w[consumers[0]].shape[1]:
            index = gqa_index(*attn_shape).to(mean.device)
            mean = reduce_to_index(mean, index, w[g.producer].shape[0])
        w_mean = None
        if opts.duo:
            w_mean = weight_mean([w[c] for c in consumers], spec.group_width(w[consumers[0]].shape[1]))
            w_mean = reduce_to_index(w_mean, index, mean.shape[0]) if index is not None else w_mean
        clips = [_clipper(c, spec, opts) if opts.clip_in_search else None for c in consumers]
        found = search_scale([w[c] for c in consumers], mean, out.hessians[g.stats], spec.fake, opts.grid, index,
                             w_mean, clips)
        out.searches[g.producer] = found
        s = found.scale
        if not opts.fold:
            # Unfolded, s itself is stored (as pre_quant_scale): scale the weights by the value a loader reads.
            s = s.to(spec.scale_dtype).float()
        cols = s[index] if index is not None else s
        for c in consumers:
            w[c] = w[c] * cols
            out.col_scale[c] = cols
        # The activation becomes x / s: its statistics follow, for the clipping search and later groups.
        out.hessians[g.stats] = out.hessians[g.stats] / (cols[:, None] * cols[None, :])
        x_mean[g.stats] = x_mean[g.stats] / cols
        if opts.fold:
            if g.producer_is_norm:
                norm_w[g.producer] = norm_w[g.producer] / s
            else:
                w[g.producer] = w[g.producer] / s[:, None]
                if g.producer in b:
                    b[g.producer] = b[g.producer] / s
            out.changed.add(g.producer)
    return out


@dataclass
class BlockAWQ:
    """What AWQ did to one block: quantized linears (relative names), changed plain tensors (norm weights;
    unquantized producers' weights and biases), and the search's figures for the report."""

    quantized: dict[str, QuantizedLinear]
    replaced: dict[str, torch.Tensor]
    searches: dict[str, ScaleSearch]


def awq_block(linears: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], stats: dict[str, InputStats],
              quantize: set[str], spec: IntSpec, opts: AWQOptions, attn_shape: tuple[int, int, int],
              biases: dict[str, torch.Tensor] | None = None,
              groups: tuple[ScaleGroup, ...] = LLAMA_GROUPS) -> BlockAWQ:
    """AWQ over one Llama decoder block given as tensors. `linears`: relative name -> weight (out, in);
    `norms`: "input_layernorm" / "post_attention_layernorm" -> weight; `stats`: the float block's activation
    statistics, keyed by the consumer linear they feed (q_proj, o_proj, gate_proj, down_proj suffice);
    `quantize`: the linears to quantize (others stay float); attn_shape: (num_heads, num_kv_heads, head_dim);
    `groups`: the family's scale groups (groups_of)."""
    sb = scale_block(linears, norms, stats, quantize, spec, opts, attn_shape, biases, groups)
    quantized: dict[str, QuantizedLinear] = {}
    for name in sorted(quantize):
        stat = _stats_key(name, groups)
        wq = sb.weights[name]
        clip = _clipper(name, spec, opts)
        if clip is not None and stat in sb.hessians:
            wq = clip(wq, sb.hessians[stat])
        q = spec.quantize(wq)
        if not opts.fold and name in sb.col_scale:
            # One tensor per layer (q, k, v share the values): safetensors refuses shared storage.
            q.extras["pre_quant_scale"] = sb.col_scale[name].to(spec.scale_dtype).clone()
        quantized[name] = q
    replaced = {f"{k}.weight": v for k, v in sb.norms.items() if k in sb.changed}
    replaced.update({f"{k}.weight": sb.weights[k] for k in sb.changed if k in sb.weights and k not in quantize})
    replaced.update({f"{k}.bias": sb.biases[k] for k in sb.changed if k in sb.biases})
    return BlockAWQ(quantized=quantized, replaced=replaced, searches=sb.searches)


def _clipper(name: str, spec: IntSpec, opts: AWQOptions) -> ClipFn | None:
    if not opts.clip or (name.endswith(NO_CLIP) and not opts.clip_qk):
        return None
    return lambda w, h: search_clip(w, h, spec, opts.clip_grid, opts.max_shrink)


def _stats_key(name: str, groups: tuple[ScaleGroup, ...]) -> str:
    """Which activation statistics describe a linear's input (q/k/v share q's, gate/up share gate's)."""
    for g in groups:
        if name in g.consumers:
            return g.stats
    return name


# -- the layer-wise runner's entry point (toolchain.quant.layerwise) -------------------------------------------

def options_from(args: dict) -> AWQOptions:
    """The profile's awq_* fields. Keys `_awq_duo`, `_awq_clip_in_search`, `_awq_clip_qk` (never in a profile)
    switch the search variants for ablation scripts."""
    extra = {k: args[f"_awq_{k}"] for k in ("duo", "clip_in_search", "clip_qk") if f"_awq_{k}" in args}
    return AWQOptions(grid=args.get("awq_grid") or AWQOptions.grid, clip=args.get("awq_clip", AWQOptions.clip),
                      fold=args.get("awq_fold", AWQOptions.fold), **extra)


def spec_from(args: dict) -> IntSpec:
    return IntSpec(args["bits"], args["group_size"], args["symmetric"], args["strategy"], args["scale_dtype"])


@torch.no_grad()
def quantize_block(block: torch.nn.Module, prefix: str, calib, args: dict):
    """AWQ on one decoder block (the contract of toolchain.quant.layerwise): statistics of each scaled
    activation from one pass of the float block over the calibration inputs, then awq_block."""
    from .layerwise import BlockResult

    linears = {rel: m for rel, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    attn = block.self_attn
    groups = groups_of(attn.config.model_type)
    wanted = {g.stats for g in groups if g.stats in linears}
    stats = {k: InputStats(linears[k].in_features, calib.device) for k in wanted}
    calib.collect([f"{prefix}.{k}" for k in wanted], lambda name, x: stats[name.removeprefix(prefix + ".")].add(x))
    norms = {k: block.get_submodule(k).weight for k in ("input_layernorm", "post_attention_layernorm")
             if hasattr(block, k)}
    attn_shape = (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim)
    quantize = {name.removeprefix(prefix + ".") for name in calib.targets}
    done = awq_block({k: m.weight for k, m in linears.items()}, norms, stats, quantize, spec_from(args),
                     options_from(args), attn_shape, {k: m.bias for k, m in linears.items() if m.bias is not None},
                     groups)
    return BlockResult(
        quantized={f"{prefix}.{k}": _to_cpu(q) for k, q in done.quantized.items()},
        replaced={f"{prefix}.{k}": t.cpu() for k, t in done.replaced.items()},
    )


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    def cpu(t):
        return None if t is None else t.cpu()

    return QuantizedLinear(q.type, q.shape, q.scale.cpu(), codes=cpu(q.codes), zero=cpu(q.zero), g_idx=cpu(q.g_idx),
                           weight_fp8=cpu(q.weight_fp8), extras={k: v.cpu() for k, v in q.extras.items()},
                           meta=q.meta)
