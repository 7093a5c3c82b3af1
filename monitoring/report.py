"""The human-readable drift report: one self-contained HTML file, a table of tests and ECDF plots.

Each plot shows the reference and current empirical CDFs of one of the most drifted tests; the KS
statistic is the largest vertical gap between the two curves, marked on the plot. The curves are
drawn as inline SVG from a few hundred quantiles of the (already sorted) samples, so a million-row
window costs no more to draw than a small one, and the check does not import a plotting library
(about 1.5 s of a million-row check's budget went to matplotlib's import and rasterising).
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from monitoring.detector import DriftReport

QUANTILES = 400
WIDTH, HEIGHT = 360, 230
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 38, 28
COLOURS = {"reference": "#1f77b4", "current": "#ff7f0e"}


def _quantiles(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = sorted_values.size
    if n <= QUANTILES:
        return sorted_values.astype(np.float64), np.arange(1, n + 1) / n
    positions = np.linspace(0, n - 1, QUANTILES).round().astype(np.int64)
    return sorted_values[positions].astype(np.float64), (positions + 1) / n


def _ecdf_at(sorted_values: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A sorted sample's ECDF at each of `xs`, in one binary search per point (zeros for no sample)."""
    if not sorted_values.size:
        return np.zeros(len(xs))
    return np.searchsorted(sorted_values, xs, side="right") / sorted_values.size


def ecdf_svg(name: str, reference: np.ndarray, current: np.ndarray, statistic: float | None, pvalue: float | None,
             drifted: bool) -> str:
    """One SVG panel: both ECDFs as step lines, the KS gap as a vertical segment, title and axes."""
    values = [v for v in (reference, current) if v.size]
    # Clip the x range to the central 99.8% so one extreme value does not flatten the curves.
    both = np.concatenate([_quantiles(v)[0] for v in values]) if values else np.array([0.0, 1.0])
    low, high = float(np.quantile(both, 0.001)), float(np.quantile(both, 0.999))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (min(max(x, low), high) - low) / (high - low) * plot_w

    def sy(y: float) -> float:
        return TOP + (1.0 - y) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="ECDF of {html.escape(name)}">',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for label, sample in (("reference", reference), ("current", current)):
        if not sample.size:
            continue
        xs, ys = _quantiles(sample)
        points = [f"{sx(xs[0]):.1f},{sy(0):.1f}"]
        previous = 0.0
        for x, y in zip(xs, ys, strict=True):
            points.append(f"{sx(x):.1f},{sy(previous):.1f} {sx(x):.1f},{sy(y):.1f}")
            previous = y
        parts.append(f'<polyline fill="none" stroke="{COLOURS[label]}" stroke-width="1.4" '
                     f'points="{" ".join(points)}"/>')
    if reference.size and current.size:
        # Where the curves are furthest apart, among the plotted quantile points.
        grid = np.concatenate([_quantiles(reference)[0], _quantiles(current)[0]])
        on_reference, on_current = _ecdf_at(reference, grid), _ecdf_at(current, grid)
        at = int(np.argmax(np.abs(on_reference - on_current)))
        x, y1, y2 = float(grid[at]), float(on_reference[at]), float(on_current[at])
        parts.append(f'<line x1="{sx(x):.1f}" y1="{sy(y1):.1f}" x2="{sx(x):.1f}" y2="{sy(y2):.1f}" '
                     'stroke="#b00020" stroke-width="2"/>')
    title = html.escape(name) + (" — DRIFT" if drifted else "")
    subtitle = "" if statistic is None or pvalue is None else f"KS = {statistic:.4f}, p = {pvalue:.3g}"
    colour = "#b00020" if drifted else "#000"
    parts += [
        f'<text x="{LEFT}" y="15" font-size="13" font-family="sans-serif" fill="{colour}">{title}</text>',
        f'<text x="{LEFT}" y="30" font-size="11" font-family="sans-serif">{subtitle}</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}" font-size="10" font-family="sans-serif">{low:.3g}</text>',
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" font-size="10" font-family="sans-serif" '
        f'text-anchor="end">{high:.3g}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + 4}" font-size="10" font-family="sans-serif" text-anchor="end">1</text>',
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" font-size="10" font-family="sans-serif" text-anchor="end">0</text>',
        f'<text x="{LEFT + plot_w - 4}" y="{TOP + plot_h - 22}" font-size="10" font-family="sans-serif" '
        f'text-anchor="end" fill="{COLOURS["reference"]}">reference (n={reference.size:,})</text>',
        f'<text x="{LEFT + plot_w - 4}" y="{TOP + plot_h - 8}" font-size="10" font-family="sans-serif" '
        f'text-anchor="end" fill="{COLOURS["current"]}">current (n={current.size:,})</text>',
        "</svg>",
    ]
    return "".join(parts)


def ecdf_panels(samples: Mapping[str, tuple[np.ndarray, np.ndarray]], report: DriftReport) -> list[str]:
    """SVG panels for the tests in `samples` (name -> (reference sorted, current sorted))."""
    statistics, pvalues = report.feature_statistics, report.feature_pvalues
    return [ecdf_svg(name, reference, current, statistics.get(name), pvalues.get(name), name in report.drifted)
            for name, (reference, current) in samples.items()]


def render_html(report: DriftReport, context: Mapping[str, object], panels: list[str]) -> str:
    """The report page: decision, window and reference, the ECDF plots, and every test."""
    colour = {"drift": "#b00020", "no_drift": "#1b5e20"}.get(report.status, "#8a6d00")
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in context.items())
    order = report.most_drifted(len(report.scores.features))
    order += [f for f in report.scores.features if f not in order]
    index = {f: i for i, f in enumerate(report.scores.features)}
    rows = []
    for name in order:
        i = index[name]
        stat, p, distance = report.scores.statistics[i], report.scores.pvalues[i], report.scores.distances[i]
        mark = "drift" if name in report.drifted else "small" if name in report.significant else ""
        note = {"drift": "drift", "small": "significant, below the effect-size floor"}.get(mark, "")
        rows.append(f"<tr class='{mark}'><td>{html.escape(name)}</td>"
                    f"<td>{_fmt(stat, '.4f')}</td><td>{_fmt(p, '.3g')}</td><td>{_fmt(distance, '.3f')}</td>"
                    f"<td>{report.scores.n_reference[i]:,}</td>"
                    f"<td>{report.scores.n_current[i]:,}</td><td>{note}</td></tr>")
    plots = ""
    if panels:
        plots = ("<h2>Most drifted tests (empirical CDFs; red bar: the KS gap)</h2><div class='plots'>"
                 + "".join(panels) + "</div>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report: {html.escape(report.status)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} tr.drift td{{background:#fde0e0}}
.status{{color:{colour};font-size:1.4em}} .plots{{display:flex;flex-wrap:wrap;gap:12px}}</style></head><body>
<h1>Drift check: <span class="status">{html.escape(report.status)}</span></h1>
<p>{html.escape(report.reason)}</p>
<table>{facts}</table>
{plots}
<h2>All tests</h2>
<table><tr><th>test</th><th>KS statistic</th><th>p-value</th><th>distance (sd)</th><th>reference rows</th>
<th>current rows</th>
<th></th></tr>{''.join(rows)}</table>
</body></html>
"""


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)
