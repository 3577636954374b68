#!/usr/bin/env python
"""The INT4 g128 linears of a Llama-2-7B at decode sizes, alone on one CUDA card: the tiled tensor-core kernel
(kernels.int4_tiled_partials) against the kernels that read the stored layout, for several splits of K, with
errors against float64. Weights rotate through enough copies to exceed the L2 cache (a kernel re-reading a matrix
from L2 would look faster than the card's memory allows); each time is per launch, from a CUDA graph of one launch
per copy, best of 5 x 20 replays. Prints a table last; writes JSON to --out.

  python scripts/bench_int4_tiles.py --out $OUT/int4_tiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from toolchain.engine import kernels as K  # noqa: E402
from toolchain.engine.measure import copy_bandwidth_gbs  # noqa: E402

LINEARS = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
GROUP = 128
DIVISORS = (4, 8, 16)  # groups of 128 per slice of K (at most 16 slices); EngineConfig.tiled_groups_per_slice


def log(msg: str) -> None:
    print(msg, flush=True)


def stored(n: int, k: int, gen: torch.Generator):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda", generator=gen)
    packed = K.pack_nibbles(q.reshape(n, k // 8, 8))
    scale = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    zero = torch.randint(0, 16, (n, k // GROUP), device="cuda", generator=gen).to(torch.uint8)
    return packed, scale, zero


def per_launch_us(launches: list) -> float:
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for f in launches:
            f()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for f in launches:
            f()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            graph.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / 20 / len(launches))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16", help="M values")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs(torch.device("cuda"))
    log(f"{torch.cuda.get_device_name()}, copy {copy_gbs:.0f} GB/s, torch {torch.__version__}, "
        f"triton {K.triton.__version__}")
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, (n, k) in LINEARS.items():
        nbytes = n * k // 2 + 3 * n * (k // GROUP)  # packed words, bf16 scales, uint8 zeros
        copies = [stored(n, k, gen) for _ in range(max(2, -(-200_000_000 // nbytes)))]
        tiles = [K.tile_int4(*c, GROUP) for c in copies]
        want_w = K.dequantize_int4(*copies[0], GROUP, torch.float64)
        for m in (int(v) for v in a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            want = x.double() @ want_w.T
            scale = want.abs().max().item()
            row = {"linear": name, "m": m, "bytes": nbytes}
            got = K.int4_partials(x, *copies[0], GROUP).sum(0).double()
            row["stored_err"] = (got - want).abs().max().item() / scale
            row["stored_us"] = per_launch_us([lambda c=c, x=x: K.int4_partials(x, *c, GROUP) for c in copies])
            for d in DIVISORS:
                got = K.int4_tiled_partials(x, *tiles[0], GROUP, groups_per_slice=d).sum(0).double()
                row[f"tiled_k/{d}_err"] = (got - want).abs().max().item() / scale
                row[f"tiled_k/{d}_us"] = per_launch_us(
                    [lambda t=t, x=x, d=d: K.int4_tiled_partials(x, *t, GROUP, groups_per_slice=d) for t in tiles])
            rows.append(row)
            log(json.dumps(row))
    Path(a.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows},
                                      indent=2))
    log("")
    log("| linear | M | stored-layout kernel us (% copy) | " + " | ".join(f"tiled, {d} groups per slice: us"
                                                                  for d in DIVISORS) + " | worst error |")
    log("|---|---|---|" + "---|" * len(DIVISORS) + "---|")
    for r in rows:
        pct = (lambda us, r=r: 100 * r["bytes"] / (us * 1e-6) / (copy_gbs * 1e9))  # noqa: E731
        cells = " | ".join(f"{r[f'tiled_k/{d}_us']:.2f} ({pct(r[f'tiled_k/{d}_us']):.0f} %)" for d in DIVISORS)
        err = max(v for key, v in r.items() if key.endswith("_err"))
        log(f"| {r['linear']} | {r['m']} | {r['stored_us']:.2f} ({pct(r['stored_us']):.0f} %) | {cells} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
