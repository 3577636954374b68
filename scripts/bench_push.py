#!/usr/bin/env python
"""Push (and pull back) one big artifact through a real OCI registry on loopback: peak RSS and throughput of
`toolchain push`/`pull`, against what the disk itself does (a plain copy of the file on the same disk), and,
with --oras PYTHON, oras-py doing the same push in that interpreter (monolithic and chunked).

  python scripts/bench_push.py --size-gb 2 [--chunk-mb 64] [--oras /path/to/venv/bin/python] [--out bench.json]

Every push and pull runs as its own process; peak RSS is that process's ru_maxrss (os.wait4). The registry is
Debian's docker-registry (distribution 2.8) with its filesystem storage in the work directory, so the registry
writes every byte to the same disk the file is read from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from oci_registry import start_registry  # noqa: E402

from toolchain.store import Store  # noqa: E402

BLOCK = 8 << 20


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    # wait4 gives this child's own rusage; read stdout first so the pipe never blocks it.
    out = proc.stdout.read()
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def make_artifact(store: Path, size: int) -> tuple[str, Path]:
    s = Store(store)
    key = hashlib.sha256(f"bench-push-{size}".encode()).hexdigest()
    tmp = s.new_tmp(key)
    with open(tmp / "model.safetensors", "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(os.urandom(n))
            left -= n
    (tmp / "config.json").write_text('{"model_type": "llama"}')
    s.commit(tmp, key, {"stage": "export:bench", "profile": "bench"})
    return key, s.object_dir(key) / "model.safetensors"


def disk_copy(src: Path, dst: Path) -> float:
    """Seconds to copy src to dst on the same disk, fsynced: the loopback disk's read+write speed."""
    t0 = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, BLOCK)
        fo.flush()
        os.fsync(fo.fileno())
    return time.perf_counter() - t0


ORAS_PUSH = """
import sys, oras.client
path, target, chunked = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = oras.client.OrasClient(hostname=target.split("/")[0], insecure=True)
r = c.push(files=[path], target=target, do_chunked=chunked, chunk_size=int(sys.argv[4]))
print(r.status_code)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--oras", help="a Python with oras-py installed, to push the same file with it")
    ap.add_argument("--work", help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    size = int(args.size_gb * (1 << 30))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-push-"))
    work.mkdir(parents=True, exist_ok=True)
    reg = start_registry(work)
    rows: list[dict] = []
    try:
        print(f"writing a {size / 2**30:.2f} GiB artifact ...", file=sys.stderr)
        key, weights = make_artifact(work / "store", size)
        copy_s = disk_copy(weights, work / "copy.bin")
        (work / "copy.bin").unlink()
        rows.append({"what": "disk copy (read + write + fsync, same disk)", "seconds": copy_s, "rss_mib": None})
        env = {"TOOLCHAIN_REGISTRY_CHUNK_MB": str(args.chunk_mb), "TOOLCHAIN_UPLOAD_STATE": str(work / "state")}
        push = [sys.executable, "-m", "toolchain", "push", key, "--store", str(work / "store"), "--insecure",
                "--json", "-q", "--to"]
        s, rss, out = run([*push, reg.url("bench/model", "v1")], env)
        digest = json.loads(out)["digest"]
        rows.append({"what": f"toolchain push ({args.chunk_mb} MiB chunks)", "seconds": s, "rss_mib": rss})
        s, rss, out = run([*push, reg.url("bench/model", "v2")], env)
        assert json.loads(out)["digest"] == digest and json.loads(out)["uploaded_bytes"] == 0
        rows.append({"what": "toolchain push again (every blob HEAD-skipped)", "seconds": s, "rss_mib": rss,
                     "bytes": 0})
        s, rss, _ = run([sys.executable, "-m", "toolchain", "pull", reg.url("bench/model", "v1"),
                         str(work / "pulled"), "--insecure", "-q"])
        rows.append({"what": "toolchain pull (digest verified, fsynced, renamed)", "seconds": s, "rss_mib": rss})
        shutil.rmtree(work / "pulled")
        if args.oras:
            script = work / "oras_push.py"
            script.write_text(ORAS_PUSH)
            for chunked in (False, True):
                shutil.rmtree(reg.root / "docker", ignore_errors=True)  # oras-py would HEAD-skip our blob
                mode = f"chunked, {args.chunk_mb} MiB" if chunked else "monolithic"
                # oras-py pushes only files under its working directory, named relative to it
                s, rss, _ = run([args.oras, str(script), weights.name, f"{reg.host}/bench/oras:{int(chunked)}",
                                 "1" if chunked else "0", str(args.chunk_mb << 20)], cwd=weights.parent)
                rows.append({"what": f"oras-py {_oras_version(args.oras)} push ({mode})", "seconds": s,
                             "rss_mib": rss})
    finally:
        reg.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r.setdefault("bytes", size)
        r["mib_per_s"] = r["bytes"] / 2**20 / r["seconds"] if r["bytes"] else None
    doc = {"size_bytes": size, "chunk_mib": args.chunk_mb, "machine": f"{platform.node()} {platform.machine()}, "
           f"{os.cpu_count()} CPUs, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime()),
           "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"{'what':<52} {'seconds':>8} {'MiB/s':>8} {'peak RSS MiB':>13}")
    for r in rows:
        rate = f"{r['mib_per_s']:.0f}" if r["mib_per_s"] else "-"
        rss = f"{r['rss_mib']:.0f}" if r["rss_mib"] else "-"
        print(f"{r['what']:<52} {r['seconds']:>8.2f} {rate:>8} {rss:>13}")


def _oras_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import oras.version as v; print(v.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    main()
