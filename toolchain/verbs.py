"""`rm` and `export`: taking artifacts out of the store, by key or by profile.

rm holds the store's exclusive lock (as gc does), so no build runs meanwhile. An artifact a profile's last build
records (a gc root, `toolchain ls`) is refused by key unless --force: removing it by hand leaves that build
incomplete, and the next `build` rebuilds it. `rm PROFILE` removes the build record and the artifacts only it
reaches; what another profile shares (e.g. the source) stays.

export copies an artifact's files out (hard links where the file system allows, so a 14 GB checkpoint costs no
space; --copy for independent files) and checks every file's sha256 against the manifest before it reports.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import BuildError, InputError
from .hashing import sha256_file
from .listing import find_key, is_profile_arg, refs
from .store import MANIFEST, Store


def profile_refs(store: Store, arg: str) -> list[str]:
    """The ref names of a profile, given as its YAML (its `name:`) or its name; [] when arg is neither."""
    name = arg
    if is_profile_arg(arg):
        from . import profile as prof

        name = prof.load(arg).profile.name
    return [ref for ref, record in refs(store) if record.get("profile") == name or ref == name]


def _drop(store: Store, key: str) -> None:
    """Rename first so a half-deleted directory never looks like a complete artifact (as gc does)."""
    path = store.object_dir(key)
    doomed = path.with_name(f".gc-{key}-{time.time_ns()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def remove(store: Store, target: str, force: bool = False, dry_run: bool = False,
           on_wait: Any = None) -> list[dict[str, Any]]:
    """Remove a build (PROFILE) or one artifact (KEY prefix). Returns what was (or would be) removed."""
    with store.collecting(on_wait):
        names = profile_refs(store, target)
        if names:
            before = store.reachable()
            roots = {(n, kind): path for n in names for kind, path in
                     (("ref", store.ref_path(n)), ("pending", store.pending_ref_path(n))) if path.exists()}
            kept = {p: p.read_bytes() for p in roots.values()}
            for p in roots.values():
                p.unlink()
            still = store.reachable()  # what the other profiles' builds reach
            if dry_run:
                for p, data in kept.items():
                    p.write_bytes(data)
            keys = sorted(before - still)
            refs_removed = [str(p) for p in roots.values()]
        elif is_profile_arg(target):
            raise InputError(f"{target}: no build of this profile in {store.root} (`toolchain ls` lists them)")
        else:
            key = find_key(store, target)
            owners = sorted(r for r, rec in refs(store) if key in {s["key"] for s in rec["stages"]})
            if owners and not force:
                raise InputError(f"{key[:12]} is part of the last build of {', '.join(owners)} (a gc root); "
                                 f"`toolchain rm {owners[0].split('@')[0]}` removes that build, or --force removes "
                                 "this artifact anyway (the next build rebuilds it)")
            keys, refs_removed = [key], []
        removed = []
        for key in keys:
            m = store.manifest(key)
            removed.append({"key": key, "stage": m.get("stage"), "size": m.get("size", 0),
                            "path": str(store.object_dir(key))})
            if not dry_run:
                with store.lock(key):
                    _drop(store, key)
        return [*({"ref": r} for r in refs_removed), *removed]


def _place(src: Path, dst: Path, copy: bool) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(src, dst)
            return "link"
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copy2(src, dst)
    return "copy"


def export_key(store: Store, key: str, dest: Path, copy: bool = False) -> dict[str, Any]:
    """The artifact's files (and its manifest, as toolchain-manifest.json) into dest, each verified."""
    m = store.manifest(key)
    src = store.object_dir(key)
    how = {"link": 0, "copy": 0}
    for f in m["files"]:
        target = dest / f["path"]
        if not target.resolve().is_relative_to(dest.resolve()):
            raise BuildError(f"{key[:12]}: manifest path {f['path']!r} leaves the export directory")
        how[_place(src / f["path"], target, copy)] += 1
        got = sha256_file(target)
        if got != f["sha256"]:
            raise BuildError(f"{key[:12]}: {f['path']} has sha256 {got[:12]}, its manifest says "
                             f"{f['sha256'][:12]}: the store copy is damaged; `toolchain rm --force {key[:12]}` and "
                             "`toolchain build --force` rebuild it")
    shutil.copy2(src / MANIFEST, dest / "toolchain-manifest.json")
    return {"key": key, "stage": m.get("stage"), "dir": str(dest), "files": len(m["files"]),
            "size": m.get("size", 0), "linked": how["link"], "copied": how["copy"], "verified": True}


def export(store: Store, target: str, directory: str, copy: bool = False) -> list[dict[str, Any]]:
    """KEY -> its files in DIR. PROFILE -> each target of its last build in DIR/<target> (DIR itself for one)."""
    dest = Path(directory)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest}: export writes into a new or empty directory; give another one")
    names = profile_refs(store, target) if is_profile_arg(target) or not _looks_like_key(target) else []
    if names:
        from .listing import builds

        rows = [r for r in builds(store) if r["ref"] in names and not r["ref"].count("@")] or \
               [r for r in builds(store) if r["ref"] in names]
        missing = [r["target"] for r in rows if r["path"] is None]
        if missing:
            raise InputError(f"{target}: target {', '.join(missing)} is not in the store; build it first")
        return [export_key(store, r["key"], dest if len(rows) == 1 else dest / r["target"], copy) for r in rows]
    if is_profile_arg(target):
        raise InputError(f"{target}: no build of this profile in {store.root}; `toolchain build {target}` first")
    return [export_key(store, find_key(store, target), dest, copy)]


def _looks_like_key(s: str) -> bool:
    return len(s) >= 2 and all(c in "0123456789abcdef" for c in s.lower())
