"""The Ray executor on a real cluster on loopback: a head with a fake `accelerator_type:H100` resource and a worker
with `accelerator_type:H200` (tests/ray_cluster.py), the registry of the registry tests as the shared cache.

A 2x2 matrix of llama-tiny (speed iterations x card) to ONNX, timed by onnxruntime on the CPU: the speed stages
are the card-bound ones, so each must run on the node holding its card. Keys equal a local build's, and so do
the bytes of every stage but speed (whose files hold timings, different on every run). Then a worker killed in
the middle of a stage, and Ctrl-C: no partial artifact in any store, nor in the registry.
Minutes of work on a shared CPU (cluster start, the ONNX export): marked slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, tiny_profile, write_profile
from oci_registry import free_port, start_registry
from ray_cluster import RAY_ENV, RayCluster, ray_exe

from toolchain.hashing import sha256_file
from toolchain.store import MANIFEST, Store

pytestmark = pytest.mark.slow

SPEED = {"speed": {"runtime": "onnxruntime", "batch_sizes": [1], "input_len": 8, "output_len": 4, "iterations": 1}}


def onnx_profile(tmp: Path, matrix: dict, name: str) -> Path:
    return write_profile(tmp, tiny_profile(targets=["onnx"], validate=SPEED, matrix=matrix), name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_exe()
    root = tmp_path_factory.mktemp("ray")
    registry = start_registry(root)
    c = RayCluster(root, free_port(), free_port())
    try:
        c.add("head", card="H100", head=True)
        c.add("w1", card="H200")
        c.registry = registry
        c.cache = registry.url("x/ray-cache")
        yield c
    finally:
        c.stop()
        registry.stop()


def ray_args(c: RayCluster, store: Path) -> list[str]:
    return ["--store", str(store), "--executor", "ray", "--address", c.address, "--cache", c.cache, "--insecure",
            "--json"]


def complete(store: Path) -> list[str]:
    """Every artifact of a store is whole (its files are those its manifest lists, by size and sha256); returns
    the keys. A half-written artifact would fail here."""
    s = Store(store)
    for key in s.keys():
        m = s.manifest(key)
        root = s.object_dir(key)
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
        assert files == {f["path"] for f in m["files"]}, key
        for f in m["files"]:
            assert sha256_file(root / f["path"]) == f["sha256"], (key, f["path"])
    objects = store / "objects"
    assert not list(objects.glob("*/.*")) if objects.is_dir() else True
    return s.keys()


def tag_exists(c: RayCluster, key: str) -> bool:
    from toolchain.registry.cache import RemoteCache

    cache = RemoteCache(c.cache, insecure=True)
    try:
        return cache.client.manifest_digest(cache.ref.repository, f"stage-{key}") is not None
    finally:
        cache.close()


def test_matrix_on_two_cards_equals_a_local_build(cluster, tmp_path):
    profile = onnx_profile(tmp_path, {"validate.speed.iterations": [1, 2], "card": ["H100", "H200"]}, "m.yaml")
    local = run_cli("build", str(profile), "--store", str(tmp_path / "local"), "--json")
    assert local.returncode == 0, local.stderr
    r = run_cli("build", str(profile), *ray_args(cluster, tmp_path / "ray"), env=RAY_ENV)
    assert r.returncode == 0, r.stderr
    ray_doc, local_doc = json.loads(r.stdout), json.loads(local.stdout)
    assert ray_doc["failures"] == []
    assert [v["profile"] for v in ray_doc["variants"]] == [v["profile"] for v in local_doc["variants"]] == [
        "tiny@iterations=1,card=H100", "tiny@iterations=1,card=H200",
        "tiny@iterations=2,card=H100", "tiny@iterations=2,card=H200"]
    for rv, lv in zip(ray_doc["variants"], local_doc["variants"], strict=True):
        assert [(s["name"], s["key"]) for s in rv["stages"]] == [(s["name"], s["key"]) for s in lv["stages"]]
        card = rv["profile"].rsplit("card=", 1)[1]
        for s in rv["stages"]:
            assert s["status"] in ("built", "cached") and s.get("node"), s
        speed = next(s for s in rv["stages"] if s["name"] == "speed:onnx")
        assert speed["node"].endswith(f"[{card}]"), speed  # only where the card's resource is
    # One export for the four variants: queued once (one line per variant), never twice.
    assert r.stderr.count("export:onnx: queued") == 4, r.stderr
    # The client's store holds what the local build holds: the same keys, the same bytes (speed: same files,
    # timings of their own), every artifact whole, nothing left in tmp/.
    keys = complete(tmp_path / "ray")
    assert keys == complete(tmp_path / "local")
    lstore, rstore = Store(tmp_path / "local"), Store(tmp_path / "ray")
    for key in keys:
        lm, rm = lstore.manifest(key), rstore.manifest(key)
        if lm["stage"].startswith("speed:"):
            # onnxruntime's profile is named by the time it ran: the same files but for that timestamp
            assert len(lm["files"]) == len(rm["files"]) and "speed.json" in {f["path"] for f in rm["files"]}
        else:
            assert lm["files"] == rm["files"], lm["stage"]
    assert not list((tmp_path / "ray" / "tmp").iterdir())
    for node in cluster.nodes:
        complete(node.scratch)


def _wait_for_tmp(scratch: Path, key: str, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((scratch / "tmp").glob(f"{key}.*")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the build ended before stage {key[:12]} started: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"stage {key[:12]} did not start in {scratch} within {timeout} s")


def _speed_key(profile: Path, store: Path) -> str:
    r = run_cli("plan", str(profile), "--store", str(store), "--json")
    doc = json.loads(r.stdout)
    return next(s["key"] for s in doc["stages"] if s["name"] == "speed:onnx")


def _popen_build(cluster: RayCluster, profile: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(profile), *ray_args(cluster, store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **RAY_ENV})


def test_worker_killed_mid_stage_is_retried_elsewhere(cluster, tmp_path):
    """The only H200 node dies while it times; a second H200 node joins; the stage runs again there."""
    profile = onnx_profile(tmp_path, {"validate.speed.iterations": [3], "card": ["H200"]}, "kill.yaml")
    store = tmp_path / "store"
    key = _speed_key(profile, store)
    proc = _popen_build(cluster, profile, store)
    w1 = next(n for n in cluster.nodes if n.name == "w1")
    _wait_for_tmp(w1.scratch, key, proc)
    w1.kill()
    w2 = cluster.add("w2", card="H200")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    speed = next(s for s in doc["stages"] if s["name"] == "speed:onnx")
    assert speed["status"] == "built" and speed["node"].endswith("[H200]"), speed
    assert Store(w2.scratch).has(key) and not Store(w1.scratch).has(key)  # retried elsewhere
    assert list((w1.scratch / "tmp").glob(f"{key}.*"))  # what the dead worker left: a temp dir, never an artifact
    assert key in complete(store) and tag_exists(cluster, key)
    complete(w1.scratch)
    complete(w2.scratch)
    assert not list((store / "tmp").iterdir())


def test_ctrl_c_cancels_and_leaves_nothing_partial(cluster, tmp_path):
    profile = onnx_profile(tmp_path, {"validate.speed.iterations": [4], "card": ["H100"]}, "int.yaml")
    store = tmp_path / "store"
    key = _speed_key(profile, store)
    proc = _popen_build(cluster, profile, store)
    head = next(n for n in cluster.nodes if n.name == "head")
    _wait_for_tmp(head.scratch, key, proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    time.sleep(10)  # a task that was not cancelled would finish its few seconds of timing meanwhile
    assert not Store(head.scratch).has(key) and not Store(store).has(key) and not tag_exists(cluster, key)
    complete(store)
    complete(head.scratch)
    assert not [p for p in (store / "tmp").iterdir()] if (store / "tmp").is_dir() else True
