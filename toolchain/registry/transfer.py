"""Push a set of files as one ModelPack artifact; pull one back into a directory, verified and contained.

Pull refuses, before writing anything: a layer without `org.cncf.model.filepath`, an absolute path (`/`, `\\`,
a drive letter), a backslash, a `..`, `.` or empty component, a path given twice or both as a file and a
directory, a media type we do not unpack, DIR itself a symlink or a file, and any destination whose existing
component is a symlink (it could point outside DIR), a file where a directory is needed or a directory where a
file is. Every blob is downloaded into a staging directory inside DIR and checked against its digest; only when
all are verified are the files renamed into place (each rename atomic), so an interrupted or refused pull leaves
DIR as it was, and removes DIR again when the pull created it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..progress import Reporter
from . import modelpack as mp
from .client import RegistryClient
from .errors import IntegrityError, RegistryError
from .reference import Reference

MAX_CONFIG = 16 << 20


@dataclass
class Pushed:
    digest: str
    reference: str
    layers: list[dict[str, Any]]
    uploaded_bytes: int
    skipped_layers: int
    resumed_bytes: int

    def document(self) -> dict[str, Any]:
        return {"digest": self.digest, "reference": self.reference, "layers": self.layers,
                "uploaded_bytes": self.uploaded_bytes, "skipped_layers": self.skipped_layers,
                "resumed_bytes": self.resumed_bytes}


def push(client: RegistryClient, ref: Reference, root: Path, config_blob: bytes, layers: list[mp.Layer],
         annotations: dict[str, str], reporter: Reporter) -> Pushed:
    """Upload every layer the registry lacks, then the config, then the manifest under ref's tag."""
    total = sum(layer.size for layer in layers)
    sent = resumed = skipped = 0
    with reporter.task(f"pushing to {ref}", total=total, unit="bytes") as task:
        for layer in layers:
            stats = client.upload_blob(ref.repository, root / layer.path, layer.digest, layer.size, task.advance)
            if stats["skipped"]:
                skipped += 1
                task.advance(layer.size)
            sent += stats["sent"]
            resumed += stats["resumed_from"]
    client.upload_bytes(ref.repository, config_blob, mp.digest_of(config_blob))
    body = mp.manifest(layers, config_blob, annotations)
    digest = client.put_manifest(ref.repository, ref.tag or "latest", body)
    return Pushed(digest, f"oci://{ref.host}/{ref.repository}@{digest}",
                  [{"path": la.path, "digest": la.digest, "size": la.size, "mediaType": la.media_type}
                   for la in layers], sent, skipped, resumed)


@contextmanager
def stop_between_chunks(client: RegistryClient) -> Iterator[None]:
    """For `toolchain push`: the first Ctrl-C/SIGTERM lets the chunk in flight finish, so the upload can be
    resumed; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    client.stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: object) -> None:
        client.stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        client.stop = None


def safe_relpath(raw: Any) -> PurePosixPath:
    """A layer's path, refused unless it is a plain relative path inside the destination."""
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise IntegrityError(f"layer path {raw!r} is empty or not a string: refused")
    if raw.startswith(("/", "\\")) or "\\" in raw or (len(raw) > 1 and raw[1] == ":"):
        raise IntegrityError(f"layer path {raw!r} is absolute: refused (it would write outside DIR)")
    p = PurePosixPath(raw)
    if any(part in ("..", ".", "") for part in raw.split("/")):
        raise IntegrityError(f"layer path {raw!r} has a '..', '.' or empty component: refused")
    return p


