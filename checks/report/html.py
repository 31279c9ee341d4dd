"""Self-contained HTML pages: one node's verify report, and the fleet report over many nodes.

One file each, readable offline and printable: inline CSS and inline SVG drawn here, no script, no font
or image from anywhere (a Content-Security-Policy in the page forbids every fetch, so a string that slipped
through would be blocked and logged rather than run). Every string that comes from a report goes through
:func:`html.escape`. Both pages render from the JSON documents (the verify report of
``report.schema.json``, the fleet report of ``checks/fleet``), so what the page shows is what the JSON says.

Charts are bars per GPU (GEMM TFLOP/s, device memory copy TB/s, host<->device GB/s) with the expected
figure, the floor and the node median (same GPU model) marked on each row; all-reduce bus bandwidth (the
node's own, per node on the fleet page, per node pair); and the fine-tune loss per PEFT method. Every bar is
an ``<rect class="bar">`` carrying ``data-metric``, ``data-gpu`` / ``data-host`` / ``data-pair`` and
``data-value``, so tests and scripts can read the charts back.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checks.figures import median
from checks.perf import METRICS as PERF_METRICS
from checks.report import Report

PERF_ORDER = ("gemm_tflops", "copy_tbps", "h2d_gbps", "d2h_gbps")
STATUS_ORDER = {"fail": 0, "error": 1, "no report": 2, "warn": 3, "skip": 4, "pass": 5}
NO_PERF = "no performance figures: perf checks skipped"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

# --- small helpers -------------------------------------------------------------------------------------


def esc(value: object) -> str:
    """Text from a report, safe in element content and in double- or single-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}"


def _value(values: Mapping | None, key: str) -> Any:
    """The bare value of ``measured``/``expected`` entry ``key`` ({value, unit} in the JSON), or None."""
    entry = (values or {}).get(key)
    if isinstance(entry, Mapping):
        return entry.get("value")
    return entry


def _pill(status: str) -> str:
    return f'<span class="pill s-{_status_slug(status)}">{esc(status)}</span>'


def _status_slug(status: str) -> str:
    return re.sub(r"[^a-z]+", "-", str(status).lower()).strip("-") or "unknown"


def verdict_of(data: Mapping) -> str:
    if (data.get("options") or {}).get("interrupted"):
        return "INTERRUPTED"
    return "HEALTHY" if data.get("exit_code", 1) == 0 else "UNHEALTHY"


def _gpu_text(gpu: Mapping | None) -> str:
    if not gpu:
        return ""
    parts = [f"GPU {gpu.get('index')}"]
    for key in ("serial", "pci_bus_id", "uuid"):
        if gpu.get(key):
            parts.append(f"{key.replace('_', ' ')} {gpu[key]}")
    return ", ".join(parts)


def _gpu_index(result: Mapping) -> int | None:
    gpu = result.get("gpu")
    if isinstance(gpu, Mapping) and isinstance(gpu.get("index"), int):
        return gpu["index"]
    m = re.search(r"\[gpu(\d+)\]$", str(result.get("name", "")))
    return int(m.group(1)) if m else None


# --- what the charts draw ------------------------------------------------------------------------------


@dataclass
class Bar:
    label: str
    value: float
    status: str = "pass"
    expected: float | None = None
    floor: float | None = None
    median: float | None = None
    attrs: dict[str, str] = field(default_factory=dict)  # data-* attributes besides data-value
    note: str = ""  # the tooltip's extra line


@dataclass
class LossCurve:
    method: str
    status: str
    points: list[float]
    kind: str  # "train" (per-step training losses) or "held-out" (before -> after only)


def perf_bars(results: Iterable[Mapping], host: str | None = None) -> dict[str, list[Bar]]:
    """Per-GPU bars by metric from a verify report's perf results, the node median per GPU model marked."""
    rows: dict[str, list[tuple[str, Bar]]] = {}
    for r in results:
        if r.get("group") != "perf":
            continue
        index = _gpu_index(r)
        measured, expected = r.get("measured") or {}, r.get("expected") or {}
        device = str(_value(measured, "device") or "")
        for metric in PERF_ORDER:
            value = _num(_value(measured, metric))
            if value is None or index is None:
                continue
            attrs = {"metric": metric, "gpu": str(index)}
            if host is not None:
                attrs["host"] = host
            bar = Bar(f"GPU {index}", value, str(r.get("status", "pass")), _num(_value(expected, metric)),
                      _num(_value(expected, f"{metric}_floor")), attrs=attrs, note=device)
            rows.setdefault(metric, []).append((device, bar))
    out: dict[str, list[Bar]] = {}
    for metric in PERF_ORDER:
        if metric not in rows:
            continue
        by_device: dict[str, list[float]] = {}
        for device, bar in rows[metric]:
            by_device.setdefault(device, []).append(bar.value)
        for device, bar in rows[metric]:
            if len(by_device[device]) >= 2:  # as the judge: a median needs two GPUs of the model
                bar.median = median(by_device[device])
        out[metric] = sorted((bar for _, bar in rows[metric]), key=lambda b: int(b.attrs["gpu"]))
    return out


