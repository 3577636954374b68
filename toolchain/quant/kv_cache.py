"""FP8 KV-cache scales, calibrated: one K and one V scale per decoder layer, amax / 448 of what the runtime stores in
its cache (K after the k_proj, k_norm where the family has one, and RoPE; V as projected), over the calibration
samples. vLLM and SGLang read them from compressed-tensors' `self_attn.k_scale` / `v_scale` and cast K / scale and
V / scale to E4M3 (saturating) when writing the cache; TensorRT-LLM reads the same values from ModelOpt's
`k_proj.k_scale` / `v_proj.v_scale`.

The samples run through the source's float weights with the block-streamed runner (toolchain.validate.streamed:
one decoder block resident); an attention function registered with transformers sees K and V exactly where the
attention kernel gets them and records their absolute maxima.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at import: the planner reads KV_CALIBRATION
    import torch

FP8_MAX = 448.0
OBSERVE = "toolchain-kv-observe"
# Version of this calibration, in the quantize key beside the calibration data (bump when the scales change).
KV_CALIBRATION = "amax/448 of post-RoPE K and of V per layer, float source weights, v1"
_amax: dict[int, list[float]] = {}  # layer -> [k amax, v amax] of the current calibration


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def observe(module, query, key, value, attention_mask, **kwargs):
        seen = _amax.setdefault(module.layer_idx, [0.0, 0.0])
        seen[0] = max(seen[0], float(key.detach().abs().amax()))
        seen[1] = max(seen[1], float(value.detach().abs().amax()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(OBSERVE, observe)


def calibrate(config: dict[str, Any], weights: Callable[[str], torch.Tensor], ids: torch.Tensor,
              device: str | None = "auto", reporter: Any = None) -> dict[str, torch.Tensor]:
    """{model.layers.i.self_attn.k_scale / v_scale: float32 (1,)}, as llm-compressor stores them, in float32
    arithmetic (the runner computes in float32)."""
    import torch

    from ..validate.streamed import StreamedModel

    _register()
    _amax.clear()
    model = StreamedModel(config, weights, device, "float32", torch.float32)
    model.cfg._attn_implementation = OBSERVE
    model.run([row for row in ids], reporter)
    tiny = torch.finfo(torch.float32).tiny
    out = {}
    for i in range(config["num_hidden_layers"]):
        k, v = _amax[i]
        for name, amax in (("k_scale", k), ("v_scale", v)):
            out[f"model.layers.{i}.self_attn.{name}"] = torch.tensor([max(amax / FP8_MAX, tiny)], dtype=torch.float32)
    return out


def fake_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """What the cache holds, read back: x / scale cast to E4M3 with saturation, times scale (vLLM's scaled
    conversion)."""
    import torch

    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale
