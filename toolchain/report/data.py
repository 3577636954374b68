"""What a report shows, read from the store alone (refs and manifests; no model is loaded): per build its targets'
gates, accuracy against the reference, per-layer weight error where a manifest records it, speed per batch size,
which runtimes load each artifact, and the provenance. html.py and markdown.py render the same document."""

from __future__ import annotations

import math
import time
from typing import Any

from ..listing import builds, refs
from ..store import Store

# accuracy gate -> (metric it bounds, direction): a gate `max_kl: 0.5` passes while kl_mean <= 0.5
ACCURACY_GATES = {"max_ppl_increase_pct": ("ppl_increase_pct", "<="), "max_kl": ("kl_mean", "<="),
                  "min_top1_agreement": ("top1_agreement", ">=")}
SPEED_GATES = {"min_decode_tok_s": ("decode_tok_s", ">="), "max_ttft_ms": ("ttft_ms", "<=")}
LAYERS_SHOWN = 20


def _num(x: Any) -> float | None:
    """A metric as a float; None when absent or non-finite ("nan" in --json)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _gates(validation: dict[str, Any], gates: Any) -> list[dict[str, Any]]:
    if not isinstance(gates, dict):
        return []
    rows = []
    for gate, (metric, op) in ACCURACY_GATES.items():
        limit = gates.get(gate)
        if limit is None:
            continue
        value = _num(validation.get(metric))
        ok = value is not None and (value <= limit if op == "<=" else value >= limit)
        rows.append({"gate": gate, "metric": metric, "value": value, "op": op, "threshold": limit, "passed": ok})
    return rows


def _speed_gates(speed: dict[str, Any], gates: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for b in speed.get("per_batch", []):
        if b.get("skipped"):
            continue
        for gate, (metric, op) in SPEED_GATES.items():
            limit = gates.get(gate)
            if limit is None:
                continue
            value = _num(b.get(metric))
            ok = value is not None and (value <= limit if op == "<=" else value >= limit)
            rows.append({"gate": f"{gate} (batch {b['batch_size']})", "metric": metric, "value": value, "op": op,
                         "threshold": limit, "passed": ok})
    return rows


def _layer_errors(*infos: dict[str, Any]) -> list[dict[str, Any]]:
    """Largest per-layer weight errors, where a stage recorded them (`layer_errors`: [{layer, rel_err}, ...])."""
    for info in infos:
        errs = info.get("layer_errors")
        if isinstance(errs, list) and errs:
            good = [e for e in errs if isinstance(e, dict) and _num(e.get("rel_err")) is not None]
            return sorted(good, key=lambda e: -float(e["rel_err"]))[:LAYERS_SHOWN]
    return []


def _target(store: Store, row: dict[str, Any]) -> dict[str, Any]:
    man = {name: store.manifest(k) for name, k in row["stages"].items() if store.has(k)}
    label = row["target"]
    export = man.get(f"export:{label}", {})
    val = man.get(f"validate:{label}", {})
    speed_m = man.get(f"speed:{label}", {})
    vinfo = val.get("info", {})
    validation = vinfo.get("validation") or {}
    speed = speed_m.get("info", {}).get("speed")
    if speed:  # the stage's verdict beside its figures
        speed = {**speed, "status": speed_m.get("status"), "reason": speed_m.get("reason")}
    speed_gates = ((speed_m.get("config") or {}).get("gates") or {}) if speed else {}
    gates_cfg = (val.get("config") or {}).get("gates")
    return {
        "name": label, "format": row["format"], "status": row["status"], "path": row["path"], "key": row["key"],
        "size": row["size"],
        "verdict_reason": val.get("reason", ""),
        "validation": validation,
        "gates": _gates(validation, gates_cfg) + (_speed_gates(speed, speed_gates) if speed else []),
        "gates_declared": gates_cfg,
        "conformance": vinfo.get("conformance"),
        "export_fidelity": vinfo.get("export_fidelity"),
        "layer_errors": _layer_errors(vinfo, export.get("info", {})),
        "speed": speed,
        "speed_status": {"status": speed_m.get("status"), "reason": speed_m.get("reason")} if speed_m else None,
        "runtimes": export.get("runtimes") or [],
        "stages": [{"name": n, "key": k, "status": man[n].get("status", "ok") if n in man else "missing",
                    "seconds": man.get(n, {}).get("seconds")} for n, k in row["stages"].items()],
    }


def collect(store: Store, profiles: list[str] | None = None) -> dict[str, Any]:
    """The report document for these profiles (names or YAML paths; all builds in the store when none)."""
    from ..verbs import profile_refs

    wanted: list[str] | None = None
    if profiles:
        wanted = []
        for p in profiles:
            names = profile_refs(store, p)
            if not names:
                from ..errors import InputError

                raise InputError(f"{p}: no build of this profile in {store.root}; `toolchain build {p}` first "
                                 "(`toolchain ls` lists the builds)")
            wanted += [n for n in names if n not in wanted]
    rows = builds(store)
    out = []
    for ref, record in refs(store):
        if wanted is not None and ref not in wanted:
            continue
        stages = {s["name"]: s["key"] for s in record["stages"]}
        shared = {n: store.manifest(k) for n, k in stages.items()
                  if ":" not in n and store.has(k)}  # source, quantize, reference
        reference = shared.get("reference", {}).get("info", {})
        quantize = shared.get("quantize", {})
        targets = [_target(store, r) for r in rows if r["ref"] == ref]
        versions = next((m.get("tool_versions") for m in shared.values() if m.get("tool_versions")), {})
        card = next((t["speed"]["card"] for t in targets if t["speed"] and t["speed"].get("card")), None)
        protocol = next((t["validation"] for t in targets if t["validation"].get("dataset")), {})
        out.append({
            "profile": record.get("profile", ref), "ref": ref, "source": record.get("source", ""),
            "recipe": {k: v for k, v in (quantize.get("config") or {}).items() if v is not None},
            "reference": {"ppl": _num(reference.get("ppl")), "tokens": reference.get("tokens")} if reference else None,
            "layer_errors": _layer_errors(quantize.get("info", {})),
            "targets": targets,
            "provenance": {
                "keys": stages,
                "tool_versions": versions,
                "card": card,
                "dataset": {k: protocol.get(k) for k in ("dataset", "tokens", "seq_len", "stride", "tokenizer",
                                                         "protocol") if protocol.get(k) is not None},
            },
        })
    if wanted is not None:
        out.sort(key=lambda b: wanted.index(b["ref"]))
    return {"generated_unix": int(time.time()), "store": str(store.root), "builds": out}


def accuracy_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (build, target) with accuracy figures: the side-by-side table and chart."""
    rows = []
    for b in doc["builds"]:
        for t in b["targets"]:
            v = t["validation"]
            if _num(v.get("ppl")) is None and _num(v.get("kl_mean")) is None:
                continue
            rows.append({"build": b["profile"], "target": t["name"], "status": t["status"],
                         "ppl": _num(v.get("ppl")), "reference_ppl": _num(v.get("reference_ppl")),
                         "ppl_increase_pct": _num(v.get("ppl_increase_pct")), "kl_mean": _num(v.get("kl_mean")),
                         "top1_agreement": _num(v.get("top1_agreement")), "tokens": v.get("tokens")})
    return rows
