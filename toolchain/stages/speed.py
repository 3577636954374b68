"""speed:<target>: time one target on this machine with the runtime chosen at plan time (toolchain.runtimes.select),
judge the profile's speed gates, and record what measured it (figures: toolchain.runtimes.speed)."""

from __future__ import annotations

import json
import platform
from typing import Any

from ..runtimes.speed import evaluate_gates
from ..stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    runtime, settings = cfg["runtime"], cfg["settings"]
    export = ctx.inputs["export"]
    model_cfg = ctx.model_config
    ctx.reporter.info(f"  timing {cfg['format']} with {runtime} {cfg['runtime_version']} on {cfg['card']['name']}")
    if runtime == "builtin":
        from ..engine.config import EngineConfig
        from ..engine.measure import measure

        # the engine in the key, not the environment of this process: what is keyed is what is timed
        result = measure(export, settings, ctx.reporter, engine=EngineConfig.from_dict(cfg["engine"]))
    else:
        from ..runtimes import external

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
