"""The store's guarantees in isolation: atomic commit, stale temp dirs, refs that do not rewrite, gc."""

from __future__ import annotations

import json

from toolchain.store import Store


def test_commit_is_atomic_and_lists_files(tmp_path):
    store = Store(tmp_path)
    with store.lock("ab" * 32):
        tmp = store.new_tmp("ab" * 32)
        (tmp / "x.bin").write_bytes(b"hello")
        assert not store.has("ab" * 32), "nothing is visible before commit"
        m = store.commit(tmp, "ab" * 32, {"stage": "t", "inputs": {}})
    assert store.has("ab" * 32) and not tmp.exists()
    assert m["files"] == [{"path": "x.bin", "size": 5,
                           "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]
    assert json.loads((store.object_dir("ab" * 32) / "manifest.json").read_text())["key"] == "ab" * 32


def test_new_tmp_clears_leftovers_of_a_killed_build(tmp_path):
    store = Store(tmp_path)
    key = "cd" * 32
    with store.lock(key):
        stale = store.new_tmp(key)
        (stale / "half.bin").write_bytes(b"x")
    with store.lock(key):
        fresh = store.new_tmp(key)
    assert not stale.exists() and fresh.exists()


def test_write_ref_only_when_changed(tmp_path):
    store = Store(tmp_path)
    assert store.write_ref("p", {"stages": []}) is True
    mtime = store.ref_path("p").stat().st_mtime_ns
    assert store.write_ref("p", {"stages": []}) is False
    assert store.ref_path("p").stat().st_mtime_ns == mtime


def test_gc_keeps_what_refs_reach_through_inputs(tmp_path):
    store = Store(tmp_path)
    a, b, c = "a1" * 32, "b2" * 32, "c3" * 32
    for key, inputs in ((a, {}), (b, {"x": a}), (c, {})):
        with store.lock(key):
            store.commit(store.new_tmp(key), key, {"stage": "t", "inputs": inputs})
    store.write_ref("p", {"stages": [{"name": "s", "key": b}]})
    assert [r["key"] for r in store.gc(dry_run=True)] == [c]
    store.gc()
    assert store.keys() == sorted([a, b])
