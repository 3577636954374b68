"""The speed stage: time one target on this machine with the runtime chosen at plan time
(toolchain.runtimes.select), judge the profile's gates, and record what measured it.

Per batch size: time to first token (prefill of `input_len` tokens and the first token), prefill tok/s, decode
tok/s over the batch, inter-token latency p50/p99, and the effective bandwidth of a decode step: the bytes a step
must read (every weight once, plus the KV cache of the context so far) over the step's time, and its ratio to the
card's copy bandwidth measured in the same stage (bytes read plus bytes written by a device-to-device copy).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from ..run import StageContext


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


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    runtime, settings = cfg["runtime"], cfg["settings"]
    export = ctx.inputs["export"]
    model_cfg = ctx.plan.model_config
    ctx.reporter.info(f"  timing {cfg['format']} with {runtime} {cfg['runtime_version']} on {cfg['card']['name']}")
    if runtime == "builtin":
        from .builtin import measure

        result = measure(export, settings, ctx.reporter)
    else:
        from . import external

        result = external.measure(runtime, cfg["format"], export, model_cfg, settings, ctx.reporter, ctx.out)
    result = {"runtime": runtime, "runtime_version": cfg["runtime_version"], **result,
              "host": {"python": platform.python_version(), "machine": platform.machine()}}
    failures = evaluate_gates(result, cfg.get("gates", {}))
    result["gates"] = cfg.get("gates", {})
    result["passed"] = not failures
    (ctx.out / "speed.json").write_text(json.dumps(result, indent=2))
    for b in result["per_batch"]:
        if not b.get("skipped"):
            ctx.reporter.info(f"  batch {b['batch_size']}: TTFT {b['ttft_ms']:.1f} ms, decode {b['decode_tok_s']:.1f} "
                              f"tok/s, ITL p50 {b['itl_ms_p50']:.2f} ms")
    if result.get("failed"):
        return {"speed": result, "status": "failed", "reason": result["failed"]}
    if failures:
        return {"speed": result, "status": "failed", "reason": "speed gate failed: " + "; ".join(failures)}
    gated = any(v is not None for v in cfg.get("gates", {}).values())
    return {"speed": result, "reason": "all speed gates passed" if gated else "measured (no speed gates)"}


def artifact_weight_bytes(export: Path) -> int:
    """Bytes of an artifact's weight files (what an external runtime reads per step, to within the embedding)."""
    files = [f for pat in ("*.safetensors", "*.gguf", "*.onnx", "*.onnx.data", "*.bin") for f in export.glob(pat)]
    return sum(f.stat().st_size for f in files)
