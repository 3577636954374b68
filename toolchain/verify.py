"""Re-hash stored artifacts against their manifests: `toolchain verify` and `build --verify`.

Every manifest lists each file's size and sha256, written when the artifact was committed. A cache hit is
otherwise trusted as it stands (only the manifest's presence is checked); these checks read every byte again,
so a flipped bit, a truncated file, an edited or added file is found. Hashing bypasses the stat cache on
purpose: a file changed in place can keep its size and mtime.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .errors import InputError
from .hashing import sha256_file
from .store import MANIFEST, Store


def check_artifact(store: Store, key: str, on_bytes: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """What no longer matches artifact `key`'s manifest: one entry per file (missing, size, changed,
    unexpected), each naming the file's path in the store. Empty when every byte matches."""
    root = store.object_dir(key)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [_problem(key, "?", root / MANIFEST, "unreadable manifest", detail=type(e).__name__)]
    stage = manifest.get("stage", "?")
    if manifest.get("key") != key:
        return [_problem(key, stage, root / MANIFEST, "manifest of another key", detail=str(manifest.get("key")))]
    problems = []
    listed = {MANIFEST}
    for f in files:
        path = root / f["path"]
        listed.add(f["path"])
        if path.is_symlink() or not path.is_file():
            problems.append(_problem(key, stage, path, "missing"))
        elif path.stat().st_size != f["size"]:  # cheap, and no need to read a file whose size is wrong
            problems.append(_problem(key, stage, path, "size changed", f["size"], path.stat().st_size))
        else:
            got = sha256_file(path, on_bytes)
            if got != f["sha256"]:
                problems.append(_problem(key, stage, path, "content changed", f["sha256"], got))
    for path in sorted(root.rglob("*")):
        if (path.is_file() or path.is_symlink()) and path.relative_to(root).as_posix() not in listed:
            problems.append(_problem(key, stage, path, "not in the manifest"))
    return problems


def _problem(key: str, stage: str, path: Path, problem: str, expected: Any = None, actual: Any = None,
             detail: str | None = None) -> dict[str, Any]:
    out = {"key": key, "stage": stage, "path": str(path), "problem": problem}
    if expected is not None:
        out.update(expected=expected, actual=actual)
    if detail:
        out["detail"] = detail
    return out


def discard(store: Store, key: str, inode: int) -> bool:
    """Remove a corrupt artifact so its stage rebuilds. Under the key's lock, and only when the directory is
    still the one that was checked (`inode`): a concurrent build may have replaced it with a good one. The
    rename is atomic, so no reader ever sees a half-deleted artifact."""
    path = store.object_dir(key)
    with store.lock(key):
        try:
            if path.stat().st_ino != inode:
                return False
        except FileNotFoundError:
            return False
        doomed = path.with_name(f".gc-{key}-{time.time_ns()}")  # what gc removes should this process die
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return True


def intact(store: Store, key: str, warn: Callable[[str], None]) -> bool:
    """`build --verify` on one cache hit: True when every file matches; else the artifact is discarded
    (warned, naming the files) and False: the caller builds the stage again."""
    try:
        inode = store.object_dir(key).stat().st_ino
    except FileNotFoundError:
        return False
    problems = check_artifact(store, key)
    if not problems:
        return True
    names = ", ".join(f"{p['path']} ({p['problem']})" for p in problems[:5])
    warn(f"cached artifact {key[:12]} failed verification: {names}; discarding it and building again")
    discard(store, key, inode)
    return False


def profile_refs(store: Store, name: str) -> list[str]:
    """The refs a profile's builds wrote: `name`, and `name@synthetic-<arch>` for `--source synthetic` runs."""
    refs = store.root / "refs"
    if not refs.is_dir():
        return []
    return sorted(p.stem for p in refs.glob("*.json") if p.stem == name or p.stem.startswith(f"{name}@"))


def resolve(store: Store, what: str | None) -> tuple[str, list[str]]:
    """(description, keys) for `toolchain verify [KEY|PROFILE]`: nothing = every artifact in the store; a
    profile file or a profile name = the artifacts its last build references; else a key prefix."""
    if not store.root.is_dir():
        raise InputError(f"no store at {store.root}; give the store the artifacts were built in (--store or "
                         "TOOLCHAIN_STORE)")
    if what is None:
        return f"every artifact in {store.root}", store.keys()
    if Path(what).is_file():
        from . import profile as prof

        name = prof.load(what).profile.name
        if not profile_refs(store, name):
            raise InputError(f"profile {name!r} ({what}) has no build recorded in {store.root}; run `toolchain "
                             f"build {what}` first, or give the store it was built in (--store)")
    else:
        name = what
    refs = profile_refs(store, name)
    if refs:
        keys = [s["key"] for r in refs for s in (store.read_ref(r) or {}).get("stages", [])]
        return f"the last build of profile {name}", list(dict.fromkeys(keys))
    try:
        return f"artifact {what}", [store.find(what)]
    except KeyError as e:
        raise InputError(f"{e.args[0]}; give a key (prefix), a profile file or a profile name built in this "
                         "store") from None


def verify(store: Store, keys: list[str]) -> dict[str, Any]:
    """Re-hash every file of `keys` (the store's shared lock held: gc cannot delete them meanwhile)."""
    t0 = time.perf_counter()
    done = {"bytes": 0}

    def count(n: int) -> None:
        done["bytes"] += n

    problems: list[dict[str, Any]] = []
    present = [k for k in keys if store.has(k)]
    n_files = 0
    with ExitStack() as held:
        try:
            held.enter_context(store.building())
        except OSError:
            pass  # a read-only store: nothing (no gc either) can change it while we read
        for key in present:
            problems.extend(check_artifact(store, key, count))
            try:
                n_files += len(store.manifest(key)["files"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # reported by check_artifact
    return {"ok": not problems, "artifacts": len(present), "files": n_files, "bytes": done["bytes"],
            "seconds": round(time.perf_counter() - t0, 3), "absent": [k for k in keys if k not in present],
            "problems": problems}
