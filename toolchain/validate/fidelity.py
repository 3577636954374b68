"""Export fidelity: does the artifact, as its loader materialises it, compute what our IR says?

Two streamed passes (toolchain.validate.streamed) over the same windows, same runner, same device and dtype: one
over the weights the artifact's loader produced, one over our IR's dequantized weights. Their next-token
distributions are compared position by position (full-vocabulary KL(IR || artifact), top-1 agreement, max
|logit difference|). This isolates "the file is wrong" from "quantization costs accuracy", so it is meaningful on
synthetic weights, where perplexity is not. A file whose weights equal the IR's in the consumer's arithmetic gives
identical logits (KL exactly 0); a format's stated rounding (GGUF's float16 d and m, GPTQ's float16 scales from
a float32 IR) gives a tiny KL; a wrong file gives a large one. Gated at MAX_KL.

Windows: the evaluation text's first window when there is one (up to FIDELITY_TOKENS tokens), else seeded random
token ids (synthetic models have no tokenizer), so the cost stays small beside the accuracy scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .streamed import StreamedModel, WeightSource

FIDELITY_TOKENS = 256
# Mean KL (nats per token) allowed between the artifact and the IR. Exact formats give 0; the largest stated
# rounding seen here (GGUF Q4_1's float16 m of a float32 IR) stays below 1e-5 on SmolLM2.
MAX_KL = 1e-4
MIN_TOP1 = 0.99


def ir_weights(ir_dir: Path, device: str | None = None) -> WeightSource:
    """Our IR as dense weights: quantized layers dequantized (on `device`: the same products, faster; rounded
    once to the runner's dtype by it), the rest as stored."""
    from dataclasses import replace

    from ..ir import IRReader

    ir = IRReader(ir_dir)

    def on(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None or device is None else t.to(device)

    def get(name: str) -> torch.Tensor:
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in ir.layers:
            q = ir.layer(layer)
            if device is not None and q.type == "int":
                q = replace(q, scale=on(q.scale), codes=on(q.codes), zero=on(q.zero), g_idx=on(q.g_idx))
            w = q.dequantize(torch.float32)
            pqs = q.extras.get("pre_quant_scale")
            return w / pqs.float().to(w.device)[None, :] if pqs is not None else w  # x / s into w == x into w / s
        return ir.tensors.get(name)

    return get


def fidelity_ids(vocab_size: int, text_ids: torch.Tensor | None, tokens: int = FIDELITY_TOKENS) -> torch.Tensor:
    if text_ids is not None and len(text_ids) >= 2:
        return text_ids[:tokens]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (tokens,), generator=g)


@torch.inference_mode()
def export_fidelity(config: dict[str, Any], loaded: WeightSource, ours: WeightSource, ids: torch.Tensor,
                    device: str | None, dtype: str | None, checkpoint_dtype: torch.dtype,
                    reporter: Any = None) -> dict[str, Any]:
    """Logits of the artifact as loaded vs logits of our IR, same runner and windows; the figure and its gate."""
    theirs = StreamedModel(config, loaded, device, dtype, checkpoint_dtype)
    mine = StreamedModel(config, ours, device, dtype, checkpoint_dtype)
    theirs.run([ids], reporter)
    mine.run([ids], reporter)
    a, b = theirs.window_logits(0), mine.window_logits(0)
    lp_a, lp_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    kl = (lp_b.exp() * (lp_b - lp_a)).sum(-1).clamp(min=0)
    out = {
        "tokens": len(ids), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "compared": "logits of the artifact as loaded vs our IR's dequantized weights (same runner, windows)",
        **theirs.stats.protocol(), "gate": {"max_kl": MAX_KL, "min_top1_agreement": MIN_TOP1},
    }
    failures = []
    if not finite:
        failures.append("non-finite logits (NaN or inf)")
    if not out["kl_mean"] <= MAX_KL:  # NaN fails
        failures.append(f"export fidelity KL {out['kl_mean']:.3g} > {MAX_KL}")
    if not out["top1_agreement"] >= MIN_TOP1:
        failures.append(f"export fidelity top-1 agreement {out['top1_agreement']:.4f} < {MIN_TOP1}")
    out["passed"] = not failures
    out["failures"] = failures
    return out
