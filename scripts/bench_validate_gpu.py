"""Validation at scale on a GPU (issue 10): three measurements, each printed as one JSON line and written to --out.

  bound    a synthetic model of Llama-2-70B's shape truncated to --blocks blocks, scored block by block
           (toolchain.validate.streamed) under a device-memory cap below two blocks plus the activations;
           reports the peak against that bound.
  smol     SmolLM2-135M (a GGUF converted to HF by the source stage's code): reference perplexity block-streamed
           on CUDA in bf16, whole-model on CUDA in bf16 (transformers), and block-streamed on the CPU in float32.
  build    `toolchain build PROFILE --source synthetic` as a user runs it: wall time, per-stage seconds, peak host
           RSS per stage (from the manifests), peak GPU memory (the validation's streamed runner).

Usage: python scripts/bench_validate_gpu.py bound|smol|build [--out FILE] [...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def emit(out: Path | None, doc: dict) -> None:
    line = json.dumps(doc)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def bound(args) -> dict:
    import torch

    from toolchain.arch import synthetic_config
    from toolchain.ir import TensorReader
    from toolchain.progress import Reporter
    from toolchain.stages.source import synthesize
    from toolchain.validate.streamed import StreamedModel

    cfg = synthetic_config("llama-2-70b", args.blocks, "bfloat16")
    work = Path(args.work)
    t0 = time.perf_counter()
    if not (work / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        synthesize(cfg, 0, work, Reporter(quiet=True), device="cuda")
    t_synth = time.perf_counter() - t0
    torch.cuda.empty_cache()
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    block_bytes = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h)
    tokens = args.tokens
    act_bytes = tokens * h * 2  # the windows' hidden states, bf16
    cap = int(2 * block_bytes + act_bytes) - (64 << 20)  # strictly below two blocks + activations
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (tokens,), generator=g)
    windows = [ids[i : i + args.seq_len] for i in range(0, tokens, args.seq_len)]
    model = StreamedModel(json.loads((work / "config.json").read_text()), TensorReader(work).get, "cuda", "auto",
                          torch.bfloat16)
    t1 = time.perf_counter()
    model.run(windows)
    nll, n = 0.0, 0
    for j, w in enumerate(windows):
        lp = torch.log_softmax(model.window_logits(j), -1)
        nll -= lp[:-1].gather(1, w[1:, None].to(lp.device).long()).sum().item()
        n += len(w) - 1
    torch.cuda.synchronize()
    import psutil

    return {"mode": "bound", "arch": "llama-2-70b", "blocks": args.blocks, "tokens": tokens, "seq_len": args.seq_len,
            "block_bytes": block_bytes, "activation_bytes": act_bytes, "cap_bytes": cap,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(0), "peak_below_cap": torch.cuda.max_memory_allocated(0)
            <= cap, "score_seconds": round(time.perf_counter() - t1, 2), "synth_seconds": round(t_synth, 2),
            "ppl_random_ids": math.exp(nll / n), "host_rss_bytes": psutil.Process().memory_info().rss,
            "per_block_seconds": model.stats.per_block_seconds, "gpu": torch.cuda.get_device_name(0)}


def _ppl(model, ids, seq_len: int, stride: int) -> float:
    from toolchain.validate.accuracy import streamed_logits_fn

    fn = streamed_logits_fn(model, ids, seq_len, stride)
    return _ppl_fn(fn, ids, seq_len, stride)


def _ppl_fn(fn, ids, seq_len: int, stride: int) -> float:
    from toolchain.progress import Reporter
    from toolchain.validate.accuracy import score, windows

    targets = ids[[p for _b, e, f in windows(len(ids), seq_len, stride) for p in range(f, e)]]
    nll, off = 0.0, 0
    for lp in score(fn, ids, seq_len, stride, Reporter(quiet=True), "x"):
        t = targets[off : off + len(lp)].to(lp.device)
        nll -= lp.gather(1, t[:, None]).sum().item()
        off += len(lp)
    return math.exp(nll / off)


def smol(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.ir import TensorReader
    from toolchain.validate.streamed import StreamedModel

    src = Path(args.work)
    if not (src / "config.json").is_file():
        gguf = Path(args.gguf)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        del m.config.quantization_config
        m.hf_quantizer = None
        m.save_pretrained(src)
        tok.save_pretrained(src)
        del m
    tok = AutoTokenizer.from_pretrained(src)
    text = Path(args.dataset).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0][: args.tokens]
    cfg = json.loads((src / "config.json").read_text())
    out = {"mode": "smol", "tokens": len(ids), "seq_len": args.seq_len}
    t = time.perf_counter()
    out["ppl_stream_cuda_bf16"] = _ppl(StreamedModel(cfg, TensorReader(src).get, "cuda", "bfloat16"), ids,
                                       args.seq_len, args.seq_len)
    out["s_stream_cuda_bf16"] = round(time.perf_counter() - t, 2)
    whole = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to("cuda").eval()

    def whole_logits(w):
        return whole(w[None].to("cuda")).logits[0].float()

    with torch.inference_mode():
        out["ppl_whole_cuda_bf16"] = _ppl_fn(whole_logits, ids, args.seq_len, args.seq_len)
    # float32 on CUDA, both runners: where they compute the head alike, streamed must equal whole to 1e-4
    out["ppl_stream_cuda_fp32"] = _ppl(StreamedModel(cfg, TensorReader(src).get, "cuda", "float32"), ids,
                                       args.seq_len, args.seq_len)
    whole = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    with torch.inference_mode():
        out["ppl_whole_cuda_fp32"] = _ppl_fn(whole_logits, ids, args.seq_len, args.seq_len)
    out["stream_vs_whole_cuda_fp32_rel"] = abs(out["ppl_stream_cuda_fp32"] / out["ppl_whole_cuda_fp32"] - 1)
    whole = None
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    out["ppl_stream_cpu_fp32"] = _ppl(StreamedModel(cfg, TensorReader(src).get, "cpu", "float32"), ids,
                                      args.seq_len, args.seq_len)
    out["s_stream_cpu_fp32"] = round(time.perf_counter() - t, 2)
    out["stream_vs_whole_rel"] = abs(out["ppl_stream_cuda_bf16"] / out["ppl_whole_cuda_bf16"] - 1)
    out["cuda_bf16_vs_cpu_fp32_pct"] = 100 * (out["ppl_stream_cuda_bf16"] / out["ppl_stream_cpu_fp32"] - 1)
    out["gpu"] = torch.cuda.get_device_name(0)
    return out


def build(args) -> dict:
    store = Path(args.store)
    cmd = [sys.executable, "-m", "toolchain", "build", args.profile, "--source", "synthetic", "--store", str(store),
           "--json"]
    import threading

    peak = {"gpu_mib": 0}
    done = threading.Event()

    def poll() -> None:  # the device's used memory, all processes (the build's CUDA contexts included)
        while not done.wait(0.5):
            q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            if q.returncode == 0 and q.stdout.strip():
                peak["gpu_mib"] = max(peak["gpu_mib"], int(q.stdout.split()[0]))

    threading.Thread(target=poll, daemon=True).start()
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    wall = time.perf_counter() - t
    done.set()
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    stages = []
    for s in doc.get("stages", []):
        manifest = store / "objects" / s["key"][:2] / s["key"] / "manifest.json"
        m = json.loads(manifest.read_text()) if manifest.is_file() else {}
        info = m.get("info", {})
        fid = info.get("export_fidelity", {})
        stages.append({"name": s["name"], "status": s["status"], "seconds": s.get("seconds"),
                       "peak_rss_bytes": m.get("peak_rss_bytes") or m.get("peak_rss"),
                       "peak_gpu_bytes": fid.get("peak_device_bytes") or info.get("peak_gpu_bytes")})
    target = (doc.get("targets") or [{}])[0]
    return {"mode": "build", "profile": args.profile, "exit": r.returncode, "wall_seconds": round(wall, 1),
            "peak_gpu_used_mib_nvidia_smi": peak["gpu_mib"],
            "stages": stages, "export_fidelity": (target.get("validation") or {}).get("export_fidelity")
            or target.get("export_fidelity"), "conformance": target.get("conformance"), "notes": doc.get("notes"),
            "stderr_tail": r.stderr[-1500:] if r.returncode else ""}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bound", "smol", "build"])
    p.add_argument("--out", type=Path)
    p.add_argument("--work", default="/tmp/bench-work")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gguf", default="")
    p.add_argument("--dataset", default=str(REPO / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--profile", default=str(REPO / "profiles" / "llama2-int4.yaml"))
    p.add_argument("--store", default="/tmp/bench-store")
    args = p.parse_args()
    emit(args.out, {"bound": bound, "smol": smol, "build": build}[args.mode](args))


if __name__ == "__main__":
    main()
