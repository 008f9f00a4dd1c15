"""A static HTML dashboard of an SAE's latents (top contexts, samples, histograms, logits, N2G).

    python -m sae_lit.dashboard --sae DIR --cache DIR --out DIR [--eval-report report.json]
    python -m sae_lit.dashboard --config configs/dashboard.yaml

``stats`` is the streaming pass, ``build`` puts the pieces together
(``build_dashboard(DashboardConfig(sae=..., cache=..., out=...))``), ``render`` writes the pages
(with ``svg`` charts and ``assets``: stylesheet and the index script).
"""
from sae_lit.dashboard.build import DashboardConfig, build_dashboard

__all__ = ["DashboardConfig", "build_dashboard"]
