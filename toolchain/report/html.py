"""The report as one self-contained HTML file: inline CSS and SVG, no script, nothing fetched when it opens."""

from __future__ import annotations

import time
from html import escape
from typing import Any

from .data import accuracy_rows
from .svg import PALETTE, hbar

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#212121;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
font-size:13px;vertical-align:top}th{background:#f5f5f5}code{font-size:12px;word-break:break-all}
.pass{color:#2e7d32;font-weight:bold}.failed,.fail{color:#c62828;font-weight:bold}.incomplete{color:#757575}
.muted{color:#757575}.charts svg{margin:6px 12px 6px 0}
"""


def _fmt(v: Any, spec: str = "{:.4g}") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return spec.format(v)
    return str(v)


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _status(s: str) -> str:
    return f'<span class="{escape(s)}">{escape(s)}</span>'


def comparison_charts(doc: dict[str, Any]) -> str:
    """Every build's targets side by side: perplexity against the reference, KL, top-1 agreement."""
    rows = accuracy_rows(doc)
    if not rows:
        return '<p class="muted">No accuracy was measured (synthetic source or no validate.accuracy).</p>'

    def label(r: dict[str, Any]) -> str:
        return f"{r['build']} / {r['target']}"

    refs = sorted({r["reference_ppl"] for r in rows if r["reference_ppl"] is not None})
    ref_lines = [{"label": "reference", "value": v} for v in refs[:1]]
    builds = list(dict.fromkeys(r["build"] for r in rows))
    colour = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(builds)}  # one colour per profile
    charts = [
        hbar("Perplexity (reference dashed)", [{"label": label(r), "value": r["ppl"], "colour": colour[r["build"]]}
                                               for r in rows], "{:.3f}", ref_lines, "chart-ppl"),
        hbar("KL(reference || quantized), mean per token", [{"label": label(r), "value": r["kl_mean"],
                                                            "colour": colour[r["build"]]} for r in rows],
             "{:.4f}", None, "chart-kl"),
        hbar("Top-1 agreement with the reference", [{"label": label(r), "value": r["top1_agreement"],
                                                    "colour": colour[r["build"]]} for r in rows], "{:.4f}",
             [{"label": "reference", "value": 1.0}], "chart-top1"),
    ]
    return '<div class="charts">' + "".join(charts) + "</div>"


def _summary(doc: dict[str, Any]) -> str:
    rows = []
    for b in doc["builds"]:
        for t in b["targets"]:
            v = t["validation"]
            rows.append([escape(b["profile"]), escape(t["name"]), escape(t["format"]), _status(t["status"]),
                         escape(t["verdict_reason"]), _fmt(v.get("ppl"), "{:.3f}"),
                         _fmt(v.get("ppl_increase_pct"), "{:+.2f}%"), _fmt(v.get("kl_mean"), "{:.4f}"),
                         _fmt(v.get("top1_agreement"), "{:.4f}"), _size(t["size"]),
                         f"<code>{escape(t['path'] or '')}</code>"])
    return _table(["profile", "target", "format", "status", "verdict", "perplexity", "vs reference", "KL",
                   "top-1", "size", "path"], rows, "summary")


def _gates(t: dict[str, Any]) -> str:
    if not t["gates"]:
        declared = t["gates_declared"]
        return f'<p class="muted">Gates: {escape(str(declared) if declared else "none measured")}</p>'
    rows = [[escape(g["gate"]), escape(g["metric"]), _fmt(g["value"]), escape(g["op"]), _fmt(g["threshold"]),
             _status("pass" if g["passed"] else "fail")] for g in t["gates"]]
    return _table(["gate", "metric", "value", "", "threshold", "result"], rows, "gates")


def _runtimes(t: dict[str, Any]) -> str:
    if not t["runtimes"]:
        return ""
    rows = []
    for v in t["runtimes"]:
        why = "; ".join(f"{r['says']} (fix: {r['fix']})" for r in v.get("rules", []) if r.get("effect") == "refuses")
        rows.append([escape(v["runtime"]), escape(v.get("version", "")),
                     _status("pass") if v["loads"] else _status("fail"), escape(why)])
    return _table(["runtime", "version", "loads it", "why not"], rows, "runtimes")


def _speed(t: dict[str, Any], ref: str) -> str:
    sp = t["speed"]
    if not sp:
        st = t["speed_status"]
        return f'<p class="muted">Speed: {escape(st["reason"] or "")}</p>' if st else ""
    if "per_batch" not in sp:
        return f'<p class="muted">Speed: {escape(str(sp.get("failed") or sp))}</p>'
    card = sp.get("card") or {}
    copy = sp.get("copy_bandwidth_gbs")
    rows, bars = [], []
    for b in sp["per_batch"]:
        if b.get("skipped"):
            rows.append([str(b["batch_size"]), escape(b["skipped"])] + [""] * 6)
            continue
        ceiling = b["batch_size"] * copy * 1e9 / b["step_bytes"] if copy and b.get("step_bytes") else None
        rows.append([str(b["batch_size"]), _fmt(b["decode_tok_s"], "{:.1f}"), _fmt(b["prefill_tok_s"], "{:.0f}"),
                     _fmt(b["ttft_ms"], "{:.1f}"), _fmt(b["itl_ms_p50"], "{:.2f}"), _fmt(b["itl_ms_p99"], "{:.2f}"),
                     _fmt(b.get("effective_bandwidth_gbs"), "{:.0f}"), _fmt(ceiling, "{:.0f}")])
        bars.append({"label": f"batch {b['batch_size']}", "value": b["decode_tok_s"], "mark": ceiling,
                     "colour": PALETTE[0]})
    head = (f"<p>{escape(sp.get('runtime', ''))} {escape(sp.get('runtime_version') or '')} on "
            f"{escape(card.get('name', '?'))}, copy bandwidth {_fmt(copy, '{:.0f}')} GB/s; "
            f"{_status(sp.get('status') or t['speed_status']['status'] or '')}</p>")
    table = _table(["batch", "decode tok/s", "prefill tok/s", "TTFT ms", "ITL p50 ms", "ITL p99 ms",
                    "GB/s", "roofline tok/s"], rows, "speed")
    chart = hbar(f"{t['name']}: decode tokens/s per batch size (dashed: the copy-bandwidth roofline)", bars,
                 "{:.0f}", None, f"chart-speed-{ref}-{t['name']}") if bars else ""
    return head + table + chart


def _layers(errors: list[dict[str, Any]], name: str, chart_id: str) -> str:
    if not errors:
        return ""
    rows = [{"label": e["layer"], "value": float(e["rel_err"]), "colour": PALETTE[2]} for e in errors]
    return hbar(f"{name}: largest per-layer relative weight error", rows, "{:.3g}", None, chart_id)


def _provenance(b: dict[str, Any]) -> str:
    p = b["provenance"]
    keys = [[escape(n), f"<code>{escape(k)}</code>"] for n, k in p["keys"].items()]
    versions = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in sorted(p["tool_versions"].items()))
    dataset = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in p["dataset"].items())
    card = p["card"]
    return ("<h3>Provenance</h3>" + _table(["stage", "key"], keys, "keys")
            + f"<p>Versions: {versions or 'n/a'}</p>"
            + f"<p>Dataset protocol: {dataset or 'n/a'}</p>"
            + (f"<p>Card: {escape(card.get('name', '?'))} (driver {escape(str(card.get('driver', '?')))})</p>"
               if card else ""))


