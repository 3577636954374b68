#!/usr/bin/env python
"""Cold builds of profiles into a fresh store: per-stage wall time and peak RSS (from the manifests), the
validation figures, and the total wall time of each `toolchain build` process.

  python scripts/bench_pipeline.py profiles/smollm2-int4.yaml profiles/smollm2-fp8.yaml --store /tmp/bench-store
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--store", required=True, help="a store to create from scratch (deleted first)")
    ap.add_argument("--out", help="write the JSON results here")
    args = ap.parse_args()
    shutil.rmtree(args.store, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from toolchain.store import Store

    store = Store(args.store)
    results = []
    for profile in args.profiles:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "toolchain", "build", profile, "--store", args.store, "--json"],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        doc = json.loads(r.stdout)
        stages = []
        for s in doc["stages"]:
            m = store.manifest(s["key"]) if store.has(s["key"]) else {}
            stages.append({"name": s["name"], "status": s["status"], "seconds": s["seconds"],
                           "peak_rss_mib": round(m.get("peak_rss_bytes", 0) / 2**20)})
        results.append({"profile": profile, "exit_code": r.returncode, "wall_s": round(wall, 1), "stages": stages,
                        "targets": doc["targets"]})
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    meta = {"machine": machine, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("| profile | stage | status | seconds | peak RSS (MiB) |\n|---|---|---|---|---|")
    for res in results:
        for s in res["stages"]:
            print(f"| {res['profile']} | {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['peak_rss_mib']} |")
        print(f"| {res['profile']} | **whole build (process wall)** | exit {res['exit_code']} | {res['wall_s']} | |")
    print("\n| profile | target | ref ppl | ppl | increase | KL | top-1 | tokens |\n|---|---|---|---|---|---|---|---|")
    for res in results:
        for t in res["targets"]:
            v = t["validation"] or {}
            if "ppl" in v:
                print(f"| {res['profile']} | {t['name']} | {v['reference_ppl']:.3f} | {v['ppl']:.3f} | "
                      f"{v['ppl_increase_pct']:+.2f}% | {v['kl_mean']:.4f} | {v['top1_agreement']:.4f} | "
                      f"{v['tokens']} |")


if __name__ == "__main__":
    main()
