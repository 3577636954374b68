"""The verbs users reach for (issue 27): `ls` of builds with filters, `inspect` by prefix, `rm`, `export`,
`build --force`. One store with two tiny profiles, one of which failed its gate; real subprocesses."""

from __future__ import annotations

import json
import os

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
