"""The targets' own benchmarks, run as their users run them, and their JSON parsed into the speed stage's figures.

  vllm bench latency   (vllm/benchmarks/latency.py): --output-json holds avg_latency, std_latency, latencies (s per
                       whole batch generation) and percentiles. It times whole generations only, so it runs twice:
                       output_len 1 gives the time to first token, output_len N the whole; a decode step is
                       (whole - first) / (N - 1), its spread from the per-iteration latencies.
  trtllm-bench         (tensorrt_llm/bench/dataclasses/reporting.py, ReportUtility.get_statistics_dict):
                       `throughput --streaming --report_json` holds streaming_metrics.avg_ttft_ms, avg_tpot_ms and
                       tpot_percentiles {p50, p99, ...} in ms, machine.name, engine.version.
  llama-bench          (llama.cpp tools/llama-bench/llama-bench.cpp, json_printer and test::get_fields): `-o json`
                       prints a list of tests, each with n_prompt, n_gen, avg_ns, stddev_ns, avg_ts, samples_ns,
                       gpu_info, backends, build_commit; a pp test (n_gen 0) and a tg test (n_prompt 0). One
                       sequence only: other batch sizes are reported as not measured.
  onnxruntime          our ONNX export has no KV cache, so a decode step is a whole forward over the sequence so far;
                       timed by onnxruntime's own profiler (SessionOptions.enable_profiling): a JSON list of trace
                       events, each run one {"cat": "Session", "name": "model_run", "dur": microseconds}.
Executables are found on PATH (TOOLCHAIN_LLAMA_BENCH overrides llama-bench's path); tests run them as stand-ins.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import BuildError
from .speed import artifact_weight_bytes, batch_result, kv_bytes_per_token, mean_context

# -- parsers (pure: tested on recorded outputs) ---------------------------------------------------------------


def parse_vllm_latency(doc: dict[str, Any]) -> list[float]:
    """Seconds per iteration from `vllm bench latency --output-json`."""
    lat = doc.get("latencies")
    if not isinstance(lat, list) or not lat or not all(isinstance(x, (int, float)) for x in lat):
        raise BuildError("vllm bench latency JSON has no `latencies` list")
    return [float(x) for x in lat]


def vllm_figures(first: list[float], whole: list[float], output_len: int) -> tuple[float, list[float]]:
    """(TTFT ms, per-iteration mean decode step ms) from the output_len 1 and output_len N runs."""
    ttft = statistics.median(first) * 1e3
    steps = [(w * 1e3 - ttft) / (output_len - 1) for w in whole]
    if any(s <= 0 for s in steps):
        raise BuildError("vllm bench latency: a whole generation took no longer than its first token")
    return ttft, steps


def parse_trtllm_report(doc: dict[str, Any]) -> dict[str, Any]:
    """TTFT and time per output token (ms) from trtllm-bench's --report_json (streaming runs)."""
    sm = doc.get("streaming_metrics")
    if not sm:
        raise BuildError("trtllm-bench report has no streaming_metrics (run throughput with --streaming)")
    tpot = sm["tpot_percentiles"]
    return {"ttft_ms": float(sm["avg_ttft_ms"]), "tpot_ms": float(sm["avg_tpot_ms"]),
            "tpot_p50_ms": float(tpot["p50"]), "tpot_p99_ms": float(tpot["p99"]),
            "card": (doc.get("machine") or {}).get("name"), "version": (doc.get("engine") or {}).get("version")}


