"""Inline SVG charts, drawn in Python (no script libraries): a latent's activation histogram
over the fixed log2 bins, and the density histogram of all latents."""
from __future__ import annotations

import html
import math

import numpy as np

from sae_lit.common import fmt
from sae_lit.dashboard.stats import HIST_PER_OCTAVE, bin_edges


def histogram_svg(counts: np.ndarray, title: str = "", width: int = 540, height: int = 180) -> str:
    """Bars over the fixed log2 bins (stats.NUM_BINS), cropped to the occupied range; x ticks at
    powers of two."""
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return '<p class="muted">No activations.</p>'
    lo = max(0, int(nz[0]) - 1)
    hi = min(len(counts), int(nz[-1]) + 2)
    while hi - lo < 12:  # a few empty bins either side keep narrow distributions readable
        lo, hi = max(0, lo - 1), min(len(counts), hi + 1)
        if lo == 0 and hi == len(counts):
            break
    edges = bin_edges().numpy()
    ml, mr, mt, mb = 44, 18, 12, 36
    pw, ph = width - ml - mr, height - mt - mb
    bw = pw / (hi - lo)
    top = counts[lo:hi].max()
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">']
    for g in (0.5, 1.0):
        y = mt + ph * (1 - g)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ec"/>')
        parts.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" text-anchor="end">{round(g * top)}</text>')
    for i in range(lo, hi):
        c = int(counts[i])
        if c == 0:
            continue
        h = ph * c / top
        x = ml + (i - lo) * bw
        parts.append(
            f'<rect class="bar" x="{x + 0.5:.1f}" y="{mt + ph - h:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}">'
            f"<title>[{fmt(edges[i], 3)}, {fmt(edges[i + 1], 3)}): {c}</title></rect>"
        )
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#98a2b3"/>')
    for i in range(lo, hi + 1):
        if i % HIST_PER_OCTAVE == 0:
            x = ml + (i - lo) * bw
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#98a2b3"/>')
            parts.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{fmt(float(edges[i]), 3)}</text>')
    parts.append(f'<text x="{ml + pw}" y="{height - 7}" text-anchor="end">activation (log scale)</text>')
    parts.append("</svg>")
    return "".join(parts)


def density_svg(density: np.ndarray, width: int = 540, height: int = 170) -> str:
    """Histogram of log10 density over the latents that fired (dead ones are counted apart)."""
    alive = density[density > 0]
    if alive.size == 0:
        return '<p class="muted">No latent fired.</p>'
    lo = math.floor(min(np.log10(alive).min(), -5))
    edges = np.arange(lo, 0.0001, 0.25)
    counts, _ = np.histogram(np.log10(alive), bins=edges)
    ml, mr, mt, mb = 44, 18, 12, 36
    pw, ph = width - ml - mr, height - mt - mb
    bw, top = pw / len(counts), max(counts.max(), 1)
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="latent density histogram" xmlns="http://www.w3.org/2000/svg">']
    for i, c in enumerate(counts):
        if c:
            h = ph * c / top
            parts.append(f'<rect class="bar" x="{ml + i * bw + 0.5:.1f}" y="{mt + ph - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}">'
                         f"<title>10^{edges[i]:.2f}–10^{edges[i + 1]:.2f}: {c} latents</title></rect>")
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#98a2b3"/>')
    parts.append(f'<text x="{ml - 4}" y="{mt + 4}" text-anchor="end">{int(top)}</text>')
    for i, e in enumerate(edges):
        if abs(e - round(e)) < 1e-9:
            x = ml + i * bw
            parts.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">1e{int(round(e))}</text>')
    parts.append(f'<text x="{ml + pw}" y="{height - 7}" text-anchor="end">firing frequency (log scale)</text></svg>')
    return "".join(parts)
