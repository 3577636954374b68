"""Inline SVG bar charts: no script, no library, no network. Each bar is a <rect class="bar">, so a test (or a
person with the inspector) can count them; reference values and gate thresholds are dashed lines."""

from __future__ import annotations

from html import escape
from typing import Any

LABEL_W, BAR_W, VALUE_W, ROW_H, TOP = 260, 420, 90, 22, 28
COLOURS = {"pass": "#2e7d32", "built": "#2e7d32", "failed": "#c62828", "incomplete": "#9e9e9e", "ref": "#546e7a"}
PALETTE = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e", "#283593")


def hbar(title: str, rows: list[dict[str, Any]], fmt: str = "{:.3g}", lines: list[dict[str, Any]] | None = None,
         chart_id: str = "") -> str:
    """rows: {label, value, colour?, note?, mark?}; `mark` is a dashed tick in that row only (a roofline). lines:
    {label, value, colour?} drawn across every bar (a reference). The scale starts at 0 and ends past the largest
    value, mark or line."""
    lines = [x for x in (lines or []) if x.get("value") is not None]
    values = [r["value"] for r in rows if r.get("value") is not None] + [x["value"] for x in lines] + \
        [r["mark"] for r in rows if r.get("mark") is not None]
    top = max([v for v in values if v > 0] or [1.0]) * 1.08
    height = TOP + ROW_H * len(rows) + 34
    width = LABEL_W + BAR_W + VALUE_W
    x0 = LABEL_W

    def x(v: float) -> float:
        return x0 + BAR_W * max(0.0, v) / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart_id)}" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
             f'font-size="12"><title>{escape(title)}</title>',
             f'<text x="4" y="16" font-weight="bold">{escape(title)}</text>']
    for i, r in enumerate(rows):
        y = TOP + i * ROW_H
        parts.append(f'<text x="{x0 - 6}" y="{y + 15}" text-anchor="end">{escape(r["label"])}</text>')
        if r.get("value") is None:
            parts.append(f'<text x="{x0 + 4}" y="{y + 15}" fill="#757575">{escape(r.get("note") or "n/a")}</text>')
            continue
        w = max(1.0, x(r["value"]) - x0)
        colour = r.get("colour") or PALETTE[i % len(PALETTE)]
        parts.append(f'<rect class="bar" x="{x0}" y="{y + 3}" width="{w:.1f}" height="{ROW_H - 6}" '
                     f'fill="{colour}" data-label="{escape(r["label"])}" data-value="{r["value"]!r}"/>')
        parts.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 15}">{escape(fmt.format(r["value"]))}</text>')
        if r.get("mark") is not None:
            mx = x(r["mark"])
            parts.append(f'<line class="mark" x1="{mx:.1f}" y1="{y + 1}" x2="{mx:.1f}" y2="{y + ROW_H - 1}" '
                         f'stroke="{COLOURS["ref"]}" stroke-width="2" stroke-dasharray="3,2"/>')
            parts.append(f'<text x="{mx - 4:.1f}" y="{y + 15}" text-anchor="end" fill="{COLOURS["ref"]}">'
                         f'{escape(fmt.format(r["mark"]))}</text>')
    bottom = TOP + ROW_H * len(rows)
    for j, ln in enumerate(lines):
        lx = x(ln["value"])
        colour = ln.get("colour") or COLOURS["ref"]
        parts.append(f'<line class="refline" x1="{lx:.1f}" y1="{TOP - 4}" x2="{lx:.1f}" y2="{bottom + 2}" '
                     f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="5,3"/>')
        parts.append(f'<text x="{lx:.1f}" y="{bottom + 16 + 12 * j}" text-anchor="middle" fill="{colour}">'
                     f'{escape(ln["label"])} {escape(fmt.format(ln["value"]))}</text>')
    parts.append(f'<line x1="{x0}" y1="{TOP - 4}" x2="{x0}" y2="{bottom + 2}" stroke="#424242"/>')
    parts.append("</svg>")
    return "".join(parts)
