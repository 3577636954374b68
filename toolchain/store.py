"""Content-addressed artifact store.

Layout under the store root:
  objects/<k[:2]>/<key>/   one finished artifact: its files and manifest.json (written last, then renamed in)
  tmp/<key>.<rand>/        an artifact being built; renamed into objects/ only when complete
  locks/<key>.lock         one builder per key; a second build of the same key waits, then reuses
  locks/store.lock         builds hold it shared, `gc` exclusive: gc never runs beside a build
  refs/<profile>.json      what the last successful build of each profile produced (gc roots, and `plan`'s "what
                           changed"); `<profile>@synthetic-<arch>.json` for `--source synthetic` builds, so they
                           never replace the real build's roots
  refs/<profile>.pending   a build's roots, written before its first stage and renamed over <profile>.json when
                           no stage failed: a failed build never drops the last good build's roots
  cache/stat.json          stat signature -> sha256 of source files

A directory under objects/ is complete by construction: rename is atomic and happens after every file and
the manifest are fsynced. A killed build leaves only a tmp/ directory, which the next builder of that key
(holding its lock) or `gc` removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .durable import fsync_dir, write_durably
from .hashing import sha256_file

MANIFEST = "manifest.json"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _flock(path: Path, mode: int, on_wait: Any = None) -> Iterator[None]:
    """An fcntl lock on `path`: LOCK_SH for builds, LOCK_EX for gc. Released when the process dies."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only store: flock works on a read-only descriptor too
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # every build creates it: no build ever ran here, nothing to wait for
            yield
            return
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # -- paths -----------------------------------------------------------------------------------
    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.object_dir(key) / MANIFEST).is_file()

    def manifest(self, key: str) -> dict[str, Any]:
        return json.loads((self.object_dir(key) / MANIFEST).read_text())

    def find(self, prefix: str) -> str:
        """A full key from a unique prefix (as `git` does for commits)."""
        if len(prefix) >= 2:
            bucket = self.root / "objects" / prefix[:2]
            matches = [p.name for p in bucket.glob(prefix + "*")] if bucket.is_dir() else []
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise KeyError(f"key prefix {prefix!r} is ambiguous ({len(matches)} artifacts); give more characters")
        raise KeyError(f"no artifact with key {prefix!r} in {self.root}")

    # -- building ---------------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, on_wait: Any = None) -> Iterator[None]:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / "locks" / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def building(self, on_wait: Any = None) -> Any:
        """Held (shared) for a whole build: `gc` waits for every running build to finish."""
        import fcntl

        return _flock(self.root / "locks" / "store.lock", fcntl.LOCK_SH, on_wait)

    def collecting(self, on_wait: Any = None) -> Any:
        """Held (exclusive) by `gc`: no build starts or runs meanwhile."""
        import fcntl

        return _flock(self.root / "locks" / "store.lock", fcntl.LOCK_EX, on_wait)

    def new_tmp(self, key: str) -> Path:
        """A fresh build directory for `key`; call with the key's lock held. Clears leftovers of killed builds."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob(f"{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{key}.", dir=tmp_root))

    def commit(self, tmp: Path, key: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Hash the files, write the manifest, fsync, and rename tmp into place (atomic)."""
        files = []
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files.append({"path": p.relative_to(tmp).as_posix(), "size": p.stat().st_size,
                              "sha256": sha256_file(p)})
        manifest = {**manifest, "key": key, "files": files, "size": sum(f["size"] for f in files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        final = self.object_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return manifest

    # -- refs (gc roots and plan history) ---------------------------------------------------------
    def ref_path(self, name: str) -> Path:
        return self.root / "refs" / f"{name}.json"

    def read_ref(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.ref_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def pending_ref_path(self, name: str) -> Path:
        return self.root / "refs" / f"{name}.pending"  # not *.json: never read as a last build

    def begin_ref(self, name: str, record: dict[str, Any]) -> bool:
        """A build's roots, recorded before its first stage beside (not over) the last good build's: both stay
        gc roots until `finish_ref`. False (nothing written) when the record is the last build's already."""
        pending = self.pending_ref_path(name)
        if self.read_ref(name) == record:
            if pending.exists():  # left by a failed build: its partial artifacts are no root any more
                with contextlib.suppress(OSError):  # a read-only store: a cached build still runs
                    pending.unlink()
            return False
        write_durably(pending, json.dumps(record, indent=2, sort_keys=True))
        return True

    def finish_ref(self, name: str, record: dict[str, Any]) -> None:
        """The build succeeded: its record becomes the profile's last build (written atomically), and its pending
        roots go, unless a concurrent build of this profile has replaced them with its own meanwhile."""
        self.write_ref(name, record)
        pending = self.pending_ref_path(name)
        try:
            if json.loads(pending.read_text()) == record:
                pending.unlink()
        except (FileNotFoundError, json.JSONDecodeError):  # a concurrent build of the same record removed it
            pass

    def write_ref(self, name: str, record: dict[str, Any]) -> bool:
        """Record a profile's stages; writes nothing when the record is unchanged (a no-op build stays a no-op)."""
        if self.read_ref(name) == record:
            return False
        write_durably(self.ref_path(name), json.dumps(record, indent=2, sort_keys=True))
        return True

    # -- listing and garbage collection -----------------------------------------------------------
    def keys(self) -> list[str]:
        objects = self.root / "objects"
        if not objects.is_dir():
            return []
        # `.gc-*` are artifacts a gc renamed away to delete (a killed gc can leave one): not artifacts
        return sorted(p.name for p in objects.glob("*/*") if not p.name.startswith(".") and (p / MANIFEST).is_file())

    def ls(self) -> list[dict[str, Any]]:
        return [self.manifest(k) for k in self.keys()]

    def roots(self) -> set[str]:
        keys: set[str] = set()
        refs = self.root / "refs"
        for ref in [*refs.glob("*.json"), *refs.glob("*.pending")] if refs.is_dir() else []:
            try:
                keys.update(s["key"] for s in json.loads(ref.read_text()).get("stages", []))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return keys

    def reachable(self) -> set[str]:
        seen: set[str] = set()
        todo = [k for k in self.roots() if self.has(k)]
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            todo.extend(k for k in self.manifest(key).get("inputs", {}).values() if self.has(k))
        return seen

    def gc(self, dry_run: bool = False, on_wait: Any = None) -> list[dict[str, Any]]:
        """Remove artifacts no profile ref reaches, build directories no live builder holds, and what a killed
        gc left half-deleted. Waits for running builds (their roots are recorded before their first stage)."""
        with self.collecting(on_wait):
            return self._gc(dry_run)

    def _gc(self, dry_run: bool) -> list[dict[str, Any]]:
        keep = self.reachable()
        removed = []
        objects = self.root / "objects"
        for doomed in objects.glob("*/.gc-*") if objects.is_dir() else []:
            key = doomed.name.split("-")[1] if doomed.name.count("-") >= 2 else doomed.name
            removed.append({"key": key, "stage": "(left by a killed gc)", "size": dir_size(doomed),
                            "path": str(doomed)})
            if not dry_run:
                shutil.rmtree(doomed, ignore_errors=True)
        for key in self.keys():
            if key in keep:
                continue
            path = self.object_dir(key)
            m = self.manifest(key)
            removed.append({"key": key, "stage": m.get("stage"), "size": m.get("size", 0), "path": str(path)})
            if not dry_run:
                # Rename first so a half-deleted directory never looks like a complete artifact.
                doomed = path.with_name(f".gc-{key}-{time.time_ns()}")
                os.rename(path, doomed)
                shutil.rmtree(doomed)
        tmp_root = self.root / "tmp"
        for tmp in tmp_root.glob("*") if tmp_root.is_dir() else []:
            key = tmp.name.split(".")[0]
            lock = FileLock(str(self.root / "locks" / f"{key}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a build is writing it right now
            try:
                removed.append({"key": key, "stage": "(unfinished build)", "size": dir_size(tmp), "path": str(tmp)})
                if not dry_run:
                    shutil.rmtree(tmp, ignore_errors=True)
            finally:
                lock.release()
        return removed
