"""The verbs users reach for (issue 27): `ls` of builds with filters, `inspect` by prefix, `rm`, `export`,
`build --force`. One store with two tiny profiles, one of which failed its gate; real subprocesses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli, tiny_profile, write_profile

from toolchain.store import Store


@pytest.fixture(scope="module")
def store2(tmp_path_factory):
    """tiny (INT4, passes) and tiny-fp8 (its validation committed as a failed gate, as a failing build leaves it)."""
    from toolchain import profile as prof
    from toolchain.plan import build_plan
    from toolchain.progress import Reporter

    d = tmp_path_factory.mktemp("verbs")
    store = d / "store"
    ok = write_profile(d, tiny_profile(), "tiny.yaml")
    bad = write_profile(d, tiny_profile(name="tiny-fp8", quantize={"method": "fp8"}), "fp8.yaml")
    assert run_cli("build", str(ok), "--store", str(store), "-q").returncode == 0
    plan = build_plan(prof.load(bad), Store(store), Reporter(quiet=True))
    val = plan.stages[-1]
    s = Store(store)
    with s.lock(val.key):
        s.commit(s.new_tmp(val.key), val.key, {"stage": val.name, "status": "failed", "profile": "tiny-fp8",
                                               "reason": "gate failed: KL 0.9 > max 0.1", "inputs": val.inputs})
    r = run_cli("build", str(bad), "--store", str(store), "-q")
    assert r.returncode == 1, r.stderr
    return d


def ls(d, *args):
    r = run_cli("ls", "--store", str(d / "store"), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ls_lists_builds_with_filters(store2):
    rows = ls(store2)
    assert {(r["profile"], r["target"], r["format"], r["status"]) for r in rows} == {
        ("tiny", "compressed-tensors", "compressed-tensors", "pass"),
        ("tiny-fp8", "compressed-tensors", "compressed-tensors", "failed")}
    for r in rows:
        assert os.path.isdir(r["path"]) and r["size"] > 0 and r["age_seconds"] >= 0
    assert [r["profile"] for r in ls(store2, "--failed")] == ["tiny-fp8"]
    assert [r["profile"] for r in ls(store2, "--profile", "tiny")] == ["tiny"]
    assert ls(store2, "--format", "gguf") == []
    assert len(ls(store2, "--all")) == 7  # source shared; two quantize, export, validate
    text = run_cli("ls", "--store", str(store2 / "store")).stdout
    assert "tiny-fp8" in text and "failed" in text and "ago" in text


def test_inspect_ambiguous_prefix_lists_the_candidates(store2):
    import shutil

    s = Store(store2 / "store")
    keys = s.keys()
    twin = keys[0][:3] + ("f" if keys[0][3] != "f" else "e") * 61  # a second artifact sharing 3 characters
    with s.lock(twin):
        s.commit(s.new_tmp(twin), twin, {"stage": "quantize", "profile": "other", "inputs": {}})
    try:
        prefix = keys[0][:3]
        n = sum(k.startswith(prefix) for k in s.keys())
        r = run_cli("inspect", prefix, "--store", str(store2 / "store"))
        assert r.returncode == 2 and f"ambiguous: {n} artifacts start with {prefix}" in r.stderr, r.stderr
        assert keys[0][:16] in r.stderr and twin[:16] in r.stderr
    finally:
        shutil.rmtree(s.object_dir(twin))
    one = run_cli("inspect", keys[0][:12], "--store", str(store2 / "store"))
    assert one.returncode == 0 and json.loads(one.stdout)["key"] == keys[0]
    none = run_cli("inspect", "zz", "--store", str(store2 / "store"))
    assert none.returncode == 2 and "no artifact" in none.stderr


def test_export_hard_links_verifies_and_refuses_a_used_directory(store2):
    st = str(store2 / "store")
    r = run_cli("export", "tiny", str(store2 / "out"), "--store", st, "--json")
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    row = next(x for x in ls(store2) if x["profile"] == "tiny")
    assert doc["key"] == row["key"] and doc["verified"] and doc["linked"] == doc["files"] > 0
    manifest = json.loads((store2 / "out" / "toolchain-manifest.json").read_text())
    for f in manifest["files"]:
        assert os.path.samefile(store2 / "out" / f["path"], os.path.join(row["path"], f["path"]))
    r = run_cli("export", row["key"][:10], str(store2 / "copied"), "--store", st, "--copy", "--json")
    (doc,) = json.loads(r.stdout)
    assert doc["copied"] == doc["files"] and not os.path.samefile(
        store2 / "copied" / manifest["files"][0]["path"], os.path.join(row["path"], manifest["files"][0]["path"]))
    r = run_cli("export", "tiny", str(store2 / "out"), "--store", st)
    assert r.returncode == 2 and "new or empty directory" in r.stderr
    bad = next(x for x in ls(store2) if x["profile"] == "tiny-fp8")  # damage one file of the store copy
    f = json.loads((Path(bad["path"]) / "manifest.json").read_text())["files"][0]
    with open(Path(bad["path"]) / f["path"], "r+b") as fh:
        fh.seek(0)
        byte = fh.read(1)
        fh.seek(0)
        fh.write(bytes([byte[0] ^ 1]))
    r = run_cli("export", bad["key"], str(store2 / "damaged"), "--store", st)
    assert r.returncode == 1 and "the store copy is damaged" in r.stderr, r.stderr


def test_build_force_rebuilds_only_the_stage_asked(store2):
    st = str(store2 / "store")
    r = run_cli("build", str(store2 / "tiny.yaml"), "--store", st, "--force", "quantize", "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {s["name"]: s["status"] for s in doc["stages"]} == {
        "source": "cached", "quantize": "built", "export:compressed-tensors": "cached",
        "validate:compressed-tensors": "cached"}
    assert Store(st).manifest(doc["stages"][1]["key"])["reason"] == "forced (--force)"
    r = run_cli("build", str(store2 / "tiny.yaml"), "--store", st, "--force", "nosuch")
    assert r.returncode == 2 and "--force nosuch: no such stage" in r.stderr and "quantize" in r.stderr


def test_rm_waits_for_a_running_build(store2):
    import subprocess
    import sys
    import time

    with Store(store2 / "store").building():  # a build holds the store (shared); rm needs it alone
        proc = subprocess.Popen([sys.executable, "-m", "toolchain", "rm", "tiny", "--dry-run", "--store",
                                 str(store2 / "store")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "rm waits for it" in err and "would remove" in out, err


def test_rm_respects_roots_and_removes_a_build_but_not_what_others_share(store2):
    st = str(store2 / "store")
    row = next(x for x in ls(store2) if x["profile"] == "tiny")
    r = run_cli("rm", row["key"][:12], "--store", st)
    assert r.returncode == 2 and "a gc root" in r.stderr and "--force" in r.stderr
    dry = json.loads(run_cli("rm", "tiny-fp8", "--store", st, "--dry-run", "--json").stdout)
    assert len([x for x in dry["removed"] if "key" in x]) == 3 and len(ls(store2, "--all")) == 7
    shared = Store(st).manifest(row["stages"]["export:compressed-tensors"])["inputs"]
    r = run_cli("rm", str(store2 / "fp8.yaml"), "--store", st, "--json")
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)["removed"]
    assert {x["stage"] for x in removed if "key" in x} == {"quantize", "export:compressed-tensors",
                                                           "validate:compressed-tensors"}
    assert [x["profile"] for x in ls(store2)] == ["tiny"] and len(ls(store2, "--all")) == 4
    assert all(Store(st).has(k) for k in shared.values())
    r = run_cli("rm", row["key"][:12], "--store", st, "--force")
    assert r.returncode == 0 and not os.path.exists(row["path"])
    assert ls(store2)[0]["status"] == "incomplete"
