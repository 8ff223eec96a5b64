"""The QA report as one self-contained HTML page: tables plus inline SVG plots.

No plotting library is a dependency of the node (matplotlib is not installed),
and the four plots are bars and lines on fixed axes, so the SVG is written
here: a page that opens anywhere, offline, with nothing to fetch. Every text
that comes from the index goes through :func:`html.escape`.
"""

from __future__ import annotations

from html import escape

from node.qa import QAReport

W, H, PAD = 560, 220, 40
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def render_html(report: QAReport) -> str:
    flagged = report.flagged
    verdict = (f'<p class="bad">Guideline review needed: {len(flagged)} class(es) below '
               f'their thresholds.</p><ul>' + "".join(
                   f"<li><b>{escape(c.name)}</b>: {escape('; '.join(c.flags))}</li>"
                   for c in flagged) + "</ul>") if flagged else \
        '<p class="good">Every class meets its thresholds.</p>'
    kappas = [(c.name, float(c.kappa)) for c in report.classes if c.kappa is not None]
    dice = [d for c in report.classes for d in c.dice]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Lamina QA report</title>",
        "<style>body{font:14px sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}.bad{color:#b00;font-weight:bold}"
        ".good{color:#070;font-weight:bold}svg{border:1px solid #eee;margin:.5em 1em .5em 0}"
        "tr.flag{background:#fee}</style></head><body>",
        f"<h1>QA report</h1><p>Protocol <b>{escape(report.protocol)}</b>; kappa "
        f"threshold {report.kappa_min:.2f}.</p>",
        verdict,
        "<h2>Agreement per class</h2>",
        _bars("Kappa per class", kappas, 0.0, 1.0, threshold=report.kappa_min),
        _lines("Running kappa over time",
               {c.name: [v for _, v in c.kappa_over_time] for c in report.classes
                if c.kappa_over_time}, threshold=report.kappa_min),
        _histogram("Dice distribution (matched structures)", dice),
        _bars("Findings by check", list(report.findings_by_check.items()), 0.0,
              float(max(report.findings_by_check.values(), default=1))),
        _class_table(report),
        "<h2>Readings per rater</h2>", _rater_table(report),
        f"<h2>Double reading</h2><p>{len(report.double_reads)} studies chosen; "
        f"{sum(d['state'] == 'waiting' for d in report.double_reads)} waiting for a second "
        f"reader.</p>",
        _table(["study", "state", "chosen", "completed"],
               [[d["study_uid"], d["state"], d["chosen_at"], d["completed_at"] or ""]
                for d in report.double_reads]),
        f"<h2>Adjudications</h2><p>{report.comparisons} comparisons, {report.disagreeing} "
        f"disagreeing; approvals: {report.states.get('approved', 0)}.</p>",
        _table(["#", "state", "readings", "reasons", "decision", "chosen", "decided"],
               [[a["id"], a["state"], f"{a['annotation_a']} / {a['annotation_b']}",
                 a["reasons"], a["decision"] or "", a["chosen_annotation"] or "",
                 a["decided_at"] or ""] for a in report.adjudications]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _table(head: list[str], rows: list[list], flagged: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for n, row in enumerate(rows):
        cls = ' class="flag"' if n in flagged else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>")
    return "".join(out) + "</table>"


def _class_table(report: QAReport) -> str:
    rows, flagged = [], set()
    for n, c in enumerate(report.classes):
        rows.append([c.name, c.source, c.items,
                     "n/a" if c.kappa is None else f"{float(c.kappa):.3f} ({c.kappa})",
                     c.kappa_method, "" if c.mean_dice is None else f"{c.mean_dice:.3f}",
                     "; ".join(c.flags)])
        if c.flags:
            flagged.add(n)
    return _table(["class", "source", "items", "kappa", "method", "mean Dice", "flags"],
                  rows, flagged)


def _rater_table(report: QAReport) -> str:
    raters = sorted(set(report.readings_by_rater) | set(report.findings_by_rater))
    return _table(["rater", "annotations", "by state", "findings"], [
        [r, sum(report.readings_by_rater.get(r, {}).values()),
         ", ".join(f"{k} {v}" for k, v in report.readings_by_rater.get(r, {}).items()),
         ", ".join(f"{k} {v}" for k, v in report.findings_by_rater.get(r, {}).items())]
        for r in raters])


def _frame(title: str, body: list[str], low: float, high: float) -> str:
    axis = [f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">'
            f'{escape(title)}</text>',
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>',
            f'<line x1="{PAD}" y1="30" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
            f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end" font-size="10">'
            f'{low:g}</text>',
            f'<text x="{PAD - 4}" y="36" text-anchor="end" font-size="10">{high:g}</text>']
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'role="img" aria-label="{escape(title)}">' + "".join(axis + body) + "</svg>")


def _y(value: float, low: float, high: float) -> float:
    span = (high - low) or 1.0
    return H - PAD - (min(max(value, low), high) - low) / span * (H - PAD - 30)


def _threshold(value: float, low: float, high: float) -> str:
    y = _y(value, low, high)
    return (f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 10}" y2="{y:.1f}" stroke="#b00" '
            f'stroke-dasharray="4 3"/><text x="{W - 12}" y="{y - 3:.1f}" text-anchor="end" '
            f'font-size="10" fill="#b00">{value:g}</text>')


def _bars(title: str, values: list[tuple[str, float]], low: float, high: float,
          threshold: float | None = None) -> str:
    body = []
    if not values:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    step = (W - PAD - 20) / max(len(values), 1)
    for n, (name, value) in enumerate(values):
        x = PAD + 5 + n * step
        y = _y(value, low, high)
        bad = threshold is not None and value < threshold
        body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{step * 0.7:.1f}" '
                    f'height="{H - PAD - y:.1f}" fill="{"#d62728" if bad else "#1f77b4"}">'
                    f'<title>{escape(name)}: {value:.3g}</title></rect>'
                    f'<text x="{x + step * 0.35:.1f}" y="{H - PAD + 12}" text-anchor="middle" '
                    f'font-size="9">{escape(name[:14])}</text>')
    if threshold is not None:
        body.append(_threshold(threshold, low, high))
    return _frame(title, body, low, high)


def _lines(title: str, series: dict[str, list[float]], threshold: float) -> str:
    body = []
    longest = max((len(v) for v in series.values()), default=0)
    if not longest:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    for n, (name, values) in enumerate(sorted(series.items())):
        color = PALETTE[n % len(PALETTE)]
        step = (W - PAD - 20) / max(longest - 1, 1)
        points = " ".join(f"{PAD + i * step:.1f},{_y(v, -1.0, 1.0):.1f}"
                          for i, v in enumerate(values))
        body.append(f'<polyline points="{points}" fill="none" stroke="{color}" '
                    f'stroke-width="2"><title>{escape(name)}</title></polyline>'
                    f'<text x="{W - 12}" y="{40 + 12 * n}" text-anchor="end" font-size="10" '
                    f'fill="{color}">{escape(name[:40])}</text>')
    body.append(_threshold(threshold, -1.0, 1.0))
    return _frame(title, body, -1.0, 1.0)


def _histogram(title: str, values: list[float], bins: int = 20) -> str:
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    labelled = [(f"{i / bins:.2f}" if i % 4 == 0 else "", float(c))
                for i, c in enumerate(counts)]
    return _bars(title, labelled, 0.0, float(max(counts, default=0) or 1))