def parse_llama_bench(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The pp and tg tests of one `llama-bench -o json` run."""
    pp = [r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0]
    tg = [r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    if not pp or not tg:
        raise BuildError("llama-bench JSON lacks a prompt test (n_prompt > 0, n_gen 0) or a generation test")
    p, g = pp[0], tg[0]
    samples = g.get("samples_ns") or [g["avg_ns"]]
    return {"ttft_ms": p["avg_ns"] / 1e6, "prompt_tok_s": p["avg_ts"], "decode_tok_s": g["avg_ts"],
            "step_ms": [s / 1e6 / g["n_gen"] for s in samples], "n_gen": g["n_gen"],
            "gpu_info": g.get("gpu_info"), "backends": g.get("backends"), "build_commit": g.get("build_commit")}


def parse_ort_profile(events: list[dict[str, Any]]) -> list[float]:
    """Milliseconds of each model run, in order, from onnxruntime's profile."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        raise BuildError("onnxruntime profile has no model_run events")
    return [e["dur"] / 1e3 for e in sorted(runs, key=lambda e: e["ts"])]


# -- runners -------------------------------------------------------------------------------------------------


def _run(cmd: list[str], reporter, timeout: float = 3600) -> subprocess.CompletedProcess:
    reporter.info("  $ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise BuildError(f"{Path(cmd[0]).name} exited with {r.returncode}: " + " | ".join(tail))
    return r


def _vllm(export: Path, batch: int, s: dict[str, Any], reporter, work: Path) -> tuple[float, list[float], str]:
    exe = shutil.which("vllm")
    runs = {}
    for n in (1, s["output_len"]):
        out = work / f"vllm-b{batch}-o{n}.json"
        _run([exe, "bench", "latency", "--model", str(export), "--input-len", str(s["input_len"]),
              "--output-len", str(n), "--batch-size", str(batch), "--num-iters", str(s["iterations"]),
              "--num-iters-warmup", "2", "--output-json", str(out)], reporter)
        runs[n] = parse_vllm_latency(json.loads(out.read_text()))
    ttft, steps = vllm_figures(runs[1], runs[s["output_len"]], s["output_len"])
    return ttft, steps, "per-iteration mean step ((whole - first token) / (output_len - 1)), vllm bench latency"


def _trtllm(export: Path, batch: int, s: dict[str, Any], reporter, work: Path) -> tuple[float, list[float], str]:
    import random

    dataset = work / f"trtllm-b{batch}.jsonl"
    rng = random.Random(0)
    n_req = batch * s["iterations"]
    with open(dataset, "w") as f:  # trtllm-bench's dataset: one request per line, token ids and output length
        for i in range(n_req):
            ids = [rng.randrange(100, 30000) for _ in range(s["input_len"])]
            f.write(json.dumps({"task_id": i, "input_ids": ids, "output_tokens": s["output_len"]}) + "\n")
    report = work / f"trtllm-b{batch}.json"
    _run([shutil.which("trtllm-bench"), "--model", export.name, "--model_path", str(export), "throughput",
          "--dataset", str(dataset), "--backend", "pytorch", "--concurrency", str(batch),
          "--num_requests", str(n_req), "--streaming", "--report_json", str(report)], reporter)
    r = parse_trtllm_report(json.loads(report.read_text()))
    # trtllm-bench reports the mean and percentiles of per-request TPOT, not each step: keep what it gives.
    return r["ttft_ms"], [r["tpot_ms"]], f"trtllm-bench per-request TPOT (p50 {r['tpot_p50_ms']:.3f}, " \
        f"p99 {r['tpot_p99_ms']:.3f} ms)", {"itl_ms_p50": r["tpot_p50_ms"], "itl_ms_p99": r["tpot_p99_ms"]}


def _gguf_file(export: Path) -> Path:
    files = sorted(export.glob("*.gguf"))
    if not files:
        raise BuildError(f"no .gguf file in {export}")
    return files[0]


def _llama_bench(export: Path, batch: int, s: dict[str, Any], reporter, work: Path):
    if batch != 1:
        return None
    exe = shutil.which(os.environ.get("TOOLCHAIN_LLAMA_BENCH", "llama-bench"))
    r = _run([exe, "-m", str(_gguf_file(export)), "-p", str(s["input_len"]), "-n", str(s["output_len"]),
              "-r", str(s["iterations"]), "-ngl", "99", "-o", "json"], reporter)
    (work / "llama-bench.json").write_text(r.stdout)
    parsed = parse_llama_bench(json.loads(r.stdout))
    return parsed["ttft_ms"], parsed["step_ms"], "llama-bench: per-repetition mean of a tg run (no per-step times)"


def _onnxruntime(export: Path, batch: int, s: dict[str, Any], reporter, work: Path):
    import numpy as np
    import onnxruntime as ort

    from ..formats.onnx.spec import MODEL_FILE

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"ort-b{batch}")
    sess = ort.InferenceSession(str(export / MODEL_FILE), opts, providers=ort.get_available_providers())
    fixed = sess.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed != batch:  # our export's batch dimension is 1
        return None
    rng = np.random.default_rng(0)
    vocab = json.loads((export / "config.json").read_text())["vocab_size"] if (export / "config.json").is_file() \
        else 1000
    n = s["input_len"] + s["output_len"]
    ids = rng.integers(0, vocab, (batch, n), dtype=np.int64)
    sess.run(None, {"input_ids": ids[:, : s["input_len"]]})  # warm-up
    for _ in range(s["iterations"]):  # prefill, then one whole forward per decode step (no KV cache)
        for t in range(s["input_len"], n):
            sess.run(None, {"input_ids": ids[:, :t]})
    runs = parse_ort_profile(json.loads(Path(sess.end_profiling()).read_text()))[1:]
    per_iter = s["output_len"]
    ttfts = [runs[i * per_iter] for i in range(s["iterations"])]
    steps = [x for i in range(s["iterations"]) for x in runs[i * per_iter + 1 : (i + 1) * per_iter]]
    return statistics.median(ttfts), steps, "onnxruntime profiler model_run per step (no KV cache: each step " \
        "recomputes the whole sequence)"


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


RUNNERS = {"vllm": _vllm, "trtllm-bench": _trtllm, "llama-bench": _llama_bench, "onnxruntime": _onnxruntime}


def host_copy_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Main-memory copy (bytes read plus written), for runtimes that compute on the CPU."""
    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def device_copy_bandwidth_gbs() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from .builtin import copy_bandwidth_gbs

    return copy_bandwidth_gbs(torch.device("cuda"))


def measure(runtime: str, fmt: str, export: Path, model_cfg: dict[str, Any], settings: dict[str, Any], reporter,
            work: Path) -> dict[str, Any]:
    from .select import cpu_card, cuda_card

    on_gpu = runtime in ("vllm", "trtllm-bench") or (runtime == "llama-bench" and cuda_card() is not None) or \
        (runtime == "onnxruntime" and "CUDAExecutionProvider" in _ort_providers())
    card = (cuda_card() if on_gpu else None) or cpu_card()
    copy_gbs = (device_copy_bandwidth_gbs() if on_gpu else None) or host_copy_bandwidth_gbs()
    weight_bytes = artifact_weight_bytes(export)
    kv_token = 0 if runtime == "onnxruntime" else kv_bytes_per_token(model_cfg)
    per_batch = []
    for b in settings["batch_sizes"]:
        got = RUNNERS[runtime](export, b, settings, reporter, work)
        if got is None:
            why = {"llama-bench": "llama-bench times one sequence",
                   "onnxruntime": "the ONNX export takes one sequence (batch dimension 1)"}[runtime]
            per_batch.append({"batch_size": b, "skipped": f"{why}; batch {b} not measured"})
            continue
        ttft, steps, source, *reported = got  # reported: percentiles the tool computed itself
        step_bytes = weight_bytes + b * mean_context(settings["input_len"], settings["output_len"]) * kv_token
        per_batch.append(batch_result(b, settings["input_len"], settings["output_len"], ttft, steps, step_bytes,
                                      copy_gbs, source) | (reported[0] if reported else {}))
    return {"mode": fmt, "card": card, "copy_bandwidth_gbs": copy_gbs, "per_batch": per_batch,
            "method": {"bytes_per_step": "artifact weight files (embedding included) + K/V of the mean context"}}
