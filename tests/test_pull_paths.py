"""`pull` writes only plain files inside DIR, and a refused pull leaves no DIR behind (issue 22 item 3).

The registry side is a fake client serving a hand-made (hostile) ModelPack manifest, so every case runs in
milliseconds; tests/test_registry.py covers the same pull against a real registry."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from toolchain.progress import Reporter
from toolchain.registry import modelpack as mp
from toolchain.registry import transfer
from toolchain.registry.errors import IntegrityError
from toolchain.registry.reference import parse_reference

REF = parse_reference("oci://reg.example/x/evil:v1")


class FakeClient:
    """get_manifest / download_blob over in-memory blobs; `corrupt` serves wrong bytes for that digest."""

    def __init__(self, layers: list[tuple[str, bytes]], corrupt: str | None = None):
        self.blobs: dict[str, bytes] = {}
        descs = [{"mediaType": mp.WEIGHT, "digest": self._put(data), "size": len(data),
                  "annotations": {mp.FILEPATH: path}} for path, data in layers]
        config = mp.canonical({"descriptor": {"name": "evil"}, "config": {},
                               "modelfs": {"type": "layers", "diffIds": [d["digest"] for d in descs]}})
        self.manifest = mp.canonical({"schemaVersion": 2, "mediaType": mp.OCI_MANIFEST,
                                      "artifactType": mp.ARTIFACT_TYPE,
                                      "config": {"mediaType": mp.CONFIG_MEDIA_TYPE, "digest": self._put(config),
                                                 "size": len(config)}, "layers": descs})
        self.corrupt = corrupt

    def _put(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        return self.manifest, "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def download_blob(self, repo: str, digest: str, size: int, out: io.IOBase, on_bytes=None) -> None:
        data = self.blobs[digest]
        if self.corrupt and self.blobs.get(self.corrupt) == data:
            raise IntegrityError(f"blob {digest} arrived as something else: refused")
        out.write(data)


def pull(layers: list[tuple[str, bytes]], dest: Path, corrupt: str | None = None) -> dict:
    return transfer.pull(FakeClient(layers, corrupt), REF, dest, Reporter(quiet=True))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("evil", [
    "a\\..\\..\\up.bin", "sub\\x.bin",        # backslashes (a separator on Windows)
    "C:/x.bin", "C:x.bin", "c:\\x.bin",       # drive letters
    "./ok2.bin", "a/./b.bin", "a/.", ".",     # '.' components
    "a//b.bin", "a/", "",                     # empty components and an empty path
    "/abs.bin", "../up.bin", "a/../../up.bin",
])
def test_bad_layer_paths_are_refused_and_leave_no_dir(tmp_path: Path, evil: str) -> None:
    dest = tmp_path / "new" / "out"
    with pytest.raises(IntegrityError, match="refused"):
        pull([("ok.bin", b"fine"), (evil, b"payload")], dest)
    assert not (tmp_path / "new").exists(), "a refused pull leaves no DIR (nor a parent it would create)"
    assert tree(tmp_path) == []


@pytest.mark.parametrize("layers,why", [
    ([("ok.bin", b"1"), ("ok.bin", b"2")], "twice"),
    ([("a/b.bin", b"1"), ("a/b.bin", b"1")], "twice"),
    ([("a", b"file"), ("a/b.bin", b"under it")], "under another layer's file"),
])
def test_duplicate_and_file_as_directory_in_the_artifact(tmp_path: Path, layers, why: str) -> None:
    dest = tmp_path / "out"
    with pytest.raises(IntegrityError, match=why):
        pull(layers, dest)
    assert not dest.exists()


def test_a_file_in_dir_where_the_artifact_needs_a_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "sub").write_bytes(b"mine")
    with pytest.raises(IntegrityError, match="file where the artifact needs a directory"):
        pull([("ok.bin", b"fine"), ("sub/x.bin", b"payload")], dest)
    assert tree(dest) == ["sub"] and (dest / "sub").read_bytes() == b"mine"


def test_a_directory_in_dir_where_the_artifact_has_a_file_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "b.bin").mkdir(parents=True)
    with pytest.raises(IntegrityError, match="is a directory"):
        pull([("a.bin", b"first"), ("b.bin", b"second")], dest)
    assert tree(dest) == ["b.bin"], "refused before any file is moved into place"


def test_dir_itself_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(IntegrityError, match="symlink"):
        pull([("ok.bin", b"fine")], link)
    assert tree(real) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(IntegrityError, match="symlink"):
        pull([("ok.bin", b"fine")], dangling)
    assert not (tmp_path / "nowhere").exists()
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    for dest in (afile, afile / "below"):
        with pytest.raises(IntegrityError, match="not a directory"):
            pull([("ok.bin", b"fine")], dest)
    assert afile.read_bytes() == b"x"


def test_a_symlink_inside_dir_is_not_written_through(tmp_path: Path) -> None:
    dest, outside = tmp_path / "out", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "link").symlink_to(outside)
    (dest / "f.bin").symlink_to(outside / "target.bin")
    for path in ("link/x.bin", "f.bin"):
        with pytest.raises(IntegrityError, match="symlink"):
            pull([(path, b"payload")], dest)
    assert tree(outside) == []


def test_a_bad_blob_leaves_no_dir_and_an_existing_dir_as_it_was(tmp_path: Path) -> None:
    bad = "sha256:" + hashlib.sha256(b"second").hexdigest()
    dest = tmp_path / "new" / "out"
    with pytest.raises(IntegrityError):
        pull([("a.bin", b"first"), ("b.bin", b"second")], dest, corrupt=bad)
    assert not (tmp_path / "new").exists(), "DIR and the parents this pull created are removed"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_bytes(b"keep")
    with pytest.raises(IntegrityError):
        pull([("a.bin", b"first"), ("b.bin", b"second")], dest, corrupt=bad)
    assert tree(dest) == ["keep.txt"]


def test_a_good_pull_still_works_and_overwrites_an_older_file(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.bin").write_bytes(b"old")
    doc = pull([("a.bin", b"new"), ("d/e/b.bin", b"deep")], dest)
    assert (dest / "a.bin").read_bytes() == b"new" and (dest / "d/e/b.bin").read_bytes() == b"deep"
    assert tree(dest) == ["a.bin", "d", "d/e", "d/e/b.bin"] and len(doc["files"]) == 2
    assert not [p for p in os.listdir(dest) if p.startswith(".toolchain-pull-")]
