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


# -- issue 9 items 6 and 7 --------------------------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import build_json, run_cli, tiny_profile, write_profile  # noqa: E402


def test_gc_waits_for_a_running_build(tmp_path):
    store = Store(tmp_path)
    key = "e5" * 32
    with store.lock(key):
        store.commit(store.new_tmp(key), key, {"stage": "t", "inputs": {}})  # unreferenced: gc's to remove
    waited = threading.Event()
    done: list = []
    with store.building():
        gc = threading.Thread(target=lambda: done.append(store.gc(on_wait=waited.set)))
        gc.start()
        assert waited.wait(10), "gc did not notice the running build"
        time.sleep(0.2)
        assert not done and store.has(key), "gc ran beside a build"
    gc.join(10)
    assert [r["key"] for r in done[0]] == [key] and not store.has(key)


def test_roots_are_recorded_before_the_first_stage(tmp_path, monkeypatch):
    from toolchain import profile as prof
    from toolchain import run
    from toolchain.plan import build_plan, ref_name
    from toolchain.progress import Reporter

    store = Store(tmp_path / "store")
    plan = build_plan(prof.from_dict(tiny_profile(), base_dir=tmp_path), store)
    seen = []
    real = run._run_stage

    def spy(stage, *args):
        if not seen:
            seen.append(store.roots())
        return real(stage, *args)

    monkeypatch.setattr(run, "_run_stage", spy)
    run.execute(plan, store, Reporter(quiet=True))
    assert seen[0] >= {s.key for s in plan.stages}, "no roots when the first stage ran: a gc would delete its commits"
    # once it succeeded, its pending roots are the profile's last build
    ref = store.read_ref(ref_name(plan.profile.profile.name, plan.source))
    assert [s["key"] for s in ref["stages"]] == [s.key for s in plan.stages]
    assert not store.pending_ref_path(ref_name(plan.profile.profile.name, plan.source)).exists()


def test_synthetic_run_keeps_the_real_builds_roots(tmp_path):
    """A real build, then `--source synthetic` of the same profile, then gc: the real artifacts stay."""
    seed = build_json(str(write_profile(tmp_path, tiny_profile(name="seed"), "seed.yaml")),
                      "--store", str(tmp_path / "seed-store"))
    source_dir = Path(seed["store"]) / "objects" / seed["stages"][0]["key"][:2] / seed["stages"][0]["key"]
    model = tmp_path / "model"
    shutil.copytree(source_dir, model, ignore=shutil.ignore_patterns("manifest.json"))
    real = tiny_profile(name="real", source={"path": str(model), "arch": "llama-tiny"})
    profile = str(write_profile(tmp_path, real, "real.yaml"))
    store = str(tmp_path / "store")
    real_doc = build_json(profile, "--store", store)
    assert all(s["status"] == "built" for s in real_doc["stages"]), real_doc["stages"]
    synth = build_json(profile, "--store", store, "--source", "synthetic")
    assert synth["source"].startswith("synthetic:llama-tiny")
    r = run_cli("gc", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    removed = {x["key"] for x in json.loads(r.stdout)["removed"]}
    assert not removed & {s["key"] for s in real_doc["stages"]}, "gc deleted the real build's artifacts"
    assert sorted(p.name for p in (tmp_path / "store" / "refs").iterdir()) == \
        ["real.json", "real@synthetic-llama-tiny.json"]


def test_stat_cache_rehashes_a_same_size_same_mtime_rewrite(tmp_path):
    """`cp -p` onto a file keeps size and mtime (and here the inode): only ctime tells the content changed."""
    from toolchain.hashing import StatCache, sha256_file

    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1024)
    cache_path = tmp_path / "stat.json"
    cache = StatCache(cache_path)
    old = cache.hash(f)
    cache.save()
    st = f.stat()
    time.sleep(0.05)  # ctime has a clock tick's granularity
    with open(f, "r+b") as fh:  # same inode, same size
        fh.write(b"b" * 1024)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p does
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    again = StatCache(cache_path).hash(f)
    assert again == sha256_file(f) != old


def test_a_killed_gc_leftover_neither_trips_ls_nor_survives_gc(tmp_path):
    store = Store(tmp_path)
    key = "f6" * 32
    with store.lock(key):
        store.commit(store.new_tmp(key), key, {"stage": "t", "inputs": {}})
    leftover = store.object_dir(key).with_name(f".gc-{key}-{time.time_ns()}")
    os.rename(store.object_dir(key), leftover)  # gc renamed it, then was killed before rmtree
    r = run_cli("ls", "--store", str(tmp_path), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    removed = store.gc()
    assert any(x["stage"] == "(left by a killed gc)" for x in removed) and not leftover.exists()


def test_refs_and_stat_cache_are_fsynced(tmp_path, monkeypatch):
    from toolchain.hashing import StatCache

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = Store(tmp_path)
    store.write_ref("p", {"stages": []})
    (tmp_path / "f").write_text("x")
    cache = StatCache(tmp_path / "cache" / "stat.json")
    cache.hash(tmp_path / "f")
    cache.save()
    assert any(".p.json.tmp" in s for s in synced) and str(tmp_path / "refs") in synced
    assert any(".stat.json.tmp" in s for s in synced) and str(tmp_path / "cache") in synced


def test_hf_offline_flag_is_set_before_datasets_is_imported(tmp_path):
    code = ("import sys\nfrom toolchain.quant import calibration\n"
            "try:\n    calibration._hf_dataset('nobody/none:train')\nexcept Exception:\n    pass\n"
            "import datasets.config as c\nprint(c.HF_DATASETS_OFFLINE)")
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_OFFLINE"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "empty")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if "No module named 'datasets'" in r.stderr:
        import pytest

        pytest.skip("datasets is not installed")
    assert r.stdout.strip() == "True", r.stderr


def test_a_failed_build_keeps_the_last_good_builds_roots(cli, tmp_path, monkeypatch):
    """Issue 22 item 7: a good build, then a build of the same profile whose quantize stage fails at run time,
    then gc: the good build's artifacts stay, and `plan` still diffs against the good build."""
    import toolchain.stages.quantize as quantize

    store = str(tmp_path / "store")
    good = cli("build", str(write_profile(tmp_path, tiny_profile())), "--store", store, "--json", "-q")
    assert good.exit_code == 0, good.output
    good_keys = {s["key"] for s in json.loads(good.stdout)["stages"]}

    def fails(ctx):
        raise RuntimeError("the quantizer fell over")

    monkeypatch.setattr(quantize, "run", fails)
    changed = tiny_profile(quantize={"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True})
    bad = cli("build", str(write_profile(tmp_path, changed)), "--store", store, "--json", "-q")
    assert bad.exit_code == 1 and "the quantizer fell over" in bad.output, bad.output
    gc = cli("gc", "--store", store, "--json")
    assert gc.exit_code == 0, gc.output
    removed = {r["key"] for r in json.loads(gc.stdout)["removed"]}
    assert not removed & good_keys, "gc deleted the last good build's artifacts after a failed build"
    assert all(Store(store).has(k) for k in good_keys)
    monkeypatch.undo()
    again = cli("build", str(write_profile(tmp_path, tiny_profile())), "--store", store, "--json", "-q")
    assert {s["status"] for s in json.loads(again.stdout)["stages"]} == {"cached"}
