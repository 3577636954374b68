#!/usr/bin/env python
"""Peak memory of a calibrated quantize stage on a model bigger than half this machine's RAM.

  python scripts/bench_quantize_memory.py --out /tmp/mem          # Llama-2-7B shape, 16 blocks, float32: 13 GiB
  python scripts/bench_quantize_memory.py --out /tmp/m --layers 2 --dtype bfloat16   # smoke (minutes)

Runs `toolchain build` on a profile with a synthetic source (random weights of --arch's shape, written to the
store by the source stage) and GPTQ with a small calibration set, no export targets. A sampler reads the build
process's /proc status every 0.1 s: RSS split into anonymous memory (what the process allocated) and file pages
(mapped safetensors, which the kernel can drop at any time); the quantize stage's own peak RSS comes from its
manifest. Prints the peak beside the budget the runner is designed for:
  constant      RSS of a process that imported what the build imports (measured here, before the build)
  2 blocks      two decoder blocks in the compute dtype (float32)
  activations   the calibration hidden states the runner and GPTQ keep: inputs, outputs, attention heads
                (samples x seq x hidden each) and the MLP intermediate (samples x seq x intermediate)
  GPTQ          its in x in float32 matrices (Hessian, U, ...) for the widest input: three at a time
Writes <out>/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("TOOLCHAIN_DATA", REPO / "data"))
CALIBRATION = DATA / "tinyshakespeare" / "input.txt"


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


class Sampler:
    """Peak RSS and peak anonymous RSS of a process, sampled until it exits."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.at_peak_rss: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                s = _status_kib(self.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            if s.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.at_peak_rss = s
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.interval)


def import_baseline() -> int:
    """RSS (bytes) of a fresh interpreter that imported what a quantize stage imports."""
    code = ("import torch, transformers, safetensors, toolchain.cli, toolchain.quant.layerwise, toolchain.quant.gptq, "
            "toolchain.stages.quantize; import transformers.models.llama.modeling_llama; "
            "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip())


def budget(cfg: dict[str, Any], samples: int, seq_len: int) -> dict[str, int]:
    from toolchain.arch import linear_shapes

    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    block_params = sum(o * i for n, o, i in linear_shapes(cfg) if n.startswith("model.layers.0.")) + 2 * h
    tokens = samples * seq_len
    return {"block_bytes_fp32": block_params * 4,
            "activations_bytes": tokens * (3 * h + inter) * 4,
            "gptq_matrices_bytes": 3 * max(h, inter) ** 2 * 4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--observer", default="minmax", help="GPTQ observer (minmax keeps a 2-core run short)")
    ap.add_argument("--store", default=None, help="default <out>/store (removed first: a cold build)")
    a = ap.parse_args()

    import psutil
    import yaml

    from toolchain.arch import synthetic_config
    from toolchain.store import Store

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(a.store) if a.store else out / "store"
    if store.exists():
        shutil.rmtree(store)
    profile = {
        "name": "bench-memory",
        "source": {"synthetic": {"arch": a.arch, "seed": 0, "num_layers": a.layers, "dtype": a.dtype}},
        "quantize": {"method": "gptq", "bits": 4, "group_size": a.group_size, "symmetric": True,
                     "ignore": ["lm_head"], "observer": a.observer, "device": "cpu",
                     "calibration": {"dataset": str(CALIBRATION), "samples": a.samples, "seq_len": a.seq_len}},
        "targets": [],
    }
    (out / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    baseline = import_baseline()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(out / "profile.yaml"), "--store",
                             str(store), "--json"], stdout=subprocess.PIPE, stderr=open(out / "build.log", "w"),
                            text=True, cwd=REPO)
    sampler = Sampler(proc.pid)
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"build failed (exit {proc.returncode}); see {out / 'build.log'}", file=sys.stderr)
        return 1
    doc = json.loads(stdout)
    st = Store(store)
    stages = {s["name"]: st.manifest(s["key"]) for s in doc["stages"]}
    src_dir = st.object_dir(next(s["key"] for s in doc["stages"] if s["name"] == "source"))
    weights = sum(p.stat().st_size for p in src_dir.rglob("*.safetensors"))
    cfg = synthetic_config(a.arch, a.layers, a.dtype)
    b = budget(cfg, a.samples, a.seq_len)
    design = baseline + 2 * b["block_bytes_fp32"] + b["activations_bytes"] + b["gptq_matrices_bytes"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM",
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "profile": profile,
        "safetensors_bytes": weights, "ram_bytes": psutil.virtual_memory().total,
        "weights_over_ram": weights / psutil.virtual_memory().total, "wall_seconds": round(wall, 1),
        "stage_seconds": {n: m["seconds"] for n, m in stages.items()},
        "stage_peak_rss_bytes": {n: m.get("peak_rss_bytes") for n, m in stages.items()},
        "process_peak_kib": sampler.peak, "at_process_peak_kib": sampler.at_peak_rss,
        "import_baseline_bytes": baseline, **b, "design_budget_bytes": design,
    }
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    gib = 2**30
    q_peak = stages["quantize"]["peak_rss_bytes"]
    pk = sampler.peak
    rows = [
        ("model", f"{a.arch} shape, {a.layers} blocks, {a.dtype}, random weights: {weights / gib:.2f} GiB of "
                  f"safetensors ({100 * result['weights_over_ram']:.0f}% of {result['ram_bytes'] / gib:.1f} GiB RAM)"),
        ("quantize", f"GPTQ W4 g{a.group_size} sym, observer {a.observer}, calibration {a.samples} x {a.seq_len} "
                     f"tokens, cpu: {stages['quantize']['seconds']:.0f} s"),
        ("quantize stage peak RSS", f"{q_peak / gib:.2f} GiB"),
        ("whole build peak RSS", f"{pk['VmRSS'] / 2**20:.2f} GiB (anonymous {pk['RssAnon'] / 2**20:.2f}, file "
                                 f"pages {pk['RssFile'] / 2**20:.2f} GiB: each its own peak)"),
        ("design budget", f"{design / gib:.2f} GiB = import baseline {baseline / gib:.2f} + 2 blocks "
                          f"{2 * b['block_bytes_fp32'] / gib:.2f} + activations {b['activations_bytes'] / gib:.2f} + "
                          f"GPTQ matrices {b['gptq_matrices_bytes'] / gib:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"JSON: {out / 'memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