def read_manifest(client: RegistryClient, ref: Reference) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The manifest (checked to be ModelPack), its digest, and its config document (verified)."""
    body, digest = client.get_manifest(ref.repository, ref.ref)
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        raise RegistryError(f"{ref}: the manifest is not JSON") from None
    if doc.get("artifactType") != mp.ARTIFACT_TYPE and doc.get("config", {}).get("mediaType") != mp.CONFIG_MEDIA_TYPE:
        raise RegistryError(f"{ref} is not a ModelPack model artifact (artifactType "
                            f"{doc.get('artifactType') or doc.get('mediaType')!r}); toolchain pulls only those")
    cfg_desc = doc["config"]
    if int(cfg_desc.get("size", 0)) > MAX_CONFIG:
        raise IntegrityError(f"{ref}: config blob of {cfg_desc['size']} bytes is implausibly large: refused")
    import io

    buf = io.BytesIO()
    client.download_blob(ref.repository, cfg_desc["digest"], int(cfg_desc["size"]), buf)
    return doc, digest, json.loads(buf.getvalue())


def plan_pull(doc: dict[str, Any]) -> list[tuple[PurePosixPath, dict[str, Any]]]:
    """Check every layer's path and type before any byte is written."""
    out: list[tuple[PurePosixPath, dict[str, Any]]] = []
    seen: set[PurePosixPath] = set()
    for layer in doc.get("layers") or []:
        media = layer.get("mediaType")
        if media not in mp.RAW_LAYER_TYPES:
            raise RegistryError(f"layer media type {media!r} is not supported (toolchain pulls unarchived .raw "
                                "layers, one file each)")
        path = safe_relpath((layer.get("annotations") or {}).get(mp.FILEPATH))
        if path in seen:
            raise IntegrityError(f"layer path {path} appears twice: refused")
        if not str(layer.get("digest", "")).startswith("sha256:"):
            raise IntegrityError(f"layer {path}: digest {layer.get('digest')!r} is not sha256: refused")
        seen.add(path)
        out.append((path, layer))
    for path in seen:  # a file that is also another file's directory
        if any(parent in seen for parent in path.parents):
            raise IntegrityError(f"layer path {path} lies under another layer's file: refused")
    return out


def _check_no_symlink(dest: Path, rel: PurePosixPath) -> Path:
    """The final path of rel under dest, refused when an existing component is a symlink."""
    cur = dest
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise IntegrityError(f"{cur} is a symlink: refused (a pull never writes through links)")
    return cur


def check_destination(dest: Path, entries: list[tuple[PurePosixPath, dict[str, Any]]]) -> None:
    """Everything that can be judged before a byte is written: DIR is a real directory (or can be made one),
    and no file of the artifact meets a symlink, a file where it needs a directory, or a directory where it
    needs a file."""
    if dest.is_symlink():
        raise IntegrityError(f"{dest} is a symlink: refused; give a real directory")
    existing = next((p for p in (dest, *dest.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        raise IntegrityError(f"{existing} is not a directory: refused; give a directory to pull into")
    for rel, _layer in entries:
        final = _check_no_symlink(dest, rel)
        for parent in list(PurePosixPath(rel).parents)[:-1]:
            p = dest / str(parent)
            if p.exists() and not p.is_dir():
                raise IntegrityError(f"{p} is a file where the artifact needs a directory (for {rel}): refused")
        if final.is_dir():
            raise IntegrityError(f"{final} is a directory; the artifact has a file there: refused")


def pull(client: RegistryClient, ref: Reference, dest: Path, reporter: Reporter) -> dict[str, Any]:
    doc, digest, config = read_manifest(client, ref)
    entries = plan_pull(doc)
    check_destination(dest, entries)
    # What this pull creates (DIR and missing parents) it removes again when the pull is refused or fails.
    created = next((p for p in reversed((dest, *dest.parents)) if not p.exists()), None)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toolchain-pull-", dir=dest))
    try:
        total = sum(int(la["size"]) for _p, la in entries)
        with reporter.task(f"pulling {ref}", total=total, unit="bytes") as task:
            for rel, layer in entries:
                part = staging / str(rel)
                part.parent.mkdir(parents=True, exist_ok=True)
                with open(part, "xb") as f:
                    client.download_blob(ref.repository, layer["digest"], int(layer["size"]), f, task.advance)
                    f.flush()
                    os.fsync(f.fileno())
        check_destination(dest, entries)  # again: DIR may have changed while the blobs came down
        for rel, _layer in entries:  # every blob verified: move them into place
            final = _check_no_symlink(dest, rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            _check_no_symlink(dest, rel)
            os.replace(staging / str(rel), final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return {"digest": digest, "reference": f"oci://{ref.host}/{ref.repository}@{digest}", "directory": str(dest),
            "files": [{"path": str(p), "digest": la["digest"], "size": int(la["size"])} for p, la in entries],
            "annotations": doc.get("annotations") or {}, "config": config}