def metric_bars(metrics: Mapping, host: str) -> dict[str, list[Bar]]:
    """Per-GPU bars from a fleet node's ``metrics`` (values only: used when the node's report is absent)."""
    out: dict[str, list[Bar]] = {}
    for metric in PERF_ORDER:
        per_gpu = metrics.get(metric) or {}
        bars = []
        for gpu, value in sorted(per_gpu.items(), key=lambda item: (len(str(item[0])), str(item[0]))):
            v = _num(value)
            if v is not None:
                bars.append(Bar(f"GPU {gpu}", v, "pass", attrs={"metric": metric, "gpu": str(gpu), "host": host}))
        if len(bars) >= 2:
            med = median([b.value for b in bars])
            for b in bars:
                b.median = med
        if bars:
            out[metric] = bars
    return out


def busbw_bars(results: Iterable[Mapping]) -> list[Bar]:
    """One bar per all-reduce measurement of the node (torch.distributed, nccl-tests) that has a busbw."""
    bars = []
    for r in results:
        if not str(r.get("name", "")).startswith("nccl.allreduce"):
            continue
        value = _num(_value(r.get("measured"), "busbw"))
        if value is None:
            continue
        m = re.search(r"\[(.+)\]$", str(r["name"]))
        source = m.group(1) if m else "all-reduce"
        bars.append(Bar(source, value, str(r.get("status", "pass")), _num(_value(r.get("expected"), "busbw")),
                        _num(_value(r.get("expected"), "busbw_floor")),
                        attrs={"metric": "allreduce_busbw_gbps", "source": source}))
    return bars


_LOSS_PAIR = re.compile(r"^\s*([-+0-9.eE]+|nan|inf)\s*->\s*([-+0-9.eE]+|nan|inf)\s*$")


def loss_curves(results: Iterable[Mapping]) -> list[LossCurve]:
    """The loss per fine-tuned PEFT method: per-step training losses where the report carries them
    (``measured.train_losses``), else the held-out loss before and after training (``measured.loss``)."""
    curves = []
    for r in results:
        name = str(r.get("name", ""))
        m = re.match(r"^finetune\.methods\[(.+)\]$", name)
        if not m or m.group(1) == "workers":
            continue
        measured = r.get("measured") or {}
        steps = _value(measured, "train_losses")
        if isinstance(steps, list) and steps:
            points = [_num(x) for x in steps]
            if all(p is not None for p in points):
                curves.append(LossCurve(m.group(1), str(r.get("status")), points, "train"))
                continue
        pair = _LOSS_PAIR.match(str(_value(measured, "loss") or ""))
        if pair:
            points = [_num(float(pair.group(1))), _num(float(pair.group(2)))]
            if all(p is not None for p in points):
                curves.append(LossCurve(m.group(1), str(r.get("status")), points, "held-out"))
    return curves


# --- SVG -----------------------------------------------------------------------------------------------

CHART_W = 560
LABEL_W = 110
VALUE_W = 70
ROW_H = 20
GAP = 4


