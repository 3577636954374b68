"""What the speed stage measures (toolchain.stages.speed runs it): the figures of one batch size from raw timings,
the KV-cache and weight bytes a decode step reads, and the speed gates.

Per batch size: time to first token (prefill of `input_len` tokens and the first token), prefill tok/s, decode
tok/s over the batch, inter-token latency p50/p99, and the effective bandwidth of a decode step: the bytes a step
must read (every weight once, plus the KV cache of the context so far) over the step's time, and its ratio to the
card's copy bandwidth measured in the same stage (bytes read plus bytes written by a device-to-device copy).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def batch_result(batch: int, input_len: int, output_len: int, ttft_ms: float, itl_ms: list[float],
                 step_bytes: float | None, copy_gbs: float | None, itl_source: str) -> dict[str, Any]:
    """One batch size's figures from its raw timings."""
    mean_itl = sum(itl_ms) / len(itl_ms)
    out = {"batch_size": batch, "input_len": input_len, "output_len": output_len,
           "ttft_ms": ttft_ms, "prefill_tok_s": batch * input_len / (ttft_ms / 1e3),
           "decode_tok_s": batch / (mean_itl / 1e3), "itl_ms_mean": mean_itl,
           "itl_ms_p50": percentile(itl_ms, 50), "itl_ms_p99": percentile(itl_ms, 99), "itl_source": itl_source,
           "decode_steps_timed": len(itl_ms)}
    if step_bytes is not None:
        gbs = step_bytes / (mean_itl / 1e3) / 1e9
        out |= {"step_bytes": int(step_bytes), "effective_bandwidth_gbs": gbs,
                "bandwidth_ratio": gbs / copy_gbs if copy_gbs else None}
    return out


def kv_bytes_per_token(cfg: dict[str, Any], bytes_per_value: int = 2) -> int:
    """K and V of one token, all layers."""
    from ..arch import head_dim

    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim(cfg) * bytes_per_value


def mean_context(input_len: int, output_len: int) -> float:
    """Mean context length (tokens whose K/V a step reads) over the decode steps after the first token."""
    return input_len + output_len / 2


def evaluate_gates(result: dict[str, Any], gates: dict[str, Any]) -> list[str]:
    failures = []
    for b in result["per_batch"]:
        if b.get("skipped"):
            continue
        if gates.get("min_decode_tok_s") is not None and b["decode_tok_s"] < gates["min_decode_tok_s"]:
            failures.append(f"batch {b['batch_size']}: decode {b['decode_tok_s']:.1f} tok/s < min "
                            f"{gates['min_decode_tok_s']}")
        if gates.get("max_ttft_ms") is not None and b["ttft_ms"] > gates["max_ttft_ms"]:
            failures.append(f"batch {b['batch_size']}: TTFT {b['ttft_ms']:.1f} ms > max {gates['max_ttft_ms']}")
    return failures


def artifact_weight_bytes(export: Path) -> int:
    """Bytes of an artifact's weight files (what an external runtime reads per step, to within the embedding)."""
    files = [f for pat in ("*.safetensors", "*.gguf", "*.onnx", "*.onnx.data", "*.bin") for f in export.glob(pat)]
    return sum(f.stat().st_size for f in files)
