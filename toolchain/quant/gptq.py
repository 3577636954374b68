"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time, each time spreading the rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

For a linear y = x W^T with calibration inputs X (tokens, in):
  H = 2 X^T X / n                      (the Hessian of ||X W^T - X Q^T||^2 in each row of W)
  dead columns (diag(H) == 0): H_ii = 1, W[:, i] = 0  (an input that is always 0 carries no information)
  H += damp * mean(diag(H)) * I        (dampening keeps the Cholesky stable)
  U = cholesky(H^-1, upper)            (row i of U is what the OBS update of column i needs)
  for each column i (in blocks of 128; the error reaches later blocks in one matmul per block):
      q_i = quant(w_i);  e = (w_i - q_i) / U_ii;  w_j -= e U_ij for j > i
Group scales/zeros are computed with toolchain.quant.rtn.compute_scale_zero (the project's conventions: signed
codes, signed zero): from the *updated* columns of a group when the sweep reaches its first column, or, with
static_groups, from the original weights before the sweep.
  act_order      sweep columns by decreasing diag(H); groups are formed in that order, so the IR stores
                 g_idx (group of each input column, in the original order); meta["actorder"] = "group".
  static_groups  every group's scale/zero comes from the original weights before the sweep (llm-compressor's
                 way); with act_order the groups stay contiguous in the original order (no g_idx: fast
                 kernels) and meta["actorder"] = "weight", as compressed-tensors names it.
  observer       how a group's range is chosen: "minmax" (RTN's); "mse" shrinks it to p * [min, max], p on a
                 grid down to 0.2, keeping per row the p of least sum |w - q(w)|^2.4 (GPTQ's reference search);
                 "hessian_mse" weighs that sum by diag(H), i.e. by how much each input column matters to the
                 output. The candidates include p = 1, so the search never does worse than min/max on its
                 objective.

The block procedure (quantize_block) is true-sequential for Llama-style blocks: q/k/v, then o, then gate/up,
then down, each fed with the block's inputs as transformed by the already-quantized linears before it. Linears
that read the same activation (q/k/v; gate/up) share one Hessian and are swept together as one stacked matrix
(GPTQ treats rows independently, so this is exact). The block runs about once in all: each stage's activations
are kept and reused for the next, and the block's outputs are returned to the runner.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..ir import QuantizedLinear
from . import gptq_triton
from .layerwise import BlockCalibration, BlockResult, tf32_matmuls
from .rtn import compute_scale_zero, int_range

BLOCK = 128
OBSERVERS = ("minmax", "mse", "hessian_mse")
MSE_GRID, MSE_MAX_SHRINK = 80, 0.8  # the "mse" observer's candidates: 1.0, 0.99, ..., 0.2 of the min/max range


class Hessian:
    """Running 2 X^T X / n of one activation, fed batch by batch (float32)."""

    def __init__(self, features: int, device: torch.device):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        """H itself; the running sum becomes it in place (no second in x in matrix: 0.5 GiB at in = 11008)."""
        return self.sum.mul_(2.0 / max(self.n, 1)) if self.n else self.sum


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, observer: str = "minmax",
                  col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (out,) and zero (out,) or None of columns w (out, k), as RTN computes them from min/max; with
    observer "mse", the range is shrunk to p * [min, max] for the p in a grid that minimises each row's
    sum |w - q(w)|^2.4 (GPTQ's reference search; `col_weight` (k,) weighs the columns, e.g. by diag(H))."""
    wmin, wmax = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if observer == "minmax":
        scale, zero = compute_scale_zero(wmin, wmax, bits, symmetric, scale_dtype)
        return scale[:, 0], (zero[:, 0] if zero is not None else None)
    qmin, qmax = int_range(bits)
    grid = torch.linspace(1.0, 1.0 - MSE_MAX_SHRINK, MSE_GRID + 1, device=w.device)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    best_zero = None if symmetric else torch.empty(w.shape[0], dtype=torch.int8, device=w.device)
    # Candidates a chunk at a time: (candidates, out, k) temporaries of ~64 MiB whatever the layer's size.
    step = max(1, (1 << 24) // max(1, w.numel()))
    rows = torch.arange(w.shape[0], device=w.device)
    for c in range(0, len(grid), step):
        p = grid[c : c + step, None, None]  # (P, 1, 1)
        scale, zero = compute_scale_zero(p * wmin, p * wmax, bits, symmetric, scale_dtype)  # (P, out, 1)
        s = scale.float()
        z = zero.float() if zero is not None else 0.0
        err = ((torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s - w).abs_().pow_(2.4)
        if col_weight is not None:
            err = err * col_weight
        chunk_err, idx = err.sum(-1).min(0)  # (out,): the first of equal minima, as argmin
        better = chunk_err < best_err  # strict: an earlier (wider) range wins a tie
        best_err = torch.where(better, chunk_err, best_err)
        best_scale = torch.where(better, scale[idx, rows, 0], best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, zero[idx, rows, 0], best_zero)
    return best_scale, best_zero


@contextmanager
def _cpu_threads(device: torch.device, n: int):
    """The sweep is thousands of small ops: on CPU, OpenMP's barrier per op costs more than it gains (and
    stalls whenever another process holds a core), so it runs on one thread."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *args: Any, **kwargs: Any) -> QuantizedLinear:
    """GPTQ of one weight (out, in) given H (in, in): see _gptq for the arguments. The sweep runs in full
    float32 (no TF32: its error feedback is what GPTQ is about)."""
    with _cpu_threads(weight.device, 1), tf32_matmuls(weight.device, False):
        return _gptq(weight, hessian, *args, **kwargs)


@torch.no_grad()
def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = BLOCK,
    observer: str = "minmax",
) -> QuantizedLinear:
    """GPTQ of one weight (out, in) given H (in, in); `group_size` None = one group per row (per channel)."""
    out_f, in_f = weight.shape
    dev = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=dev, dtype=torch.float32).clone()
    gs = group_size or in_f
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    n_groups = in_f // gs
    qmin, qmax = int_range(bits)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r} (known: {', '.join(OBSERVERS)})")
    obs = "minmax" if observer == "minmax" else "mse"

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    codes = torch.zeros(out_f, in_f, dtype=torch.int8, device=dev)
    scales = torch.empty(out_f, n_groups, dtype=scale_dtype, device=dev)
    zeros = None if symmetric else torch.empty(out_f, n_groups, dtype=torch.int8, device=dev)
    # Per-channel and static groups fix every group's range before the sweep, from the original columns.
    fixed = group_size is None or static_groups
    if fixed:
        hd = torch.diag(h) if observer == "hessian_mse" else None
        for g in range(n_groups):
            cols = slice(g * gs, (g + 1) * gs)
            scales[:, g], zero = _group_params(w[:, cols], bits, symmetric, scale_dtype, obs,
                                               hd[cols] if hd is not None else None)
            if zeros is not None:
                zeros[:, g] = zero

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=dev)
    if act_order:  # (without it perm is the identity: no copies of w and H)
        w = w[:, perm]
        h = h[perm][:, perm]
    hdiag = torch.diag(h).clone() if observer == "hessian_mse" else None
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    u = _inverse_cholesky_upper(h)
    del h

    # A group must not straddle two sweep blocks, so that its scale is computed from updated columns.
    bs = max(gs, block_size // gs * gs) if group_size else block_size
    group_of = perm // gs if static_groups else torch.arange(in_f, device=dev) // gs  # by sweep position
    scales_f = scales.float() if fixed else None
    zeros_f = zeros.float() if fixed and zeros is not None else None
    fused = fixed and gptq_triton.available(dev)  # ranges known up front: one kernel launch per block
    group_list = group_of.tolist()
    scale_f = zero_f = None
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        u1 = u[i1:i2, i1:i2]
        if fused:
            cols = group_of[i1:i2]
            codes[:, i1:i2], err1 = gptq_triton.sweep_block(
                w[:, i1:i2], u1, scales_f[:, cols], zeros_f[:, cols] if zeros_f is not None else None, qmin, qmax)
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
            continue
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            g = group_list[col]
            if fixed:
                scale_f, zero_f = scales_f[:, g], (zeros_f[:, g] if zeros_f is not None else None)
            elif col % gs == 0:
                scales[:, g], zero_t = _group_params(w1[:, i:i + gs], bits, symmetric, scale_dtype, obs,
                                                     hdiag[col:col + gs] if hdiag is not None else None)
                scale_f = scales[:, g].float()
                if zeros is not None:
                    zeros[:, g] = zero_t
                    zero_f = zero_t.float()
            wc = w1[:, i]
            q = torch.round(wc / scale_f)
            if zero_f is not None:
                q = torch.clamp(q + zero_f, qmin, qmax)
                dq = (q - zero_f) * scale_f
            else:
                q = torch.clamp(q, qmin, qmax)
                dq = q * scale_f
            codes[:, col] = q.to(torch.int8)
            e = (wc - dq) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])

    inv = torch.argsort(perm)
    if act_order:
        codes = codes[:, inv]
    meta: dict[str, Any] = {"bits": bits, "symmetric": symmetric, "strategy": "group" if group_size else "channel",
                            "group_size": group_size, "observer": "mse" if obs == "mse" else "minmax", "method": "gptq"}
    g_idx = None
    if act_order and group_size and not static_groups:
        g_idx = (inv // gs).to(torch.int32)
        meta["actorder"] = "group"
    elif act_order and group_size:
        meta["actorder"] = "weight"
    return QuantizedLinear("int", (out_f, in_f), scales.cpu(), codes=codes.cpu(),
                           zero=zeros.cpu() if zeros is not None else None,
                           g_idx=g_idx.cpu() if g_idx is not None else None, meta=meta)


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; if H is not positive definite, more dampening is added until it is."""
    mean_diag = torch.mean(torch.diag(h))
    extra = 0.0
    for _ in range(8):
        hh = h if extra == 0 else h + extra * mean_diag * torch.eye(len(h), device=h.device)
        l_fac, info = torch.linalg.cholesky_ex(hh)
        if info == 0:
            hinv = torch.cholesky_inverse(l_fac)
            del l_fac  # in x in each: keep at most three alive
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info == 0:
                return u
        extra = 0.01 if extra == 0 else extra * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with dampening; raise quantize.damp")


# -- the block procedure (toolchain.quant.layerwise contract) -----------------------------------------------

def _options(args: dict[str, Any]) -> dict[str, Any]:
    grouped = args.get("strategy", "group") == "group"
    return {"bits": args["bits"], "group_size": args["group_size"] if grouped else None,
            "symmetric": args["symmetric"], "scale_dtype": args["scale_dtype"], "damp": args.get("damp", 0.01),
            "act_order": args.get("act_order", True), "static_groups": args.get("static_groups", True),
            "observer": args.get("observer", "hessian_mse")}


def quantize_stack(linears: dict[str, nn.Linear], hessian: torch.Tensor, args: dict[str, Any]
                   ) -> dict[str, QuantizedLinear]:
    """GPTQ of linears that read one activation, stacked by rows (one sweep); writes back dequantized weights."""
    names = list(linears)
    weights = [linears[n].weight for n in names]
    stacked = torch.cat([w.detach().float() for w in weights])
    q = gptq_quantize(stacked, hessian, **_options(args))
    out, row = {}, 0
    for n, w in zip(names, weights, strict=True):
        rows = slice(row, row + w.shape[0])
        part = QuantizedLinear("int", tuple(w.shape), q.scale[rows].clone(), codes=q.codes[rows].clone(),
                               zero=q.zero[rows].clone() if q.zero is not None else None,
                               g_idx=q.g_idx.clone() if q.g_idx is not None else None, meta=dict(q.meta))
        linears[n].weight.data = part.dequantize(w.dtype).to(w.device)
        out[n] = part
        row += w.shape[0]
    return out


def _is_llama_like(block: nn.Module) -> bool:
    need = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = dict(block.named_modules())
    return all(n in names for n in need)


class _Stop(Exception):
    pass


def _input_of(module: nn.Module, run: Any) -> torch.Tensor:
    """The input `module` receives while `run()` executes (the rest of the forward is skipped)."""
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, a: tuple) -> None:
        got.append(a[0])
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, calib: BlockCalibration, args: dict[str, Any]) -> BlockResult:
    if args.get("true_sequential", True) and _is_llama_like(block):
        return _sequential_llama(block, prefix, calib, args)
    return _all_at_once(calib, args)


def _all_at_once(calib: BlockCalibration, args: dict[str, Any]) -> BlockResult:
    """One calibration pass with the block's original weights for every target (as llm-compressor does)."""
    hessians: dict[str, Hessian] = {n: Hessian(m.in_features, calib.device) for n, m in calib.targets.items()}
    calib.collect(list(calib.targets), lambda n, x: hessians[n].add(x))
    out: dict[str, QuantizedLinear] = {}
    for n, m in calib.targets.items():
        out.update(quantize_stack({n: m}, hessians.pop(n).value(), args))
    return BlockResult(out)


def _sequential_llama(block: nn.Module, prefix: str, calib: BlockCalibration, args: dict[str, Any]) -> BlockResult:
    """q/k/v -> o -> gate/up -> down, each calibrated on the outputs of the quantized linears before it."""
    attn, mlp = block.self_attn, block.mlp
    x = calib.inputs
    batches = [(i, min(i + calib.batch_size, len(x))) for i in range(0, len(x), calib.batch_size)]
    targets = calib.targets
    quantized: dict[str, QuantizedLinear] = {}

    def quantize(rels: list[str], h: Hessian) -> None:
        lins = {f"{prefix}.{r}": targets[f"{prefix}.{r}"] for r in rels if f"{prefix}.{r}" in targets}
        if lins:
            quantized.update(quantize_stack(lins, h.value(), args))

    def attention(xb: torch.Tensor) -> torch.Tensor:  # o_proj's input: the heads' outputs
        return _input_of(attn.o_proj, lambda: attn(hidden_states=block.input_layernorm(xb), **calib.kwargs))

    h = Hessian(x.shape[-1], calib.device)
    for a, b in batches:
        h.add(block.input_layernorm(x[a:b]))
    quantize(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], h)

    # Heads' outputs with quantized q/k/v, kept for o_proj's residual below (one activation buffer).
    heads = torch.empty(*x.shape[:2], attn.o_proj.in_features, dtype=x.dtype, device=x.device)
    h = Hessian(attn.o_proj.in_features, calib.device)
    for a, b in batches:
        heads[a:b] = attention(x[a:b])
        h.add(heads[a:b])
    quantize(["self_attn.o_proj"], h)

    resid = torch.empty_like(x)
    h = Hessian(x.shape[-1], calib.device)
    for a, b in batches:
        resid[a:b] = x[a:b] + attn.o_proj(heads[a:b])
        h.add(block.post_attention_layernorm(resid[a:b]))
    del heads
    quantize(["mlp.gate_proj", "mlp.up_proj"], h)

    inter = mlp.down_proj.in_features
    # down_proj's inputs are kept for the outputs below when they fit; otherwise gate/up run once more.
    acts = torch.empty(*x.shape[:2], inter, dtype=x.dtype, device=x.device) \
        if _fits(x.shape[0] * x.shape[1] * inter * x.element_size(), x.device) else None
    h = Hessian(inter, calib.device)
    for a, b in batches:
        m = _input_of(mlp.down_proj, lambda a=a, b=b: mlp(block.post_attention_layernorm(resid[a:b])))
        h.add(m)
        if acts is not None:
            acts[a:b] = m
    quantize(["mlp.down_proj"], h)

    for a, b in batches:  # the block's outputs with every linear quantized, for the next block
        resid[a:b] += mlp.down_proj(acts[a:b]) if acts is not None else mlp(block.post_attention_layernorm(resid[a:b]))
    return BlockResult(quantized, outputs=resid)


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether an extra activation buffer fits comfortably (half the free GPU memory, a quarter of free RAM)."""
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0] // 2
    import psutil

    return nbytes < psutil.virtual_memory().available // 4


@torch.no_grad()
def quantize_head(linear: nn.Linear, name: str, inputs: torch.Tensor, args: dict[str, Any]) -> QuantizedLinear:
    """An unignored lm_head, from the final-norm hidden states."""
    h = Hessian(linear.in_features, inputs.device)
    for i in range(0, len(inputs), 8):
        h.add(inputs[i : i + 8])
    return quantize_stack({name: linear}, h.value(), args)[name]
