"""The dead-latent study (the sweep's dead_latents, auxk_settings and dead_latent_ablations
groups): does AuxK revive dead latents at this scale, and if not, why.

Reads the sweep's results (one row per run) and train_curves.csv (the dead fraction and
``train/dead_margin_*`` over training: where AuxK's dead latents stand against each token's
k-th pre-activation, the firing threshold). Writes a markdown section and a figure.
"""
from __future__ import annotations

import math
from collections import defaultdict

from sae_lit.common import fmt, log_axes

# What each ablation run changes against the k = 8 base, in words.
CHANGES = (
    ("lr_paper", "the paper's lr rule (2/7 of the base lr)"),
    ("dead50000", "a 50k-token dead window (base 200k)"),
    ("dead600000", "a 600k-token dead window (half the run)"),
    ("k_aux2048", "k_aux = 2048 (base 512)"),
    ("k_aux64", "k_aux = 64"),
    ("alpha", "alpha = 1/4 or 1/128 (base 1/32)"),
    ("adam_reset", "Adam moments zeroed at death"),
    ("steps900", "a 3x longer run (3.7M tokens)"),
)


def _key(r: dict) -> tuple:
    return (int(r["num_latents"]), int(r["k"]), bool(r["tied_init"]), float(r["auxk_alpha"]) > 0,
            int(r["dead_tokens"]), int(r.get("k_aux") or 512), bool(r.get("dead_adam_reset") or False),
            int(r["steps"]), round(float(r["lr"]), 8), float(r["auxk_alpha"]))


def paired_ablations(rows: list[dict]) -> list[dict]:
    """Each ablation run at k = 8 with AuxK on, next to its AuxK-off twin where one was run
    (same everything but alpha = 0)."""
    out = []
    for r in rows:
        if int(r["k"]) != 8 or float(r["auxk_alpha"]) == 0 or not bool(r["tied_init"]):
            continue
        n, k, tied, _, dead, k_aux, reset, steps, lr, _alpha = _key(r)
        twin = None
        for cand in rows:
            c = _key(cand)
            if (c[0], c[1], c[2], c[4], c[6], c[7], c[8]) == (n, k, tied, dead, reset, steps, lr) and not c[3]:
                twin = cand
        out.append({"on": r, "off": twin})
    return out


def describe(r: dict, base: dict) -> str:
    """The settings in which ``r`` differs from ``base``, in words."""
    parts = []
    if not math.isclose(float(r["lr"]), float(base["lr"]), rel_tol=1e-6):
        parts.append(f"lr {float(r['lr']):.3g}")
    if int(r["dead_tokens"]) != int(base["dead_tokens"]):
        parts.append(f"dead window {int(r['dead_tokens']) // 1000}k tokens")
    if int(r.get("k_aux") or 0) != int(base.get("k_aux") or 0):
        parts.append(f"k_aux {r.get('k_aux')}")
    if not math.isclose(float(r["auxk_alpha"]), float(base["auxk_alpha"])) and float(r["auxk_alpha"]) > 0:
        parts.append(f"alpha {fmt(float(r['auxk_alpha']), 3)}")
    if bool(r.get("dead_adam_reset") or False):
        parts.append("Adam moments reset at death")
    if int(r["steps"]) != int(base["steps"]):
        parts.append(f"{int(r['steps'])} steps ({int(r['tokens']) / 1e6:.2g}M tokens)")
    return ", ".join(parts) or "base"


def margin_figure(curves: list[dict], runs: dict[str, str]):
    """train/dead_margin_median over training for the named runs (label -> run name)."""
    fig, ax = log_axes("Dead latents against the firing threshold", "training tokens",
                       "median over tokens of (best dead pre-act − k-th pre-act)", logy=False, size=(6.5, 4.2))
    by_run = defaultdict(list)
    for c in curves:
        if c.get("train/dead_margin_median") is not None:
            by_run[c["run"]].append((c["tokens"], c["train/dead_margin_median"]))
    for label, run in runs.items():
        pts = sorted(by_run.get(run, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7)
    return fig


def dead_fraction_figure(curves: list[dict], runs: dict[str, str]):
    fig, ax = log_axes("Dead fraction over training (AuxK criterion)", "training tokens", "dead fraction",
                       logy=False, size=(6.5, 4.2))
    by_run = defaultdict(list)
    for c in curves:
        if c.get("train/dead_frac") is not None:
            by_run[c["run"]].append((c["tokens"], c["train/dead_frac"]))
    for label, run in runs.items():
        pts = sorted(by_run.get(run, []))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.legend(fontsize=7)
    return fig