def _build(b: dict[str, Any]) -> str:
    recipe = ", ".join(f"{k} {v}" for k, v in b["recipe"].items() if k not in ("device",))
    ref = b["reference"]
    parts = [f'<h2 id="build-{escape(b["ref"])}">{escape(b["profile"])}</h2>',
             f"<p>Source {escape(b['source'])}. Recipe: {escape(recipe) or 'n/a'}."
             + (f" Reference perplexity {_fmt(ref['ppl'], '{:.3f}')} over {ref['tokens']} tokens." if ref and
                ref.get("ppl") is not None else "") + "</p>",
             _layers(b["layer_errors"], b["profile"], f"chart-layers-{b['ref']}")]
    for t in b["targets"]:
        parts.append(f"<h3>{escape(t['name'])} ({escape(t['format'])}): {_status(t['status'])}</h3>")
        parts.append(f"<p><code>{escape(t['path'] or 'not in the store')}</code></p>")
        parts.append(_gates(t))
        parts.append(_layers(t["layer_errors"], t["name"], f"chart-layers-{b['ref']}-{t['name']}"))
        parts.append(_speed(t, b["ref"]))
        parts.append(_runtimes(t))
    parts.append(_provenance(b))
    return "".join(parts)


def render(doc: dict[str, Any]) -> str:
    names = ", ".join(b["profile"] for b in doc["builds"]) or "no builds"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(doc["generated_unix"]))
    body = [f"<h1>toolchain report: {escape(names)}</h1>",
            f'<p class="muted">Generated {when} from the store {escape(doc["store"])}.</p>',
            "<h2>Side by side</h2>", _summary(doc), comparison_charts(doc)]
    body += [_build(b) for b in doc["builds"]]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>toolchain report: {escape(names)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
