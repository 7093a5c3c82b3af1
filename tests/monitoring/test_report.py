"""The drift report's ECDF panels: where the KS gap is marked."""

from __future__ import annotations

import re

import numpy as np
import pytest

from monitoring.report import BOTTOM, HEIGHT, TOP, ecdf_svg


def gap_marker(svg: str) -> tuple[float, float]:
    """The two ECDF values the panel's gap segment joins, read back from its pixel coordinates."""
    (y1, y2), = re.findall(r'<line x1="[\d.]+" y1="([\d.]+)" x2="[\d.]+" y2="([\d.]+)"', svg)
    plot_h = HEIGHT - TOP - BOTTOM
    return 1 - (float(y1) - TOP) / plot_h, 1 - (float(y2) - TOP) / plot_h


@pytest.mark.parametrize(("n1", "n2", "shift"), [(5_000, 20_000, 0.5), (300, 150, -0.8), (2_000, 2_000, 0.0)])
def test_the_gap_marker_joins_the_curves_where_they_are_furthest_apart_at_the_plotted_points(n1, n2, shift):
    rng = np.random.default_rng(n1)
    reference = np.sort(rng.normal(size=n1).astype(np.float32))
    current = np.sort((rng.normal(size=n2) + shift).astype(np.float32))
    on_reference, on_current = gap_marker(ecdf_svg("V1", reference, current, 0.1, 0.01, False))

    # Every plotted point, as the panel draws them (both samples' quantiles), with the ECDFs counted out.
    positions = [np.linspace(0, v.size - 1, 400).round().astype(int) if v.size > 400 else np.arange(v.size)
                 for v in (reference, current)]
    grid = np.concatenate([reference[positions[0]], current[positions[1]]]).astype(np.float64)
    counted = [(v[None, :] <= grid[:, None]).mean(axis=1) for v in (reference, current)]
    widest = np.abs(counted[0] - counted[1]).max()
    pixel = 1 / (HEIGHT - TOP - BOTTOM)
    assert abs(on_reference - on_current) == pytest.approx(widest, abs=pixel)
    at = np.flatnonzero(np.abs(np.abs(counted[0] - counted[1]) - widest) < 1e-12)
    assert any(abs(on_reference - counted[0][i]) <= pixel and abs(on_current - counted[1][i]) <= pixel for i in at)
