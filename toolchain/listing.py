"""What `ls`, `inspect`, `rm` and `export` see in a store: builds (a profile's targets, from its ref) rather than
the stage artifacts they are made of, and keys found by prefix the way git finds commits."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .errors import InputError
from .store import Store

TARGET_STAGES = ("export", "engine", "validate", "speed", "publish")


def refs(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(ref name, record) for every profile built in this store, by name: its latest attempt, i.e. the pending
    record of a build that failed (or runs) where there is one, else the last successful build's."""
    out = []
    root = store.root / "refs"
    names = sorted({p.name.rsplit(".", 1)[0] for pat in ("*.json", "*.pending") for p in root.glob(pat)}
                   if root.is_dir() else [])
    for name in names:
        for path in (store.pending_ref_path(name), store.ref_path(name)):
            try:
                record = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("stages"), list):
                out.append((name, record))
                break
    return out


def _target_status(manifests: list[dict[str, Any] | None], names: list[str]) -> str:
    """failed: a stage of the target failed its gate; incomplete: one is not in the store (the build stopped, or
    gc took it); pass: validated and every stage done; built: done, nothing validated it."""
    if any(m is not None and m.get("status") == "failed" for m in manifests):
        return "failed"
    if any(m is None for m in manifests):
        return "incomplete"
    return "pass" if any(n.startswith("validate:") for n in names) else "built"


def builds(store: Store, now: float | None = None) -> list[dict[str, Any]]:
    """One row per target of each profile's last build: profile, target, format, status, size, path, age."""
    now = time.time() if now is None else now
    rows = []
    for ref, record in refs(store):
        stages = record["stages"]
        exports = [s for s in stages if s["name"].startswith("export:")]
        for export in exports:
            label = export["name"].split(":", 1)[1]
            mine = [s for s in stages if s["name"].split(":", 1)[0] in TARGET_STAGES
                    and s["name"].split(":", 1)[1:] == [label]]
            manifests = [store.manifest(s["key"]) if store.has(s["key"]) else None for s in mine]
            em = store.manifest(export["key"]) if store.has(export["key"]) else None
            created = [m["created_unix"] for m in manifests if m and "created_unix" in m]
            rows.append({
                "profile": record.get("profile", ref), "ref": ref, "source": record.get("source", ""),
                "target": label, "format": ((export.get("material") or {}).get("config") or {}).get("format", label),
                "status": _target_status(manifests, [s["name"] for s in mine]),
                "size": em.get("size", 0) if em else 0,
                "path": str(store.object_dir(export["key"])) if em else None,
                "key": export["key"],
                "age_seconds": round(now - max(created)) if created else None,
                "stages": {s["name"]: s["key"] for s in mine},
            })
    return rows


def stage_rows(store: Store) -> list[dict[str, Any]]:
    """Every artifact in the store (`ls --all`)."""
    return [{"key": m["key"], "stage": m["stage"], "status": m.get("status", "ok"), "profile": m.get("profile"),
             "size": m.get("size", 0), "seconds": m.get("seconds")} for m in store.ls()]


def filter_builds(rows: list[dict[str, Any]], profile: str | None, fmt: str | None,
                  failed: bool) -> list[dict[str, Any]]:
    if profile:
        rows = [r for r in rows if profile in (r["profile"], r["ref"])]
    if fmt:
        rows = [r for r in rows if fmt in (r["format"], r["target"])]
    if failed:
        rows = [r for r in rows if r["status"] in ("failed", "incomplete")]
    return rows


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def find_key(store: Store, prefix: str) -> str:
    """A full key from a unique prefix; an ambiguous prefix lists what it matches (exit 2)."""
    prefix = prefix.lower()
    matches = [k for k in store.keys() if k.startswith(prefix)] if prefix else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise InputError(f"no artifact with key {prefix!r} in {store.root}; `toolchain ls --all` lists the keys")
    lines = [f"ambiguous: {len(matches)} artifacts start with {prefix}; give more characters:"]
    for k in matches:
        m = store.manifest(k)
        lines.append(f"  {k[:16]}  {m.get('stage', '?')}  {m.get('profile') or ''}".rstrip())
    raise InputError("\n".join(lines))


def is_profile_arg(arg: str) -> bool:
    path = Path(arg)
    return path.suffix in (".yaml", ".yml") or path.is_file()
