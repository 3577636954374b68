#!/usr/bin/env python
"""How long a fully cached `toolchain build` takes, beside `python -c "import torch"` in the same run.

Builds the profile once if needed, then times N cached builds (fresh processes, as a user runs them) and
checks that none of them wrote anything into the store.

  python scripts/bench_noop.py [PROFILE] [--store DIR] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, r


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", nargs="?", default="profiles/smollm2-int4.yaml")
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    build = [sys.executable, "-m", "toolchain", "build", args.profile, "--store", args.store, "--json"]
    first_s, first = timed(build)
    if first.returncode not in (0, 1):
        sys.exit(f"build failed: {first.stderr[-2000:]}")
    before = snapshot(Path(args.store))
    noop, torch_import = [], []
    for _ in range(args.runs):
        s, r = timed(build)
        doc = json.loads(r.stdout)
        assert all(st["status"] in ("cached", "skipped") or st["status"] == "failed" for st in doc["stages"]), doc
        noop.append(s)
        s, _ = timed([sys.executable, "-c", "import torch"])
        torch_import.append(s)
    wrote = snapshot(Path(args.store)) != before
    result = {
        "profile": args.profile, "first_build_s": round(first_s, 2), "runs": args.runs,
        "noop_median_s": round(statistics.median(noop), 3), "noop_max_s": round(max(noop), 3),
        "import_torch_median_s": round(statistics.median(torch_import), 3),
        "ratio_noop_to_import_torch": round(statistics.median(noop) / statistics.median(torch_import), 3),
        "store_written_during_noop": wrote, "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    print(f"\n| cached build (median of {args.runs}) | max | import torch (median) | ratio | store written |")
    print("|---|---|---|---|---|")
    print(f"| {result['noop_median_s']} s | {result['noop_max_s']} s | {result['import_torch_median_s']} s | "
          f"{result['ratio_noop_to_import_torch']} | {wrote} |")


if __name__ == "__main__":
    main()
