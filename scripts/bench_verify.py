"""What `toolchain verify` costs: seconds per GB re-hashed, on a synthetic store of N artifacts of M MB each.

    python scripts/bench_verify.py --artifacts 3 --mb 200 [--repeat 3]

Writes the store under a temporary directory, runs `toolchain verify --json` on it in a fresh process (as a user
does) `--repeat` times and prints one JSON line per run and the best. The files were just written, so they are
in the page cache: this is the hashing cost, not the disk's; a cold read adds the disk's read time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolchain.store import Store  # noqa: E402


def make_store(root: Path, artifacts: int, mb: int) -> None:
    s = Store(root)
    block = os.urandom(1 << 20)
    for i in range(artifacts):
        key = f"{i:02x}" * 32
        tmp = s.new_tmp(key)
        with open(tmp / "model.safetensors", "wb") as f:
            for j in range(mb):
                f.write(bytes([j & 0xFF]) + block[1:])  # no two blocks alike
        (tmp / "config.json").write_text("{}")
        s.commit(tmp, key, {"stage": "bench", "profile": "bench"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as d:
        make_store(Path(d) / "store", a.artifacts, a.mb)
        runs = []
        for _ in range(a.repeat):
            r = subprocess.run([sys.executable, "-m", "toolchain", "verify", "--store", f"{d}/store", "--json"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            doc = json.loads(r.stdout)
            assert r.returncode == 0 and doc["ok"], r.stderr
            runs.append({"bytes": doc["bytes"], "seconds": doc["seconds"],
                         "s_per_gb": round(doc["seconds"] / (doc["bytes"] / 1e9), 3)})
            print(json.dumps(runs[-1]))
        best = min(runs, key=lambda x: x["s_per_gb"])
        print(json.dumps({"best_s_per_gb": best["s_per_gb"], "gb_per_s": round(1 / best["s_per_gb"], 2),
                          "bytes": best["bytes"]}))


if __name__ == "__main__":
    main()
