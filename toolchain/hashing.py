"""Content hashes: canonical JSON for keys, and file hashes with a stat cache so big checkpoints are read once.

The stat cache maps (path, size, mtime_ns, ctime_ns, inode, device) -> sha256. A file whose stat is unchanged
is not re-read; any change of those re-hashes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CHUNK = 8 << 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def key_of(material: Any) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class StatCache:
    """A JSON file of stat signatures -> sha256. Saved only when something new was hashed."""

    def __init__(self, path: Path):
        self.path = path
        self._dirty = False
        try:
            self._entries: dict[str, dict] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self._entries = {}

    @staticmethod
    def _signature(st: os.stat_result) -> list[int]:
        # ctime cannot be set by a user (cp -p and touch -r restore mtime, not ctime), and a reused inode
        # number on another device is another file: both are part of the identity.
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def lookup(self, path: Path) -> str | None:
        entry = self._entries.get(str(path.resolve()))
        if entry and entry["stat"] == self._signature(path.stat()):
            return entry["sha256"]
        return None

    def hash(self, path: Path, progress: Callable[[int], None] | None = None) -> str:
        cached = self.lookup(path)
        if cached:
            return cached
        st = path.stat()
        digest = sha256_file(path, progress)
        self._entries[str(path.resolve())] = {"stat": self._signature(st), "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        from .durable import write_durably

        try:
            write_durably(self.path, json.dumps(self._entries, indent=0, sort_keys=True))
        except PermissionError:  # a read-only store: a cache, so the next run hashes again
            return
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            return
        self._dirty = False


def files_of(path: Path) -> list[Path]:
    """The files that make up a source: the file itself, or every regular file under a directory, sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def tree_digest(root: Path, cache: StatCache, on_bytes: Callable[[int], None] | None = None,
                files: Iterable[Path] | None = None) -> str:
    """sha256 over (relative path, file sha256) of every file: the content identity of a checkpoint."""
    entries = []
    for f in files if files is not None else files_of(root):
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        entries.append([rel, cache.hash(f, on_bytes)])
    return key_of(entries)
