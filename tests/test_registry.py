"""Push and pull against a real OCI registry (distribution 2.8 on 127.0.0.1, tests/oci_registry.py): ModelPack
layout, reproducible digests, verified and contained pulls, resumed uploads, auth errors without secrets, the
publish stage and the remote cache. Real subprocesses, as a user or CI runs them."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, needs_smollm2, run_cli, tiny_profile, write_profile
from oci_registry import make_artifact, start_registry

from toolchain.registry import modelpack as mp
from toolchain.store import Store


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory.mktemp("auth-registry"), htpasswd=("alice", "correct-Horse-7"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The tiny synthetic profile, built once for the module: (profile path, store, build document)."""
    d = tmp_path_factory.mktemp("tiny")
    profile = write_profile(d, tiny_profile())
    r = run_cli("build", str(profile), "--store", str(d / "store"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    return profile, d / "store", json.loads(r.stdout)


def manifest_of(reg, repo: str, ref: str) -> tuple[dict, bytes]:
    r = httpx.get(f"http://{reg.host}/v2/{repo}/manifests/{ref}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 200, r.text
    return r.json(), r.content


def blob(reg, repo: str, digest: str) -> bytes:
    r = httpx.get(f"http://{reg.host}/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    return r.content


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- push and pull --------------------------------------------------------------------------------------

def test_push_is_modelpack_reproducible_and_pulls_back_byte_for_byte(registry, tiny_build, tmp_path):
    profile, store, doc = tiny_build
    ref = registry.url("x/tiny", "int4")
    first = run_cli("push", str(profile), "--store", str(store), "--to", ref, "--insecure", "--json", "-q")
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    again = json.loads(run_cli("push", str(profile), "--store", str(store), "--to", ref, "--insecure",
                               "--json", "-q").stdout)
    assert again["digest"] == pushed["digest"]
    assert again["uploaded_bytes"] == 0 and again["skipped_layers"] == len(pushed["layers"])  # HEAD skipped all

    manifest, raw = manifest_of(registry, "x/tiny", "int4")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed["digest"]
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    export = next(s for s in doc["stages"] if s["name"] == "export:compressed-tensors")
    files = {f["path"]: f for f in Store(store).manifest(export["key"])["files"]}
    layers = {la["annotations"]["org.cncf.model.filepath"]: la for la in manifest["layers"]}
    assert set(layers) == set(files)
    assert layers["model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layers["config.json"]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"
    for path, la in layers.items():
        assert la["digest"] == "sha256:" + files[path]["sha256"] and la["size"] == files[path]["size"]
    config = json.loads(blob(registry, "x/tiny", manifest["config"]["digest"]))
    assert set(config) == {"descriptor", "config", "modelfs"}
    assert config["modelfs"] == {"type": "layers", "diffIds": [la["digest"] for la in manifest["layers"]]}
    assert config["config"] == {"architecture": "transformer", "format": "safetensors", "paramSize": "557.1K",
                                "precision": "int4", "quantization": "rtn"}
    assert "createdAt" not in config["descriptor"] and config["descriptor"]["name"] == "tiny"
    notes = manifest["annotations"]
    assert notes["dev.toolchain.profile"] == "tiny"
    assert json.loads(notes["dev.toolchain.stage-keys"])["export:compressed-tensors"] == export["key"]
    assert json.loads(notes["dev.toolchain.validation"])["passed"] is True
    assert notes["dev.toolchain.source-digest"] and notes["dev.toolchain.version"]
    assert not any(k.endswith("created") for k in notes), "no wall-clock time in a reproducible manifest"

    out = tmp_path / "pulled"
    r = run_cli("pull", pushed["reference"], str(out), "--insecure", "--json", "-q")  # by digest
    assert r.returncode == 0, r.stderr
    got = {p.relative_to(out).as_posix(): sha(p) for p in out.rglob("*") if p.is_file()}
    assert got == {p: f["sha256"] for p, f in files.items()}


def test_push_refuses_unbuilt_profile_and_plain_http_without_insecure(registry, tmp_path):
    profile = write_profile(tmp_path, tiny_profile(name="never-built"))
    r = run_cli("push", str(profile), "--store", str(tmp_path / "empty"), "--to", registry.url("x/n", "t"),
                "--insecure")
    assert r.returncode == 2 and "not built" in r.stderr and "toolchain build" in r.stderr
    key = make_artifact(tmp_path / "s", "c", {"config.json": b"{}"})
    r = run_cli("push", key, "--store", str(tmp_path / "s"), "--to", registry.url("x/n", "t"))
    assert r.returncode == 1 and "TLS" in r.stderr and "--insecure" in r.stderr


def _push_and_signal(registry, tmp_path, sig: int, data: bytes, tag: str):
    """Start a push of `data` in 2 MiB chunks, send `sig` once 8 MiB are on the registry, then push again."""
    key = make_artifact(tmp_path / "store", "e", {"model.safetensors": data, "config.json": b"{}"})
    state = tmp_path / "upload-state"
    env = {"TOOLCHAIN_UPLOAD_STATE": str(state), "TOOLCHAIN_REGISTRY_CHUNK_MB": "2"}
    ref = registry.url("x/resume", tag)
    args = [sys.executable, "-m", "toolchain", "push", key, "--store", str(tmp_path / "store"), "--to", ref,
            "--insecure", "-q"]
    proc = subprocess.Popen(args, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
                            text=True)
    offset = 0
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        for f in state.glob("*.json") if state.is_dir() else []:
            try:
                offset = json.loads(f.read_text())["offset"]
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                continue
        if offset >= 8 << 20:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    _out, err = proc.communicate(timeout=60)
    assert offset >= 8 << 20, "the push finished before it could be stopped; grow the file"
    r = run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure", "--json", "-q", env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert run_cli("pull", ref, str(out), "--insecure", "-q").returncode == 0
    assert (out / "model.safetensors").read_bytes() == data
    assert not list(state.glob("*.json")), "a finished upload leaves no resume state"
    return proc.returncode, err, json.loads(r.stdout)


def test_resume_after_interrupted_upload(registry, tmp_path):
    """SIGTERM (CI cancelling a job, `kill`) lets the chunk in flight finish; the next push sends only the rest."""
    size = 96 << 20
    code, err, doc = _push_and_signal(registry, tmp_path, signal.SIGTERM, os.urandom(size), "term")
    assert code == 130 and "interrupted" in err and "resume" in err, err
    assert doc["resumed_bytes"] >= 8 << 20, doc
    assert doc["uploaded_bytes"] == size - doc["resumed_bytes"]


def test_push_after_killed_upload_completes_verified(registry, tmp_path):
    """SIGKILL can cut a chunk in half; distribution 2.8 then refuses that upload, and the next push starts the
    blob over (or resumes, if the kill fell between chunks): either way the pulled bytes are the pushed ones."""
    code, _err, doc = _push_and_signal(registry, tmp_path, signal.SIGKILL, os.urandom(64 << 20), "kill")
    assert code == -signal.SIGKILL
    assert doc["uploaded_bytes"] + doc["resumed_bytes"] == 64 << 20


def test_push_rides_out_a_registry_restart(tmp_path):
    """Connection errors are retried with backoff: the registry goes down mid-upload and comes back, and the
    same push finishes (resuming, or restarting a blob whose chunk was cut) with the right bytes."""
    reg = start_registry(tmp_path / "reg")
    try:
        data = os.urandom(96 << 20)
        key = make_artifact(tmp_path / "store", "b", {"model.safetensors": data})
        state = tmp_path / "state"
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOOLCHAIN_UPLOAD_STATE": str(state),
               "TOOLCHAIN_REGISTRY_CHUNK_MB": "2", "TOOLCHAIN_REGISTRY_RETRIES": "8"}
        ref = reg.url("x/restart", "v1")
        proc = subprocess.Popen([sys.executable, "-m", "toolchain", "push", key, "--store", str(tmp_path / "store"),
                                 "--to", ref, "--insecure", "--json", "-q"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        offset = 0
        while time.time() < deadline and proc.poll() is None and offset < 8 << 20:
            for f in state.glob("*.json") if state.is_dir() else []:
                try:
                    offset = json.loads(f.read_text())["offset"]
                except (json.JSONDecodeError, KeyError, FileNotFoundError):
                    continue
            time.sleep(0.002)
        assert offset >= 8 << 20 and proc.poll() is None, "the push finished before the registry could go down"
        reg.stop()
        time.sleep(1.0)
        reg.restart()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out)["digest"]
        pulled = tmp_path / "out"
        assert run_cli("pull", ref, str(pulled), "--insecure", "-q").returncode == 0
        assert (pulled / "model.safetensors").read_bytes() == data
    finally:
        reg.stop()


def test_tampered_blob_is_refused_and_nothing_written(registry, tmp_path):
    key = make_artifact(tmp_path / "store", "d", {"model.safetensors": os.urandom(4096), "config.json": b"{\"a\":1}"})
    ref = registry.url("x/tamper", "v1")
    pushed = json.loads(run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure",
                                "--json", "-q").stdout)
    weights = next(la for la in pushed["layers"] if la["path"] == "model.safetensors")
    path = registry.blob_path(weights["digest"])
    original = path.read_bytes()
    path.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # same size, one bit pattern changed
    try:
        out = tmp_path / "out"
        r = run_cli("pull", ref, str(out), "--insecure")
        assert r.returncode == 1 and "refused" in r.stderr and weights["digest"] in r.stderr
        assert not out.exists(), "a refused pull writes nothing, not even DIR"
    finally:
        path.write_bytes(original)


def _push_raw_manifest(reg, repo: str, tag: str, layers: list[tuple[str, bytes]]) -> None:
    """A hand-made ModelPack manifest (a hostile publisher), pushed with plain HTTP calls."""
    def put_blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        loc = httpx.post(f"http://{reg.host}/v2/{repo}/blobs/uploads/").headers["location"]
        url = httpx.URL(f"http://{reg.host}").join(loc)
        r = httpx.put(url, params={**dict(url.params), "digest": digest}, content=data)
        assert r.status_code == 201, r.text
        return digest

    descs = [{"mediaType": mp.WEIGHT, "digest": put_blob(data), "size": len(data),
              "annotations": {mp.FILEPATH: path}} for path, data in layers]
    config = mp.canonical({"descriptor": {"name": "evil"}, "config": {},
                           "modelfs": {"type": "layers", "diffIds": [d["digest"] for d in descs]}})
    body = mp.canonical({"schemaVersion": 2, "mediaType": mp.OCI_MANIFEST, "artifactType": mp.ARTIFACT_TYPE,
                         "config": {"mediaType": mp.CONFIG_MEDIA_TYPE, "digest": put_blob(config),
                                    "size": len(config)}, "layers": descs})
    r = httpx.put(f"http://{reg.host}/v2/{repo}/manifests/{tag}", content=body,
                  headers={"Content-Type": mp.OCI_MANIFEST})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("evil", ["../escaped.bin", "/tmp/absolute.bin", "a/../../up.bin", "link/inside.bin"])
def test_path_escape_manifest_is_refused(registry, tmp_path, evil):
    tag = hashlib.sha256(evil.encode()).hexdigest()[:12]
    _push_raw_manifest(registry, "x/evil", tag, [("ok.bin", b"fine"), (evil, b"payload")])
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    if evil.startswith("link/"):
        out.mkdir()
        (out / "link").symlink_to(outside)
    r = run_cli("pull", registry.url("x/evil", tag), str(out), "--insecure")
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr
    assert not list(outside.iterdir()) and not (tmp_path / "escaped.bin").exists()
    assert not Path("/tmp/absolute.bin").exists()
    assert not (out / "ok.bin").exists(), "nothing is written when any path is refused"


# -- auth -----------------------------------------------------------------------------------------------

def test_wrong_password_is_a_clear_error_without_the_secret(auth_registry, tmp_path):
    key = make_artifact(tmp_path / "store", "f", {"config.json": b"{\"b\":2}"})
    ref = auth_registry.url("team/m", "v1")
    secret = "Wrong-Secret-4711"
    env = {"TOOLCHAIN_REGISTRY_USERNAME": "alice", "TOOLCHAIN_REGISTRY_PASSWORD": secret}
    for extra in ([], ["--json"]):
        r = run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure", *extra, env=env)
        assert r.returncode == 1
        text = r.stdout + r.stderr
        assert "authentication failed" in text and "TOOLCHAIN_REGISTRY_PASSWORD" in text and "docker login" in text
        assert secret not in text and base64.b64encode(f"alice:{secret}".encode()).decode() not in text
    none = run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure",
                   env={"DOCKER_CONFIG": str(tmp_path / "no-docker")})
    assert none.returncode == 1 and "no credentials" in none.stderr


def test_credentials_from_env_and_docker_config(auth_registry, tmp_path):
    key = make_artifact(tmp_path / "store", "0", {"config.json": b"{\"c\":3}"})
    ref = auth_registry.url("team/m", "v2")
    env = {"TOOLCHAIN_REGISTRY_USERNAME": "alice", "TOOLCHAIN_REGISTRY_PASSWORD": auth_registry.password}
    r = run_cli("push", key, "--store", str(tmp_path / "store"), "--to", ref, "--insecure", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert auth_registry.password not in r.stdout + r.stderr
    docker = tmp_path / "docker"
    docker.mkdir()
    token = base64.b64encode(f"alice:{auth_registry.password}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    out = tmp_path / "out"
    r = run_cli("pull", ref, str(out), "--insecure", "--json", env={"DOCKER_CONFIG": str(docker)})
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").read_bytes() == b"{\"c\":3}"
    assert auth_registry.password not in r.stdout + r.stderr and token not in r.stdout + r.stderr


# -- publish and the remote cache ---------------------------------------------------------------------

def test_build_publishes_after_gates_and_caches_the_publish(registry, tiny_build, tmp_path):
    """build pushes each target after its validation; this store built the profile from scratch, so the digest
    matching the module store's push also shows that another clone gives the same manifest digest."""
    dest = registry.url("x/published", "tiny-{target}")
    profile = write_profile(tmp_path, tiny_profile(publish=[{"to": dest, "insecure": True}]))
    r = run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    names = [s["name"] for s in doc["stages"]]
    assert names[-1] == "publish:compressed-tensors" and names.index("validate:compressed-tensors") < len(names) - 1
    published = doc["targets"][0]["published"]
    manifest, raw = manifest_of(registry, "x/published", "tiny-compressed-tensors")
    assert published[0]["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    module_profile, module_store, _ = tiny_build
    other = json.loads(run_cli("push", str(module_profile), "--store", str(module_store), "--to",
                               registry.url("x/clone", "a"), "--insecure", "--json", "-q").stdout)
    assert other["digest"] == published[0]["digest"]
    again = json.loads(run_cli("build", str(profile), "--store", str(tmp_path / "store"), "--json", "-q").stdout)
    assert {s["status"] for s in again["stages"]} == {"cached"}
    bad = write_profile(tmp_path, tiny_profile(publish=[{"to": "docker://nope"}]), name="bad.yaml")
    r = run_cli("build", str(bad), "--store", str(tmp_path / "store"))
    assert r.returncode == 2 and "publish.0.to" in r.stderr and "oci://" in r.stderr


def test_remote_cache_second_clone_builds_nothing(registry, tmp_path):
    cache = registry.url("x/cache")
    profile = write_profile(tmp_path, tiny_profile(name="tiny-cached"))
    first = run_cli("build", str(profile), "--store", str(tmp_path / "a"), "--cache", cache, "--insecure", "--json")
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert {s["status"] for s in a["stages"]} == {"built"}
    assert a["cache"]["pushed"] == len(a["stages"]) and a["cache"]["errors"] == []
    second = run_cli("build", str(profile), "--store", str(tmp_path / "b"), "--cache", cache, "--insecure", "--json")
    assert second.returncode == 0, second.stderr
    b = json.loads(second.stdout)
    assert [s["status"] for s in b["stages"]] == ["cached"] * len(a["stages"]), b["stages"]
    assert all("remote cache" in s["reason"] for s in b["stages"])
    assert b["cache"]["hits"] == len(a["stages"])
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sa["key"] == sb["key"]
        fa, fb = (Store(tmp_path / d).manifest(sa["key"]) for d in ("a", "b"))
        assert fa == fb  # the record itself travels: same files, same hashes, same status


def test_remote_cache_keeps_a_failed_gate_failed(registry, tiny_build, tmp_path):
    """A failed validation in the cache is pulled as failed: the build fails and nothing is published."""
    profile = write_profile(tmp_path, tiny_profile(name="tiny-failing", publish=[
        {"to": registry.url("x/never", "v1"), "insecure": True}]))
    seed = tmp_path / "seed"
    shutil.copytree(tiny_build[1], seed)  # the same stage keys: the profile name is not part of them
    # Mark the validation failed in the seed store (as a gate failure records it), then push that store's
    # stages to a fresh cache repository.
    s = Store(seed)
    vkey = next(k for k in s.keys() if s.manifest(k)["stage"].startswith("validate:"))
    record = s.manifest(vkey)
    record.update(status="failed", reason="gate failed: ppl_increase_pct 99 > 1")
    (s.object_dir(vkey) / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    from toolchain.registry.cache import RemoteCache

    cache = RemoteCache(registry.url("x/cache-failed"), insecure=True)
    for k in s.keys():
        if not s.manifest(k)["stage"].startswith("publish:"):
            cache.push(k, s)
    cache.close()
    assert cache.errors == []
    r = run_cli("build", str(profile), "--store", str(tmp_path / "clone"), "--cache", registry.url("x/cache-failed"),
                "--insecure", "--json", "-q")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    status = {s["name"]: s for s in doc["stages"]}
    assert status["validate:compressed-tensors"]["status"] == "failed"
    assert "gate failed" in status["validate:compressed-tensors"]["reason"]
    assert status["publish:compressed-tensors"]["status"] == "skipped"
    assert httpx.head(f"http://{registry.host}/v2/x/never/manifests/v1").status_code == 404
    r = run_cli("push", str(profile), "--store", str(tmp_path / "clone"), "--to", registry.url("x/never", "v1"),
                "--insecure")
    assert r.returncode == 1 and "failed its gate" in r.stderr
    assert httpx.head(f"http://{registry.host}/v2/x/never/manifests/v1").status_code == 404


def test_stages_built_before_the_cache_was_configured_are_shared(registry, tiny_build, tmp_path):
    profile, store, doc = tiny_build
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    r = run_cli("build", str(profile), "--store", str(copy), "--cache", registry.url("x/cache-late"), "--insecure",
                "--json", "-q")
    assert r.returncode == 0, r.stderr
    late = json.loads(r.stdout)
    assert {s["status"] for s in late["stages"]} == {"cached"}
    assert late["cache"]["pushed"] == len(doc["stages"]) and late["cache"]["hits"] == 0
    again = json.loads(run_cli("build", str(profile), "--store", str(copy), "--cache", registry.url("x/cache-late"),
                               "--insecure", "--json", "-q").stdout)
    assert again["cache"]["pushed"] == 0  # already there: one HEAD per stage, nothing sent


@pytest.mark.slow
@needs_smollm2
def test_demo_profile_push_twice_same_digest_and_pull_byte_for_byte(registry, tmp_path):
    """The acceptance command on the real demo profile (SmolLM2-135M INT4, built and validated: minutes)."""
    store = tmp_path / "store"
    profile = REPO / "profiles" / "smollm2-int4.yaml"
    built = run_cli("build", str(profile), "--store", str(store), "--json", "-q", timeout=3600)
    assert built.returncode == 0, built.stderr
    ref = registry.url("x/smollm2", "int4")
    digests = []
    for _ in range(2):
        r = run_cli("push", str(profile), "--to", ref, "--insecure", "--json", "--store", str(store))
        assert r.returncode == 0, r.stderr
        digests.append(json.loads(r.stdout)["digest"])
    assert digests[0] == digests[1]
    export = next(s for s in json.loads(built.stdout)["stages"] if s["name"].startswith("export:"))
    files = Store(store).manifest(export["key"])["files"]
    out = tmp_path / "pulled"
    assert run_cli("pull", ref, str(out), "--insecure", "-q").returncode == 0
    for f in files:
        assert sha(out / f["path"]) == f["sha256"], f["path"]
    manifest, _ = manifest_of(registry, "x/smollm2", "int4")
    validation = json.loads(manifest["annotations"]["dev.toolchain.validation"])
    assert validation["passed"] is True and validation["validation"]["ppl"] > 0
