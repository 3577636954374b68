"""SmoothQuant (Xiao et al., 2023) for W8A8 INT8: int8 weights per output channel, int8 activations per token,
computed at run time (dynamic). A few activation channels are far larger than the rest, which per-token int8
rounds badly; SmoothQuant divides channel j of the activation by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) and
multiplies the weights' column j by it, moving the difficulty into the weights. The product is unchanged in float.

Per decoder block, for the linears that read a norm's output (AWQ's groups, toolchain.quant.awq.LLAMA_GROUPS, with
a norm as producer: input_layernorm -> q, k, v; post_attention_layernorm -> gate, up):
1. the group's calibration inputs X (the float block's, after the quantized blocks before it);
2. for alpha on a grid in [0, 1] (or the profile's fixed alpha): the group's output error with both sides
   quantized, ||X W^T - Qa(X / s) Qw(W diag(s))^T||^2 over the calibration tokens, Qa per token, Qw per channel;
   the alpha with the smallest error is kept, or no smoothing at all (s = 1) when that is better still, so the
   search never does worse than plain W8A8 on the calibration tokens;
3. fold: the norm weight is divided by s (as AWQ folds), the consumers' columns multiplied by s;
4. every linear of the block is quantized with RTN int8 per channel (toolchain.quant.rtn). o_proj and down_proj
   have no norm before them and are quantized as they are.
"""

from __future__ import annotations

import torch

from ..ir import QuantizedLinear
from .awq import LLAMA_GROUPS
from .rtn import quantize_rtn

ACTIVATIONS = "dynamic-per-token-int8"
MAX_TOKENS = 4096  # tokens the alpha search scores on (a fixed, evenly spaced subset of the calibration tokens)


def fake_act_int8(x: torch.Tensor, qmax: float = 127.0) -> torch.Tensor:
    """Dynamic per-token symmetric int8, as vLLM's dynamic_scaled_int8_quant kernel quantizes a W8A8 input
    (csrc/quantization/compressed_tensors/int8_quant_kernels.cu): scale = amax / 127, x * (127 / amax) rounded
    half to even and saturated to [-128, 127]. compressed-tensors' own emulation (what transformers runs) divides
    by 127.5 instead (calculate_qparams: range 255 / 2): `qmax=127.5` reproduces it."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    if qmax == 127.0:
        return torch.clamp(torch.round(x * (127.0 / amax)), -128, 127) * (amax / 127.0)
    scale = amax / qmax
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def fake_weight_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    return quantize_rtn(w, 8, None, True, "channel", scale_dtype).dequantize(torch.float32)


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, scale_dtype: torch.dtype,
               ref: list[torch.Tensor]) -> float:
    """sum over the linears of ||Qa(x / s) Qw(w diag(s))^T - x w^T||^2."""
    xq = fake_act_int8(x / s)
    return sum(float(((xq @ fake_weight_int8(w.float() * s, scale_dtype).T - r) ** 2).sum())
               for w, r in zip(weights, ref, strict=True))


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], alphas: list[float], scale_dtype: torch.dtype
                 ) -> tuple[float | None, torch.Tensor, dict[str, float]]:
    """(alpha or None for no smoothing, s, loss per candidate) for linears sharing the input x (tokens, in)."""
    x = x.float()
    ref = [x @ w.float().T for w in weights]
    x_max = x.abs().amax(0)
    w_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    ones = torch.ones_like(x_max)
    losses = {"none": w8a8_error(x, weights, ones, scale_dtype, ref)}
    best: tuple[float, float | None, torch.Tensor] = (losses["none"], None, ones)
    for alpha in alphas:
        s = smoothing_scales(x_max, w_max, alpha)
        losses[f"{alpha:g}"] = loss = w8a8_error(x, weights, s, scale_dtype, ref)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[1], best[2], losses


def _tokens(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > MAX_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_TOKENS).long()]
    return x


def quantize_linear(w: torch.Tensor, scale_dtype: torch.dtype, alpha: float | None = None) -> QuantizedLinear:
    """int8 per channel; meta says the activations are int8 per token and which alpha smoothed it (None: none)."""
    q = quantize_rtn(w, 8, None, True, "channel", scale_dtype)
    q.meta["activations"] = ACTIVATIONS
    q.meta["smoothquant_alpha"] = alpha
    return q


@torch.no_grad()
def quantize_block(block: torch.nn.Module, prefix: str, calib, args: dict):
    """The contract of toolchain.quant.layerwise."""
    from .layerwise import BlockResult

    scale_dtype = args["scale_dtype"]
    grid = args.get("smoothquant_grid") or 11
    alphas = [args["smoothquant_alpha"]] if args.get("smoothquant_alpha") is not None else \
        [i / (grid - 1) for i in range(grid)]
    quantize = {name.removeprefix(prefix + ".") for name in calib.targets}
    groups = [g for g in LLAMA_GROUPS if g.producer_is_norm and all(c in quantize for c in g.consumers)]
    inputs = calib.capture([f"{prefix}.{g.stats}" for g in groups])
    quantized: dict[str, QuantizedLinear] = {}
    replaced: dict[str, torch.Tensor] = {}
    for g in groups:
        weights = [block.get_submodule(c).weight for c in g.consumers]
        alpha, s, _losses = search_alpha(_tokens(inputs[f"{prefix}.{g.stats}"]), weights, alphas, scale_dtype)
        if alpha is None:  # no smoothing won: nothing to fold
            for c, w in zip(g.consumers, weights, strict=True):
                quantized[f"{prefix}.{c}"] = quantize_linear(w.float(), scale_dtype)
            continue
        norm = block.get_submodule(g.producer).weight
        # The norm is stored in the source dtype: fold with the s it will hold, so weights and norm agree.
        folded = (norm.float() / s).to(norm.dtype)
        s_eff = norm.float() / folded.float()
        s_eff = torch.where(torch.isfinite(s_eff), s_eff, s)
        replaced[f"{prefix}.{g.producer}.weight"] = folded.cpu()
        for c, w in zip(g.consumers, weights, strict=True):
            quantized[f"{prefix}.{c}"] = quantize_linear(w.float() * s_eff, scale_dtype, alpha)
    for name in sorted(quantize):
        if f"{prefix}.{name}" not in quantized:
            quantized[f"{prefix}.{name}"] = quantize_linear(block.get_submodule(name).weight.float(), scale_dtype)
    return BlockResult(quantized={k: _cpu(q) for k, q in quantized.items()}, replaced=replaced)


def _cpu(q: QuantizedLinear) -> QuantizedLinear:
    from dataclasses import replace

    return replace(q, scale=q.scale.cpu(), codes=q.codes.cpu())
