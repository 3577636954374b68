"""The registry as a remote stage cache (Bazel's remote cache, with OCI as the wire): `build --cache oci://H/R`.

A stage key addresses its artifact anywhere: the entry for key K is the tag `stage-K` of the cache repository,
a ModelPack manifest whose layers are the artifact's files plus its store record (`manifest.json`, media type
application/vnd.toolchain.stage.manifest.v1+json). Before building a stage the executor asks here; a hit is
pulled, every blob verified against its digest, the record checked against the key and the files it lists,
and committed to the local store exactly as the builder's machine had it: a failed gate stays failed. What is
built is pushed. A cache that cannot be reached slows the build down, never stops it: each error is reported
and kept in `errors` (the build's --json shows them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..durable import fsync_dir
from ..progress import Reporter
from ..store import MANIFEST, Store, _fsync_tree
from . import auth, transfer
from . import modelpack as mp
from .client import RegistryClient
from .errors import IntegrityError, RegistryError
from .reference import Reference, parse_reference


def cache_tag(key: str) -> str:
    return f"stage-{key}"


class RemoteCache:
    def __init__(self, location: str, insecure: bool = False, reporter: Reporter | None = None):
        self.ref = parse_reference(location, allow_tag=False)
        self.insecure = insecure
        self.reporter = reporter or Reporter(quiet=True)
        self.hits: list[str] = []
        self.pushed: list[str] = []
        self.errors: list[str] = []
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(self.ref.host, auth.lookup(self.ref.host), insecure=self.insecure)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _entry(self, key: str) -> Reference:
        return self.ref.with_tag(cache_tag(key))

    def _error(self, what: str, e: Exception) -> None:
        msg = f"remote cache {self.ref}: {what}: {e}"
        self.errors.append(msg)
        self.reporter.warn(msg)

    # -- lookup and fetch ----------------------------------------------------------------------------
    def fetch(self, key: str, store: Store, tmp: Path) -> bool:
        """Pull the artifact of `key` into tmp and commit it to the store; False on a miss or any error (then tmp
        is left empty for the builder). Call with the key's lock held."""
        entry = self._entry(key)
        try:
            if self.client.manifest_digest(entry.repository, entry.tag) is None:
                return False
            transfer.pull(self.client, entry, tmp, self.reporter)
            self._check(tmp, key)
        except (RegistryError, IntegrityError, OSError, ValueError, KeyError) as e:
            self._error(f"fetch of {key[:12]} failed, building it instead", e)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            return False
        _fsync_tree(tmp)
        final = store.object_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        self.hits.append(key)
        return True

    @staticmethod
    def _check(tmp: Path, key: str) -> None:
        """The record belongs to this key and lists exactly the files that arrived (each already digest-checked)."""
        record = json.loads((tmp / MANIFEST).read_text())
        if record.get("key") != key:
            raise IntegrityError(f"entry for {key[:12]} carries the record of {str(record.get('key'))[:12]}")
        listed = {f["path"]: f for f in record.get("files", [])}
        arrived = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()} - {MANIFEST}
        if set(listed) != arrived:
            raise IntegrityError(f"entry for {key[:12]}: files differ from its record")
        for path, f in listed.items():
            if (tmp / path).stat().st_size != f["size"]:
                raise IntegrityError(f"entry for {key[:12]}: {path} has the wrong size")

    # -- push ----------------------------------------------------------------------------------------
    def push(self, key: str, store: Store) -> None:
        entry = self._entry(key)
        try:
            if self.client.manifest_digest(entry.repository, entry.tag) is not None:
                return  # another runner stored it first; the same key means the same artifact
            root = store.object_dir(key)
            record = store.manifest(key)
            raw = (root / MANIFEST).read_bytes()
            files = [*record["files"], {"path": MANIFEST, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                                        "media_type": mp.STAGE_RECORD}]
            layers = mp.layers_of(files)
            config_blob = mp.model_config(layers, {"name": record["stage"]}, {})
            annotations = mp.annotate({"stage": record["stage"], "key": key, "status": record.get("status", "ok")})
            transfer.push(self.client, entry, root, config_blob, layers, annotations, self.reporter)
        except (RegistryError, OSError) as e:
            self._error(f"push of {key[:12]} failed (the build goes on)", e)
            return
        self.pushed.append(key)

    def summary(self) -> dict[str, Any]:
        return {"location": str(self.ref), "hits": len(self.hits), "pushed": len(self.pushed), "errors": self.errors}
