"""The report as GitHub-flavoured Markdown (a CI job summary): the HTML report's content, with text bars for
its charts."""

from __future__ import annotations

from typing import Any

from .data import accuracy_rows
from .html import _size

BAR = 24  # characters of the longest bar


def _fmt(v: Any, spec: str = "{:.4g}") -> str:
    if v is None:
        return "n/a"
    return spec.format(v) if isinstance(v, float) else str(v)


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _bar(v: float | None, top: float) -> str:
    if v is None or top <= 0:
        return ""
    n = max(0.0, v) / top * BAR
    return "█" * int(n) + ("▌" if n - int(n) >= 0.5 else "")


def _chart(title: str, rows: list[tuple[str, float | None]], spec: str, ref: float | None = None) -> list[str]:
    values = [v for _l, v in rows if v is not None] + ([ref] if ref is not None else [])
    top = max(values or [1.0])
    out = [f"**{title}**", "", "| | value | |", "|---|---|---|"]
    if ref is not None:
        out.append(f"| reference | {_fmt(ref, spec)} | {_bar(ref, top)} |")
    out += [f"| {_cell(label)} | {_fmt(v, spec)} | {_bar(v, top)} |" for label, v in rows]
    return out + [""]


def render(doc: dict[str, Any]) -> str:
    names = ", ".join(b["profile"] for b in doc["builds"]) or "no builds"
    out = [f"# toolchain report: {names}", ""]
    rows = []
    for b in doc["builds"]:
        for t in b["targets"]:
            v = t["validation"]
            rows.append([b["profile"], t["name"], t["format"], t["status"], t["verdict_reason"],
                         _fmt(v.get("ppl"), "{:.3f}"), _fmt(v.get("ppl_increase_pct"), "{:+.2f}%"),
                         _fmt(v.get("kl_mean"), "{:.4f}"), _fmt(v.get("top1_agreement"), "{:.4f}"),
                         _size(t["size"]), f"`{t['path']}`" if t["path"] else ""])
    out += ["## Side by side", ""]
    out += _table(["profile", "target", "format", "status", "verdict", "perplexity", "vs reference", "KL",
                   "top-1", "size", "path"], rows)
    acc = accuracy_rows(doc)
    if acc:
        def series(metric: str) -> list[tuple[str, float | None]]:
            return [(f"{r['build']} / {r['target']}", r[metric]) for r in acc]

        ref = next((r["reference_ppl"] for r in acc if r["reference_ppl"] is not None), None)
        out += _chart("Perplexity", series("ppl"), "{:.3f}", ref)
        out += _chart("KL(reference || quantized)", series("kl_mean"), "{:.4f}")
        out += _chart("Top-1 agreement", series("top1_agreement"), "{:.4f}", 1.0)
    for b in doc["builds"]:
        out += _build(b)
    return "\n".join(out).rstrip() + "\n"


def _build(b: dict[str, Any]) -> list[str]:
    recipe = ", ".join(f"{k} {v}" for k, v in b["recipe"].items() if k != "device")
    out = [f"## {b['profile']}", "", f"Source {b['source']}. Recipe: {recipe or 'n/a'}."]
    if b["reference"] and b["reference"].get("ppl") is not None:
        out[-1] += f" Reference perplexity {b['reference']['ppl']:.3f} over {b['reference']['tokens']} tokens."
    out.append("")
    out += _layers(b["layer_errors"], b["profile"])
    for t in b["targets"]:
        out += [f"### {t['name']} ({t['format']}): {t['status']}", "", f"`{t['path'] or 'not in the store'}`", ""]
        if t["gates"]:
            out += _table(["gate", "metric", "value", "", "threshold", "result"],
                          [[g["gate"], g["metric"], _fmt(g["value"]), g["op"], _fmt(g["threshold"]),
                            "pass" if g["passed"] else "**fail**"] for g in t["gates"]])
        else:
            out += [f"Gates: {t['gates_declared'] or 'none measured'}", ""]
        out += _layers(t["layer_errors"], t["name"])
        out += _speed(t)
        if t["runtimes"]:
            out += _table(["runtime", "version", "loads it", "why not"],
                          [[v["runtime"], v.get("version", ""), "yes" if v["loads"] else "**no**",
                            "; ".join(f"{r['says']} (fix: {r['fix']})" for r in v.get("rules", [])
                                      if r.get("effect") == "refuses")] for v in t["runtimes"]])
    p = b["provenance"]
    out += ["**Provenance**", ""] + _table(["stage", "key"], [[n, f"`{k}`"] for n, k in p["keys"].items()])
    out.append("Versions: " + (", ".join(f"{k} {v}" for k, v in sorted(p["tool_versions"].items())) or "n/a"))
    out.append("")
    out.append("Dataset protocol: " + (", ".join(f"{k} {v}" for k, v in p["dataset"].items()) or "n/a"))
    out.append("")
    if p["card"]:
        out += [f"Card: {p['card'].get('name', '?')} (driver {p['card'].get('driver', '?')})", ""]
    return out


def _layers(errors: list[dict[str, Any]], name: str) -> list[str]:
    if not errors:
        return []
    return _chart(f"{name}: largest per-layer relative weight error",
                  [(e["layer"], float(e["rel_err"])) for e in errors], "{:.3g}")


def _speed(t: dict[str, Any]) -> list[str]:
    sp = t["speed"]
    if not sp:
        return [f"Speed: {t['speed_status']['reason']}", ""] if t["speed_status"] else []
    if "per_batch" not in sp:
        return [f"Speed: {sp.get('failed') or sp}", ""]
    copy = sp.get("copy_bandwidth_gbs")
    rows = []
    for b in sp["per_batch"]:
        if b.get("skipped"):
            rows.append([b["batch_size"], b["skipped"], "", "", "", "", "", ""])
            continue
        ceiling = b["batch_size"] * copy * 1e9 / b["step_bytes"] if copy and b.get("step_bytes") else None
        rows.append([b["batch_size"], _fmt(b["decode_tok_s"], "{:.1f}"), _fmt(b["prefill_tok_s"], "{:.0f}"),
                     _fmt(b["ttft_ms"], "{:.1f}"), _fmt(b["itl_ms_p50"], "{:.2f}"), _fmt(b["itl_ms_p99"], "{:.2f}"),
                     _fmt(b.get("effective_bandwidth_gbs"), "{:.0f}"), _fmt(ceiling, "{:.0f}")])
    card = (sp.get("card") or {}).get("name", "?")
    return ([f"Speed ({sp.get('status') or ''}) by {sp.get('runtime', '')} {sp.get('runtime_version') or ''} on "
             f"{card}, copy bandwidth {_fmt(copy, '{:.0f}')} GB/s:", ""]
            + _table(["batch", "decode tok/s", "prefill tok/s", "TTFT ms", "ITL p50 ms", "ITL p99 ms", "GB/s",
                      "roofline tok/s"], rows))
