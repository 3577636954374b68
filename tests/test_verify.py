"""Cached bytes are re-checked: `toolchain verify` and `build --verify` (issue 22 item 5).

Real subprocesses on the tiny synthetic profile: one byte of a cached model.safetensors is flipped; `verify`
exits 1 naming the file, a plain `build` still trusts it (what --verify is for), `build --verify` discards and
rebuilds that stage only and exits 0, and the rebuilt file has the bytes the manifest recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, tiny_profile, write_profile
from oci_registry import make_artifact

from toolchain.store import Store
from toolchain.verify import check_artifact, discard


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    profile = write_profile(d, tiny_profile())
    r = run_cli("build", str(profile), "--store", str(d / "store"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    return profile, d / "store", {s["name"]: s["key"] for s in json.loads(r.stdout)["stages"]}


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the built store (each test damages it)."""
    profile, src, keys = built
    shutil.copytree(src, tmp_path / "store", symlinks=True)
    return profile, tmp_path / "store", keys


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_the_flipped_file_and_build_verify_rebuilds_that_stage(store):
    profile, root, keys = store
    s = Store(root)
    assert run_cli("verify", str(profile), "--store", str(root)).returncode == 0
    export = keys["export:compressed-tensors"]
    weights = s.object_dir(export) / "model.safetensors"
    recorded = next(f["sha256"] for f in s.manifest(export)["files"] if f["path"] == "model.safetensors")
    flip_byte(weights)

    r = run_cli("verify", str(profile), "--store", str(root))
    assert r.returncode == 1, r.stderr
    assert f"content changed: {weights}" in r.stderr and "does not match" in r.stdout + r.stderr
    doc = json.loads(run_cli("verify", "tiny", "--store", str(root), "--json").stdout)
    assert not doc["ok"] and [(p["path"], p["key"]) for p in doc["problems"]] == [(str(weights), export)]
    assert doc["artifacts"] == len(keys) and doc["bytes"] > 0
    assert run_cli("verify", export[:10], "--store", str(root)).returncode == 1
    assert run_cli("verify", keys["quantize"][:10], "--store", str(root)).returncode == 0
    assert run_cli("verify", "--store", str(root)).returncode == 1  # the whole store

    plain = json.loads(run_cli("build", str(profile), "--store", str(root), "--json", "-q").stdout)
    assert {s["name"]: s["status"] for s in plain["stages"]}["export:compressed-tensors"] == "cached"

    r = run_cli("build", str(profile), "--store", str(root), "--json", "-q", "--verify")
    assert r.returncode == 0, r.stderr
    status = {s["name"]: s["status"] for s in json.loads(r.stdout)["stages"]}
    assert status["export:compressed-tensors"] == "built"
    assert all(v == "cached" for k, v in status.items() if not k.startswith("export:")), status
    said = "".join(r.stderr.split())  # the console wraps long warnings
    assert "failedverification" in said and f"{weights}(contentchanged)" in said
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded
    assert not list((root / "objects" / export[:2]).glob(".gc-*")), "the corrupt copy is gone"
    assert run_cli("verify", str(profile), "--store", str(root)).returncode == 0


def test_every_kind_of_damage_is_found(tmp_path):
    root = tmp_path / "store"
    s = Store(root)
    files = {"model.safetensors": os.urandom(1000), "config.json": b"{}", "sub/tok.json": b"[1]"}
    key = make_artifact(root, "e", files)
    assert check_artifact(s, key) == []
    d = s.object_dir(key)
    (d / "config.json").unlink()
    (d / "sub/tok.json").write_bytes(b"[1, 2]")
    (d / "extra.bin").write_bytes(b"x")
    flip_byte(d / "model.safetensors")
    got = {Path(p["path"]).name: p["problem"] for p in check_artifact(s, key)}
    assert got == {"config.json": "missing", "tok.json": "size changed", "extra.bin": "not in the manifest",
                   "model.safetensors": "content changed"}
    (d / "manifest.json").write_text("{not json")
    assert [p["problem"] for p in check_artifact(s, key)] == ["unreadable manifest"]


def test_discard_keeps_an_artifact_a_concurrent_build_replaced(tmp_path):
    root = tmp_path / "store"
    s = Store(root)
    key = make_artifact(root, "f", {"a.bin": b"1"})
    stale_inode = s.object_dir(key).stat().st_ino
    os.rename(s.object_dir(key), tmp_path / "old")  # kept: its inode number cannot be reused
    make_artifact(root, "f", {"a.bin": b"1"})  # rebuilt meanwhile: another directory
    assert not discard(s, key, stale_inode) and s.has(key)
    assert discard(s, key, s.object_dir(key).stat().st_ino) and not s.has(key)
    assert not list(s.object_dir(key).parent.iterdir()), "renamed aside and deleted, nothing left"


def test_verify_of_nothing_known_is_exit_2(tmp_path):
    r = run_cli("verify", "--store", str(tmp_path / "store"))
    assert r.returncode == 2 and "no store at" in r.stderr and not (tmp_path / "store").exists()
    make_artifact(tmp_path / "store", "a", {"x.bin": b"x"})
    r = run_cli("verify", "no-such-thing", "--store", str(tmp_path / "store"))
    assert r.returncode == 2 and "no artifact" in r.stderr and "profile" in r.stderr
    profile = write_profile(tmp_path, tiny_profile(name="never-built"))
    r = run_cli("verify", str(profile), "--store", str(tmp_path / "store"), "--json")
    assert r.returncode == 2 and "toolchain build" in json.loads(r.stdout)["error"]
