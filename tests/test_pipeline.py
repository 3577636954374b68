"""The build pipeline on a tiny synthetic Llama: caching, no-op rebuilds, explanations, kill safety and
concurrent builds. Real subprocesses, as a user or CI runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import build_json, run_cli, tiny_profile, write_profile

from toolchain.store import Store


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")}


def test_build_then_noop(tmp_path):
    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    first = build_json(str(profile), "--store", str(store))
    assert [s["status"] for s in first["stages"]] == ["built"] * 4
    assert first["targets"][0]["status"] == "built"
    assert first["targets"][0]["conformance"]["max_abs_err"] == 0
    before = snapshot(store)
    second = build_json(str(profile), "--store", str(store))
    assert [s["status"] for s in second["stages"]] == ["cached"] * 4
    assert [s["key"] for s in second["stages"]] == [s["key"] for s in first["stages"]]
    assert snapshot(store) == before, "a cached build must write nothing"


def test_json_keeps_progress_on_stderr_and_quiet_silences_it(tmp_path):
    """CI logs: with --json the document alone is on stdout and the stages are still reported on stderr."""
    profile = write_profile(tmp_path, tiny_profile())
    r = run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for stage in doc["stages"]:
        assert stage["name"] in r.stderr
    quiet = run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json", "-q")
    assert json.loads(quiet.stdout)["stages"] and quiet.stderr.strip() == ""


def test_changed_field_rebuilds_downstream_and_plan_names_it(tmp_path):
    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    first = build_json(str(profile), "--store", str(store))
    write_profile(tmp_path, tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 64,
                                                   "symmetric": True}))
    plan = json.loads(run_cli("plan", str(profile), "--store", str(store), "--json").stdout)
    status = {s["name"]: s for s in plan["stages"]}
    assert status["source"]["status"] == "cached"
    assert status["quantize"]["status"] == "build"
    assert "group_size 32 -> 64" in status["quantize"]["reason"]
    assert status["export:compressed-tensors"]["status"] == "build"
    assert "quantize" in status["export:compressed-tensors"]["reason"]
    second = build_json(str(profile), "--store", str(store))
    assert [s["status"] for s in second["stages"]] == ["cached", "built", "built", "built"]
    assert second["stages"][0]["key"] == first["stages"][0]["key"]


def test_ls_inspect_gc(tmp_path, cli):
    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    build_json(str(profile), "--store", str(store))
    write_profile(tmp_path, tiny_profile(quantize={"method": "fp8"}))
    doc = build_json(str(profile), "--store", str(store))
    assert doc["targets"][0]["status"] == "built"
    listed = json.loads(cli("ls", "--all", "--store", str(store), "--json").stdout)
    assert len(listed) == 7  # source shared; two quantize/export/validate
    key = doc["stages"][1]["key"]
    manifest = json.loads(cli("inspect", key[:10], "--store", str(store)).stdout)
    assert manifest["key"] == key and manifest["stage"] == "quantize"
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    dry = json.loads(cli("gc", "--store", str(store), "--dry-run", "--json").stdout)
    assert len(dry["removed"]) == 3  # the int4 quantize, export and validate no ref points at any more
    assert len(Store(store).keys()) == 7
    cli("gc", "--store", str(store))
    assert sorted(Store(store).keys()) == sorted(s["key"] for s in doc["stages"])


def test_sigkill_mid_quantize_leaves_nothing_complete(tmp_path):
    store = tmp_path / "store"
    # Big enough that quantize takes seconds: SmolLM2's shape with random weights.
    data = tiny_profile(source={"synthetic": {"arch": "smollm2-135m", "num_layers": 12, "dtype": "float32"}},
                        quantize={"method": "rtn", "group_size": 64})
    profile = write_profile(tmp_path, data)
    plan = json.loads(run_cli("plan", str(profile), "--store", str(store), "--json").stdout)
    qkey = next(s["key"] for s in plan["stages"] if s["name"] == "quantize")
    proc = subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(profile), "--store", str(store), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((store / "tmp").glob(f"{qkey}.*")):
        time.sleep(0.05)
    assert list((store / "tmp").glob(f"{qkey}.*")), "quantize never started"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = Store(store)
    assert not s.has(qkey) and not s.object_dir(qkey).exists()
    assert all(s.has(k) for k in s.keys())  # whatever is in objects/ is complete
    doc = build_json(str(profile), "--store", str(store))
    assert [x["status"] for x in doc["stages"]] == ["cached", "built", "built", "built"]
    assert not list((store / "tmp").glob(f"{qkey}.*")), "the killed build's temp dir was cleared"


def test_two_concurrent_builds_make_one_artifact(tmp_path):
    store = tmp_path / "store"
    profile = write_profile(tmp_path, tiny_profile())
    cmd = [sys.executable, "-m", "toolchain", "build", str(profile), "--store", str(store), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    docs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for i in range(4):
        statuses = sorted(d["stages"][i]["status"] for d in docs)
        assert statuses == ["built", "cached"], statuses
    assert len(Store(store).keys()) == 4
    assert not list((store / "tmp").glob("*"))
