#!/usr/bin/env python
"""Time our GPTQ on a synthetic model (random weights of a real shape) block by block, as the quantize stage runs
it: toolchain.quant.layerwise with toolchain.quant.gptq, one decoder block on the device at a time, the
calibration activations (samples x seq_len x hidden, float32) beside it, the IR written to disk as it goes.

  python scripts/bench_gptq_gpu.py --out /tmp/gptq-7b.json                  # Llama-2-7B shape, 128 x 2048, CUDA
  python scripts/bench_gptq_gpu.py --arch llama-tiny --samples 8 --seq-len 128 --out /tmp/t.json   # CPU smoke

Needs only torch, transformers, safetensors and rich (no pydantic: it runs on a bare GPU box). The random
checkpoint is written first by the source stage's synthesize (one tensor in host memory at a time, generated on
the device) and is not timed. Prints one line per block, a short table last, and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class LineReporter:
    """The runner's progress interface, printing one line per finished block."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        print(msg, flush=True)

    @contextmanager
    def task(self, label: str, total: float | None = None, unit: str = ""):
        reporter = self

        class Task:
            done = 0
            last = time.perf_counter()

            def describe(self, text: str) -> None:
                pass

            def advance(self, n: float = 1) -> None:
                self.done += n
                now = time.perf_counter()
                print(f"  {label}: {self.done:.0f}/{total:.0f}  {now - self.last:6.2f} s  "
                      f"(elapsed {now - reporter.t0:.1f} s)", flush=True)
                self.last = now

        yield Task()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b", help="a named shape from toolchain.arch (default llama-2-7b)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder blocks")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calibration", default="random",
                    help="random (uniform token ids) or a text file (UTF-8 bytes: synthetic models have no tokenizer)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--act-order", choices=["none", "static", "dynamic"], default="static")
    ap.add_argument("--observer", choices=["minmax", "mse", "hessian_mse"], default="hessian_mse")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cpu")
    ap.add_argument("--work", default=None, help="directory for the checkpoint and the IR (default: a temp dir)")
    ap.add_argument("--out", required=True, help="JSON results path")
    a = ap.parse_args()

    import torch

    from toolchain.arch import synthetic_config
    from toolchain.ir import IRWriter
    from toolchain.progress import Reporter
    from toolchain.quant import calibration
    from toolchain.quant.layerwise import pick_device, run_layerwise
    from toolchain.stages.source import synthesize

    dev = pick_device(a.device)
    tmp = tempfile.TemporaryDirectory(prefix="bench-gptq-") if a.work is None else None
    work = Path(a.work or tmp.name)
    src, ir_dir = work / "source", work / "ir"
    src.mkdir(parents=True, exist_ok=True)
    ir_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = synthetic_config(a.arch, a.layers, a.dtype)
    synthesize(cfg, 0, src, Reporter(quiet=True), str(dev))
    synth_s = time.perf_counter() - t0
    print(f"synthesized {a.arch} ({cfg['num_hidden_layers']} blocks, {a.dtype}) in {synth_s:.1f} s", flush=True)

    cal_src = calibration.parse(a.calibration, Path)
    ids, cal_info = calibration.token_ids(cal_src, "text", a.samples, a.seq_len, 0, None, cfg["vocab_size"])
    args = {"method": "gptq", "bits": 4, "group_size": a.group_size, "symmetric": not a.asymmetric,
            "strategy": "group", "ignore": ("lm_head",), "scale_dtype": getattr(torch, a.dtype),
            "damp": a.damp, "act_order": a.act_order != "none", "static_groups": a.act_order == "static",
            "observer": a.observer, "true_sequential": not a.no_true_sequential}
    writers: list[IRWriter] = []

    def make_writer(_source_dtype):
        writers.append(IRWriter(ir_dir, {k: str(v) for k, v in args.items()}))
        return writers[0]

    t0 = time.perf_counter()
    info = run_layerwise(src, make_writer, ids, args, LineReporter(), device=str(dev))
    writers[0].close(None)  # no tokenizer or config to copy; keeps this script free of pydantic
    total = time.perf_counter() - t0
    per = info["seconds_per_block"]
    doc = {
        "what": "GPTQ (toolchain.quant.layerwise + gptq) on random weights: speed and memory only",
        "arch": a.arch, "layers": cfg["num_hidden_layers"], "dtype": a.dtype, "calibration": cal_info,
        "scheme": {k: str(v) for k, v in args.items()}, "device": info["device"], "gpu": info.get("gpu"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "seconds_synthesize": round(synth_s, 3), "seconds_quantize": round(total, 3),
        "seconds_blocks": info["seconds_layers"], "seconds_per_block": per,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": info.get("peak_gpu_bytes"),
    }
    Path(a.out).write_text(json.dumps(doc, indent=2))
    rows = [
        ("model", f"{a.arch} ({doc['layers']} blocks, {a.dtype}, random weights)"),
        ("calibration", f"{a.samples} x {a.seq_len} tokens ({a.calibration})"),
        ("scheme", f"W4 g{a.group_size} {'asym' if a.asymmetric else 'sym'}, act-order {a.act_order}, "
                   f"observer {a.observer}, true-sequential {not a.no_true_sequential}"),
        ("device", f"{doc['device']} {doc['gpu'] or ''}".strip()),
        ("quantize (all blocks + IR)", f"{total:.1f} s"),
        ("per block", f"median {sorted(per)[len(per) // 2]:.2f} s, max {max(per):.2f} s"),
        ("peak host RSS", f"{doc['peak_rss_bytes'] / 2**30:.2f} GiB"),
        ("peak GPU memory", f"{doc['peak_gpu_bytes'] / 2**30:.2f} GiB" if doc["peak_gpu_bytes"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"JSON: {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