def bar_chart(title: str, unit: str, bars: list[Bar], chart: str, caption: str = "") -> str:
    """Horizontal bars, one per row, with the row's expected figure, floor and median as ticks."""
    refs = [x for b in bars for x in (b.value, b.expected, b.floor, b.median) if x is not None]
    top = max(refs + [1e-12]) * 1.08
    plot_w = CHART_W - LABEL_W - VALUE_W
    height = 18 + len(bars) * (ROW_H + GAP) + 4

    def x(v: float) -> float:
        return LABEL_W + plot_w * max(v, 0.0) / top

    parts = [f'<figure class="chart-box"><figcaption>{esc(title)} <span class="unit">({esc(unit)})</span>'
             f'{" – " + esc(caption) if caption else ""}</figcaption>',
             f'<svg class="chart" data-chart="{esc(chart)}" role="img" aria-label="{esc(title)}" '
             f'width="{CHART_W}" height="{height}" viewBox="0 0 {CHART_W} {height}">']
    parts.append(f'<line class="axis" x1="{LABEL_W}" y1="14" x2="{LABEL_W}" y2="{height - 2}"/>')
    parts.append(f'<text class="tick-label" x="{LABEL_W}" y="10">0</text>')
    parts.append(f'<text class="tick-label" x="{LABEL_W + plot_w}" y="10" text-anchor="end">{_fmt(top)}</text>')
    for i, b in enumerate(bars):
        y = 18 + i * (ROW_H + GAP)
        attrs = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in b.attrs.items())
        tip = [f"{b.label}: {_fmt(b.value)} {unit} ({b.status})"]
        if b.expected is not None:
            tip.append(f"expected {_fmt(b.expected)}")
        if b.floor is not None:
            tip.append(f"floor {_fmt(b.floor)}")
        if b.median is not None:
            tip.append(f"median {_fmt(b.median)}")
        if b.note:
            tip.append(b.note)
        width = max(x(b.value) - LABEL_W, 0.5)
        parts.append(f'<text class="row-label" x="{LABEL_W - 6}" y="{y + ROW_H - 6}" text-anchor="end">'
                     f'{esc(b.label)}</text>')
        parts.append(f'<rect class="bar s-{_status_slug(b.status)}"{attrs} data-value="{b.value:g}" '
                     f'x="{LABEL_W}" y="{y}" width="{width:.1f}" height="{ROW_H}">'
                     f'<title>{esc("; ".join(tip))}</title></rect>')
        for kind, ref in (("floor", b.floor), ("expected", b.expected), ("median", b.median)):
            if ref is not None:
                parts.append(f'<line class="mark {kind}" x1="{x(ref):.1f}" y1="{y - 2}" x2="{x(ref):.1f}" '
                             f'y2="{y + ROW_H + 2}"><title>{kind} {esc(_fmt(ref))} {esc(unit)}</title></line>')
        parts.append(f'<text class="bar-value" x="{CHART_W - VALUE_W + 6}" y="{y + ROW_H - 6}">'
                     f'{esc(_fmt(b.value))}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


def loss_chart(curve: LossCurve, lo: float | None = None, hi: float | None = None) -> str:
    """One method's losses as a line; ``lo``/``hi`` give every method's chart the same scale."""
    w, h, left, bottom, top_pad = 260, 150, 44, 22, 14
    pts = curve.points
    lo = min(pts) if lo is None else lo
    hi = max(pts) if hi is None else hi
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    span_x = max(len(pts) - 1, 1)
    plot_w, plot_h = w - left - 10, h - bottom - top_pad

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * i / span_x, top_pad + plot_h * (hi - v) / (hi - lo)

    coords = [xy(i, v) for i, v in enumerate(pts)]
    poly = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
    what = "training loss per step" if curve.kind == "train" else "held-out loss before and after training"
    x_label = f"step 1–{len(pts)}" if curve.kind == "train" else "before → after"
    parts = [f'<figure class="chart-box loss-box"><figcaption>{esc(curve.method)} {_pill(curve.status)}'
             f'<br><span class="unit">{esc(what)}</span></figcaption>',
             f'<svg class="loss-chart" data-method="{esc(curve.method)}" data-kind="{curve.kind}" '
             f'data-points="{len(pts)}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{esc(curve.method)} {esc(what)}">',
             f'<line class="axis" x1="{left}" y1="{top_pad}" x2="{left}" y2="{h - bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}"/>',
             f'<text class="tick-label" x="{left - 4}" y="{top_pad + 4}" text-anchor="end">{esc(_fmt(hi))}</text>',
             f'<text class="tick-label" x="{left - 4}" y="{h - bottom}" text-anchor="end">{esc(_fmt(lo))}</text>',
             f'<text class="tick-label" x="{left + plot_w / 2:.1f}" y="{h - 6}" text-anchor="middle">'
             f'{esc(x_label)}</text>',
             f'<polyline class="loss-line s-{_status_slug(curve.status)}" points="{poly}"/>']
    for i, ((cx, cy), v) in enumerate(zip(coords, pts, strict=True)):
        parts.append(f'<circle class="loss-point" data-step="{i}" data-value="{v:g}" cx="{cx:.1f}" cy="{cy:.1f}" '
                     f'r="{2.5 if len(pts) <= 60 else 1.2}"><title>{esc(_fmt(v))}</title></circle>')
    parts.append("</svg></figure>")
    return "".join(parts)


# --- page parts ----------------------------------------------------------------------------------------

CSS = """
:root { --fail:#c62828; --error:#8e24aa; --warn:#ef8f00; --pass:#2e7d32; --skip:#78909c; --noreport:#5d4037;
  --ink:#1d2330; --muted:#5f6b7a; --line:#d8dde3; --bg:#ffffff; --panel:#f5f7f9; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); background: var(--bg); margin: 0 auto; max-width: 1200px; padding: 20px 24px 40px;
  font-size: 14px; line-height: 1.45; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid
  var(--line); padding-bottom: 3px; } h3 { font-size: 15px; margin: 16px 0 6px; }
.meta { color: var(--muted); margin: 0 0 10px; }
.verdict { display: inline-block; font-weight: 700; padding: 3px 10px; border-radius: 4px; color: #fff;
  background: var(--pass); letter-spacing: .03em; }
.verdict.bad { background: var(--fail); } .verdict.interrupted { background: var(--warn); }
.counts span { margin-right: 12px; white-space: nowrap; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { border: 1px solid var(--line); padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.msg { white-space: pre-wrap; word-break: break-word; }
td.fix { color: #33404f; font-size: 13px; word-break: break-word; }
.pill { display: inline-block; min-width: 38px; text-align: center; border-radius: 3px; padding: 0 6px;
  font-size: 12px; font-weight: 600; color: #fff; background: var(--skip); white-space: nowrap; }
.s-fail.pill, td.s-fail { background: var(--fail); color: #fff; } .s-error.pill, td.s-error { background:
  var(--error); color: #fff; } .s-warn.pill, td.s-warn { background: var(--warn); color: #fff; }
.s-pass.pill, td.s-pass { background: var(--pass); color: #fff; } .s-skip.pill, td.s-skip { background:
  #cfd8dc; color: #263238; } .s-no-report.pill, td.s-no-report { background: var(--noreport); color: #fff; }
table.matrix td.cell { text-align: center; font-size: 12px; font-weight: 600; }
td.host { white-space: nowrap; } tr.bad-row td.host { font-weight: 700; color: var(--fail); }
.charts { display: flex; flex-wrap: wrap; gap: 6px 18px; }
figure.chart-box { margin: 4px 0 8px; break-inside: avoid; page-break-inside: avoid; }
figure figcaption { font-weight: 600; font-size: 13px; margin-bottom: 2px; }
.unit { color: var(--muted); font-weight: 400; }
svg text { font-size: 11px; fill: #33404f; font-family: inherit; }
svg .axis { stroke: #9aa5b1; stroke-width: 1; }
svg rect.bar { fill: #4f7cac; } svg rect.bar.s-fail { fill: var(--fail); } svg rect.bar.s-error { fill:
  var(--error); } svg rect.bar.s-warn { fill: var(--warn); }
svg .mark { stroke-width: 2; } svg .mark.expected { stroke: #1d2330; } svg .mark.floor { stroke: var(--fail);
  stroke-dasharray: 3 2; } svg .mark.median { stroke: #00897b; stroke-dasharray: 1 1; stroke-width: 3; }
svg polyline.loss-line { fill: none; stroke: #4f7cac; stroke-width: 2; } svg polyline.loss-line.s-fail { stroke:
  var(--fail); } svg circle.loss-point { fill: #1d2330; }
.legend { color: var(--muted); font-size: 12px; margin: 0 0 6px; }
.legend i { display: inline-block; width: 14px; height: 0; vertical-align: middle; margin: 0 4px 0 10px;
  border-top: 2px solid #1d2330; } .legend i.floor { border-top: 2px dashed var(--fail); }
.legend i.median { border-top: 3px dotted #00897b; }
.note { color: var(--muted); font-style: italic; }
.ok { color: var(--pass); font-weight: 600; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
section.node { border-top: 1px solid var(--line); padding-top: 4px; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px; }
@media print { body { max-width: none; padding: 0; font-size: 11px; } details { display: block; }
  details > summary { list-style: none; } h2 { break-after: avoid; } tr { break-inside: avoid; }
  .pill, td.cell, .verdict, svg rect.bar { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _legend() -> str:
    return ('<p class="legend">Bars: measured per GPU (red: the GPU\'s check failed). Marks: '
            '<i></i>expected figure <i class="floor"></i>floor <i class="median"></i>node median '
            '(same GPU model)</p>')


def _failures_table(results: list[Mapping], with_host: bool = False) -> str:
    head = (["Node"] if with_host else []) + ["Status", "Check", "Message", "Remediation", "GPU"]
    rows = []
    for r in results:
        cells = ([f'<td class="host">{esc(r.get("host"))}</td>'] if with_host else [])
        cells += [f"<td>{_pill(r.get('status', ''))}</td>",
                  f'<td class="check"><code>{esc(r.get("name"))}</code></td>',
                  f'<td class="msg">{esc(r.get("message"))}</td>',
                  f'<td class="fix">{esc(r.get("remediation") or "")}</td>',
                  f"<td>{esc(_gpu_text(r.get('gpu')))}</td>"]
        rows.append(f'<tr class="failure s-{_status_slug(r.get("status", ""))}">{"".join(cells)}</tr>')
    return ('<table class="failures"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _worst_first(results: Iterable[Mapping]) -> list[Mapping]:
    return sorted(results, key=lambda r: (STATUS_ORDER.get(r.get("status"), 9), r.get("group", ""), r.get("name", "")))


def _perf_section(data: Mapping, host: str | None = None, fallback_metrics: Mapping | None = None) -> str:
    results = data.get("results") or []
    bars = perf_bars(results, host)
    if not bars and fallback_metrics:
        bars = metric_bars(fallback_metrics, host or "")
    if not bars:
        perf = [r for r in results if r.get("group") == "perf"]
        why = "; ".join(sorted({str(r.get("message", "")) for r in perf if r.get("status") == "skip"}))[:300]
        return f'<p class="note no-perf">{esc(NO_PERF)}{esc(": " + why) if why else ""}</p>'
    charts = []
    for metric in PERF_ORDER:
        if metric in bars:
            info = PERF_METRICS[metric]
            charts.append(bar_chart(info.label, info.unit, bars[metric], metric))
    return _legend() + '<div class="charts">' + "".join(charts) + "</div>"


def _busbw_section(data: Mapping) -> str:
    bars = busbw_bars(data.get("results") or [])
    if not bars:
        nccl = [r for r in data.get("results") or [] if str(r.get("name", "")).startswith("nccl.allreduce")]
        why = "; ".join(str(r.get("message", "")) for r in nccl)[:300]
        return f'<p class="note">no all-reduce bus bandwidth measured{esc(": " + why) if why else ""}</p>'
    return bar_chart("all-reduce bus bandwidth", "GB/s", bars, "allreduce_busbw_gbps")


def _loss_section(data: Mapping) -> str:
    curves = loss_curves(data.get("results") or [])
    if not curves:
        return '<p class="note">no fine-tune losses: the finetune checks did not run or reported none</p>'
    note = ""
    if any(c.kind == "held-out" for c in curves):
        note = ('<p class="legend">Held-out loss before and after the smoke fine-tune, every method on one scale '
                '(this report carries no per-step training losses).</p>')
    lo = min(p for c in curves for p in c.points)
    hi = max(p for c in curves for p in c.points)
    return note + '<div class="charts">' + "".join(loss_chart(c, lo, hi) for c in curves) + "</div>"


def _all_checks(results: list[Mapping]) -> str:
    groups: dict[str, list[Mapping]] = {}
    for r in results:
        groups.setdefault(str(r.get("group", "")), []).append(r)
    out = []
    for group, items in groups.items():
        counts: dict[str, int] = {}
        for r in items:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: STATUS_ORDER.get(kv[0], 9)))
        rows = "".join(
            f"<tr><td>{_pill(r.get('status', ''))}</td><td><code>{esc(r.get('name'))}</code></td>"
            f'<td class="msg">{esc(r.get("message"))}</td><td>{esc(_measured_text(r.get("measured")))}</td></tr>'
            for r in items)
        out.append(f"<details class=\"group\"><summary>{esc(group)}: {esc(summary)}</summary><table>"
                   "<thead><tr><th>Status</th><th>Check</th><th>Message</th><th>Measured</th></tr></thead>"
                   f"<tbody>{rows}</tbody></table></details>")
    return "".join(out)


def _measured_text(measured: Mapping | None) -> str:
    parts = []
    for key, entry in (measured or {}).items():
        value = entry.get("value") if isinstance(entry, Mapping) else entry
        unit = entry.get("unit") if isinstance(entry, Mapping) else None
        if isinstance(value, list):
            value = f"[{len(value)} values]"
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}{' ' + unit if unit else ''}")
    return ", ".join(parts)


def _counts(counts: Mapping) -> str:
    return '<p class="counts">' + "".join(
        f"<span>{_pill(label)} {esc(n)}</span>" for label, n in counts.items()) + "</p>"


# --- the single-node page ------------------------------------------------------------------------------


def render_report_dict(data: Mapping) -> str:
    """The page for one verify JSON report (a dict as ``checks.report.jsonreport.to_json_dict`` makes)."""
    host = data.get("host") or {}
    stack = data.get("stack") or {}
    verdict = verdict_of(data)
    results = list(data.get("results") or [])
    bad = [r for r in _worst_first(results) if r.get("status") in ("fail", "error")]
    warns = [r for r in _worst_first(results) if r.get("status") == "warn"]
    klass = "bad" if verdict == "UNHEALTHY" else ("interrupted" if verdict == "INTERRUPTED" else "")
    hostname = host.get("hostname") or "unknown host"
    body = [f'<header><h1>peftnode verify: {esc(hostname)}</h1>',
            f'<p class="meta"><span class="verdict {klass}" id="verdict">{esc(verdict)}</span> exit '
            f'{esc(data.get("exit_code"))} · stack <b>{esc(stack.get("name") or "unknown")}</b>'
            f'{" (" + esc(stack.get("source")) + ")" if stack.get("source") else ""} · '
            f'{esc(host.get("os") or "")} {esc(host.get("kernel") or "")} {esc(host.get("arch") or "")} · '
            f'{esc(data.get("started_at"))} · {_fmt(_num(data.get("duration_s")))} s · '
            f'peftnode {esc(data.get("peftnode_version"))}</p>', _counts(data.get("counts") or {})]
    blocked = data.get("blocked_by") or {}
    if blocked:
        body.append('<p class="meta">Blocked by: ' + ", ".join(
            f"<code>{esc(k)}</code> ({esc(v)} checks)" for k, v in blocked.items()) + "</p>")
    body.append("</header>")
    body.append('<h2 id="failures">Failures</h2>')
    body.append(_failures_table(bad) if bad else '<p class="ok">No check failed.</p>')
    if warns:
        body.append("<h3>Warnings</h3>" + _failures_table(warns))
    body.append('<h2 id="perf">Per-GPU performance</h2>' + _perf_section(data))
    body.append('<h2 id="busbw">All-reduce bus bandwidth</h2>' + _busbw_section(data))
    body.append('<h2 id="finetune">Fine-tune loss per method</h2>' + _loss_section(data))
    body.append('<h2 id="checks">All checks</h2>' + _all_checks(results))
    return _page(f"peftnode verify: {hostname}: {verdict}", "\n".join(body))


def render_html(report: Report) -> str:
    from checks.report.jsonreport import to_json_dict

    return render_report_dict(to_json_dict(report))


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write the single-node page to ``path`` and return the path."""
    target = Path(path)
    target.write_text(render_html(report), encoding="utf-8")
    return target


# --- the fleet page ------------------------------------------------------------------------------------


def _fleet_failing(fleet: Mapping) -> list[Mapping]:
    rows = []
    for node in fleet.get("nodes") or []:
        status = node.get("status")
        if status not in ("fail", "error", "no report"):
            continue
        if status == "no report" or not node.get("failures"):
            rows.append({"host": node.get("host"), "status": status, "name": "(no report)" if status == "no report"
                         else "", "message": node.get("reason") or "", "remediation": None, "gpu": None})
        for f in node.get("failures") or []:
            if f.get("status") in ("fail", "error"):
                rows.append({"host": node.get("host"), "status": f.get("status"), "name": f.get("check"),
                             "message": f.get("message"), "remediation": f.get("remediation"), "gpu": f.get("gpu")})
    return sorted(rows, key=lambda r: (STATUS_ORDER.get(r["status"], 9), str(r["host"])))


def _matrix(fleet: Mapping) -> str:
    groups = list(fleet.get("groups") or [])
    head = "".join(f"<th>{esc(g)}</th>" for g in groups)
    rows = []
    for node in fleet.get("nodes") or []:
        status = str(node.get("status", ""))
        bad = status in ("fail", "error", "no report")
        cells = "".join(
            f'<td class="cell s-{_status_slug((node.get("groups") or {}).get(g) or "")}" data-group="{esc(g)}">'
            f'{esc((node.get("groups") or {}).get(g) or "")}</td>' for g in groups)
        first = next((f for f in node.get("failures") or [] if f.get("status") in ("fail", "error")), None)
        why = f"{first.get('check')}: {first.get('message')}" if first else (node.get("reason") or "")
        versions = node.get("versions") or {}
        rows.append(f'<tr class="node-row{" bad-row" if bad else ""}" data-host="{esc(node.get("host"))}" '
                    f'data-status="{esc(status)}"><td class="host">{esc(node.get("host"))}</td><td>{_pill(status)}</td>'
                    f"{cells}<td>{esc(node.get('gpu_model') or '')}</td><td>{esc(versions.get('driver') or '')}</td>"
                    f'<td class="msg">{esc(why)}</td></tr>')
    return ('<table class="matrix"><thead><tr><th>Node</th><th>Status</th>' + head
            + "<th>GPU</th><th>Driver</th><th>First failure</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _causes(fleet: Mapping) -> str:
    causes = fleet.get("causes") or []
    if not causes:
        return ""
    items = []
    for c in causes:
        hosts = c.get("hosts") or []
        n = len(hosts)
        examples = "".join(f"<li>{esc(e)}</li>" for e in (c.get("examples") or [])[:3])
        items.append(f'<li class="cause">{_pill(c.get("status", ""))} <b>{n} node{"s" if n != 1 else ""}: '
                     f'{esc(c.get("cause"))}</b> (<code>{esc(c.get("check"))}</code>) – {esc(", ".join(hosts))}'
                     f'{"<br><span class=fix>" + esc(c.get("remediation")) + "</span>" if c.get("remediation") else ""}'
                     f'{"<ul>" + examples + "</ul>" if examples else ""}</li>')
    return '<h2 id="causes">Failures by cause</h2><ul class="causes">' + "".join(items) + "</ul>"


def _simple_table(klass: str, head: list[str], rows: list[list[str]]) -> str:
    return (f'<table class="{klass}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def _outliers(fleet: Mapping) -> str:
    rows = []
    for o in fleet.get("outliers") or []:
        gpu = o.get("gpu") if o.get("gpu") is not None else "node"
        rows.append([esc(o.get("host")), esc(o.get("metric")), esc(gpu),
                     esc(o.get("gpu_model") or ""), esc(_fmt(_num(o.get("value")))), esc(_fmt(_num(o.get("median")))),
                     esc(_fmt(_num(o.get("ratio")))), esc(_fmt(_num(o.get("threshold"))))])
    if not rows:
        return '<h2 id="outliers">Outliers</h2><p class="ok">No node below the fleet median of its GPU model.</p>'
    return '<h2 id="outliers">Outliers</h2>' + _simple_table(
        "outliers", ["Node", "Metric", "GPU", "Model", "Value", "Fleet median", "Ratio", "Threshold"], rows)


def _drift(fleet: Mapping) -> str:
    rows = [[esc(d.get("host")), esc(d.get("component")), esc(d.get("value")), esc(d.get("majority")),
             esc(d.get("stack") if d.get("stack") is not None else "")] for d in fleet.get("drift") or []]
    if not rows:
        return '<h2 id="drift">Version drift</h2><p class="ok">Every node runs the fleet\'s versions.</p>'
    return '<h2 id="drift">Version drift</h2>' + _simple_table(
        "drift", ["Node", "Component", "Version", "Fleet majority", "Stack expects"], rows)


def _pairs(fleet: Mapping) -> str:
    pairs = fleet.get("pairs") or []
    if not pairs:
        return '<h2 id="pairs">Node pairs</h2><p class="note">no multi-node all-reduce pairs in this run</p>'
    bars, rows = [], []
    for p in pairs:
        name = " ↔ ".join(str(h) for h in p.get("hosts") or [])
        value = _num(p.get("busbw_gbps"))
        expected = _num(p.get("expected_gbps"))
        floor_ratio = _num(p.get("floor_ratio"))
        if value is not None:
            floor = expected * floor_ratio if expected is not None and floor_ratio is not None else None
            pair = "--".join(str(h) for h in p.get("hosts") or [])
            bars.append(Bar(name, value, str(p.get("status", "pass")), expected, floor,
                            attrs={"metric": "pair_busbw_gbps", "pair": pair}))
        rows.append([esc(name), _pill(str(p.get("status", ""))), esc(p.get("backend")), esc(_fmt(value)),
                     esc(_fmt(expected)), f'<span class="msg">{esc(p.get("message"))}</span>'])
    chart = bar_chart("all-reduce bus bandwidth per node pair", "GB/s", bars, "pair_busbw_gbps") if bars else ""
    return ('<h2 id="pairs">Node pairs</h2>' + chart
            + _simple_table("pairs", ["Pair", "Status", "Backend", "busbw GB/s", "Expected", "Message"], rows))


def _node_busbw(fleet: Mapping, reports: Mapping[str, Mapping]) -> str:
    bars = []
    for node in fleet.get("nodes") or []:
        value = _num((node.get("metrics") or {}).get("allreduce_busbw_gbps"))
        if value is None:
            continue
        host = str(node.get("host"))
        expected = floor = None
        status = "pass"
        for b in busbw_bars((reports.get(host) or {}).get("results") or []):
            if b.expected is not None:
                expected, floor, status = b.expected, b.floor, b.status
                break
        bars.append(Bar(host, value, status, expected, floor, attrs={"metric": "allreduce_busbw_gbps", "host": host}))
    if len(bars) >= 2:
        med = median([b.value for b in bars])
        for b in bars:
            b.median = med
    if not bars:
        return '<h2 id="busbw">All-reduce bus bandwidth per node</h2><p class="note">no node measured one</p>'
    return ('<h2 id="busbw">All-reduce bus bandwidth per node</h2>'
            + bar_chart("all-reduce bus bandwidth", "GB/s", bars, "allreduce_busbw_gbps", "median: fleet median"))


def _node_sections(fleet: Mapping, reports: Mapping[str, Mapping]) -> str:
    out = []
    for node in fleet.get("nodes") or []:
        host = str(node.get("host"))
        data = reports.get(host)
        metrics = node.get("metrics") or {}
        if data is None and not any(metrics.get(m) for m in PERF_ORDER):
            continue
        status = str(node.get("status", ""))
        opened = " open" if status in ("fail", "error") else ""
        perf = _perf_section(data or {}, host, metrics)
        losses = _loss_section(data) if data and loss_curves(data.get("results") or []) else ""
        out.append(f'<section class="node" data-host="{esc(host)}"><details{opened}><summary>{esc(host)} '
                   f'{_pill(status)} {esc(node.get("gpu_model") or "")}</summary>{perf}'
                   f'{"<h3>Fine-tune loss per method</h3>" + losses if losses else ""}</details></section>')
    if not out:
        return ""
    return '<h2 id="nodes">Per node</h2>' + _legend() + "".join(out)


def render_fleet_html(fleet: Mapping, reports: Mapping[str, Mapping]) -> str:
    """The fleet page: summary, failing nodes and checks first, failures by cause, the node x group table,
    outliers, drift, pairs, busbw per node, then each node's per-GPU charts and loss curves."""
    verdict = str(fleet.get("verdict") or ("HEALTHY" if fleet.get("exit_code") == 0 else "UNHEALTHY"))
    counts = fleet.get("counts") or {}
    failing = _fleet_failing(fleet)
    run_id = fleet.get("run_id") or "no run id"
    body = [f"<header><h1>peftnode fleet: {esc(run_id)}</h1>",
            f'<p class="meta"><span class="verdict {"bad" if verdict != "HEALTHY" else ""}" id="verdict">'
            f'{esc(verdict)}</span> exit {esc(fleet.get("exit_code"))} · {esc(counts.get("nodes", 0))} nodes · '
            f'generated {esc(fleet.get("generated_at"))} · peftnode {esc(fleet.get("peftnode_version"))}</p>',
            _counts({k: v for k, v in counts.items() if k != "nodes"}), "</header>",
            '<h2 id="failures">Failing nodes</h2>',
            _failures_table(failing, with_host=True) if failing else '<p class="ok">Every node passed.</p>',
            _causes(fleet), '<h2 id="matrix">Nodes × groups</h2>', _matrix(fleet), _outliers(fleet), _drift(fleet),
            _pairs(fleet), _node_busbw(fleet, reports), _node_sections(fleet, reports)]
    return _page(f"peftnode fleet {run_id}: {verdict}", "\n".join(b for b in body if b))


def write_fleet_html(fleet: Mapping, reports: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    """Write the fleet page (fleet JSON + each node's verify JSON by host) to ``path``; return the path."""
    target = Path(path)
    target.write_text(render_fleet_html(fleet, reports), encoding="utf-8")
    return target
