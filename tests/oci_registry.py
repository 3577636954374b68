"""A real OCI registry for the tests: Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, with its
own config file and storage in a temporary directory, optionally behind htpasswd. Installed by
scripts/setup-registry when absent; the tests that need it skip with the reason when it cannot be."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from toolchain.store import Store

REPO = Path(__file__).resolve().parent.parent


def registry_binary() -> str | None:
    exe = shutil.which("docker-registry") or shutil.which("registry")
    if exe is None and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "scripts" / "setup-registry")], capture_output=True, timeout=600)
        exe = shutil.which("docker-registry")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    host: str
    root: Path
    process: subprocess.Popen
    log: Path
    config: Path
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def url(self, repo: str, tag: str | None = None) -> str:
        return f"oci://{self.host}/{repo}" + (f":{tag}" if tag else "")

    def blob_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes (to tamper with it in a test)."""
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Start it again on the same port, storage and config (after stop())."""
        self.process = _launch(self.config, int(self.host.rsplit(":", 1)[1]), self.tls, self.log)


def start_registry(tmp: Path, htpasswd: tuple[str, str] | None = None, extra_auth: str = "",
                   tls: tuple[Path, Path] | None = None) -> Registry:
    """A registry on 127.0.0.1: plain HTTP, or HTTPS with tls=(certificate, key)."""
    exe = registry_binary()
    if exe is None:
        pytest.skip("docker-registry is not installed and scripts/setup-registry could not install it "
                    "(needs apt-get and root or sudo)")
    port = free_port()
    root = tmp / "registry-data"
    root.mkdir(parents=True, exist_ok=True)
    auth = extra_auth
    if htpasswd:
        hp = tmp / "htpasswd"
        if shutil.which("htpasswd") is None:
            pytest.skip("htpasswd (apache2-utils) is not installed; scripts/setup-registry installs it")
        user, password = htpasswd
        # distribution accepts only bcrypt entries (-B); the password goes on stdin (-i), not the command line.
        out = subprocess.run(["htpasswd", "-niBC", "4", user], input=password, capture_output=True, text=True,
                             check=True)
        hp.write_text(out.stdout.strip() + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: toolchain-test\n    path: {hp}\n"
    config = tmp / "registry.yml"
    # A fixed http.secret (it signs upload states) lets an upload go on across a restart, as in production.
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: toolchain-test-{port}\n"
        + (f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else "") + auth)
    log = tmp / "registry.log"
    reg = Registry(f"127.0.0.1:{port}", root, _launch(config, port, bool(tls), log), log, config, bool(tls))
    if htpasswd:
        reg.username, reg.password = htpasswd
    return reg


def _launch(config: Path, port: int, tls: bool, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([registry_binary(), "serve", str(config)], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/", timeout=1, verify=False)
            if r.status_code in (200, 401):
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"docker-registry did not answer on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


def make_artifact(store: Path, key_char: str, files: dict[str, bytes]) -> str:
    """A store artifact with the given files (for transfer tests that need no model)."""
    s = Store(store)
    key = key_char * 64
    tmp = s.new_tmp(key)
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    s.commit(tmp, key, {"stage": "export:test", "profile": "test"})
    return key
