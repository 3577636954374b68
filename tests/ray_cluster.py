"""A real Ray cluster on loopback for the executor tests: a head and workers, each `ray start --block` in its own
process group (so one node can be killed alone), each with its own scratch store (TOOLCHAIN_RAY_SCRATCH) and fake
`accelerator_type:<card>` resources. Small on purpose: one CPU a node, a 100 MB object store, no dashboard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}


def ray_exe() -> str:
    exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    if not Path(exe).is_file():
        pytest.skip("ray is not installed: pip install 'toolchain[ray]'")
    return exe


@dataclass
class RayNode:
    name: str
    scratch: Path
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """The whole node at once (raylet, its workers, agents): a machine lost mid-build."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


@dataclass
class RayCluster:
    root: Path
    port: int
    client_port: int
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **RAY_ENV, **extra}

    def add(self, name: str, cpus: int = 1, card: str | None = None, head: bool = False) -> RayNode:
        scratch = self.root / f"scratch-{name}"
        log = self.root / f"{name}.log"
        args = [ray_exe(), "start", "--block", "--num-cpus", str(cpus), "--object-store-memory", "100000000",
                "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        if card:
            args += ["--resources", json.dumps({f"accelerator_type:{card}": 1})]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard=False", "--temp-dir",
                     str(self.root / "ray"),
                     "--ray-client-server-port", str(self.client_port)]
        else:
            args += ["--address", self.address]
        process = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                   env=self.env(TOOLCHAIN_RAY_SCRATCH=str(scratch)))
        node = RayNode(name, scratch, process, log)
        self.nodes.append(node)
        self.wait_for(len([n for n in self.nodes if n.process.poll() is None]))
        return node

    def alive(self) -> int:
        """Nodes the cluster counts alive (asked through `ray status`-free means: a tiny driver)."""
        code = (f"import ray, json; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))")
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env=self.env())
        except subprocess.TimeoutExpired:
            return 0
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0

    def wait_for(self, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.process.poll() is not None and n.process.returncode not in (None, -9):
                    pytest.fail(f"ray node {n.name} exited {n.process.returncode}: {n.log.read_text()[-2000:]}")
            if self.alive() >= count:
                return
            time.sleep(2)
        pytest.fail(f"the Ray cluster did not reach {count} nodes in {timeout} s")

    def stop(self) -> None:
        for n in reversed(self.nodes):
            n.kill()
