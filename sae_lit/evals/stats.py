"""Bootstrap intervals for the evals and the report's verdicts.

Every comparison the suite or the report makes carries a percentile interval, so that a
verdict can say "holds" only when the interval excludes the other side. Samples that share a
context are not independent (an ablation's neighbours see the same text; a probe task's
examples come from the same snippets): ``clusters`` resamples whole groups.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_ci(stat: Callable[..., float], *arrays: np.ndarray, clusters: Sequence | None = None,
                 n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(*arrays)`` over resamples of the rows of ``arrays`` (all of
    the same length), or of whole clusters when ``clusters`` gives each row's cluster label."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if clusters is None:
        groups = [np.array([i]) for i in range(n)]
    else:
        labels = np.asarray(clusters)
        groups = [np.flatnonzero(labels == c) for c in dict.fromkeys(labels.tolist())]
    out = np.empty(n_boot)
    if clusters is None:
        for b in range(n_boot):
            idx = rng.integers(0, n, n)
            out[b] = stat(*(a[idx] for a in arrays))
    else:
        for b in range(n_boot):
            pick = rng.integers(0, len(groups), len(groups))
            idx = np.concatenate([groups[g] for g in pick])
            out[b] = stat(*(a[idx] for a in arrays))
    return _percentiles(out, level)


def mean_ci(values, clusters: Sequence | None = None, n_boot: int = N_BOOT, level: float = LEVEL,
            seed: int = 0) -> dict:
    """{"mean", "lo", "hi", "n"} of the finite values (NaNs, with their cluster labels, dropped)."""
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    c = None if clusters is None else np.asarray(clusters)[keep]
    v = v[keep]
    if v.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    lo, hi = bootstrap_ci(np.mean, v, clusters=c, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": int(v.size)}


def mean_of_means_ci(groups: Sequence[np.ndarray], n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> dict:
    """Interval of the mean over groups of each group's mean, resampling the groups and, inside
    each drawn group, its members (a two-level bootstrap: tasks, then examples of a task)."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    G = len(groups)
    # Per group, n_boot resampled means up front: [G, n_boot].
    inner = np.stack([g[rng.integers(0, g.size, (n_boot, g.size))].mean(1) for g in groups])
    pick = rng.integers(0, G, (n_boot, G))
    stats = inner[pick, np.arange(n_boot)[:, None]].mean(1)
    lo, hi = _percentiles(stats, level)
    return {"mean": float(np.mean([g.mean() for g in groups])), "lo": lo, "hi": hi, "n": G}


def t_interval(values, level: float = LEVEL) -> dict:
    """{"mean", "lo", "hi", "n"}: Student-t interval of a mean over independent replicates (seeds);
    lo = hi = nan with fewer than two."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n < 2:
        return {"mean": float(v.mean()) if n else float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": float(v.mean()), "lo": float(v.mean()) - half, "hi": float(v.mean()) + half, "n": n}


def slope_interval(x, y, level: float = LEVEL) -> dict:
    """OLS slope of y on x with its Student-t interval (n − 2 degrees of freedom)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0:
        return {"slope": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
    from scipy.stats import t

    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float((resid * resid).sum()) / (n - 2) / float((xc * xc).sum()))
    half = float(t.ppf(0.5 + level / 2, n - 2)) * se
    return {"slope": slope, "lo": slope - half, "hi": slope + half, "n": n, "stderr": se}


def side(lo: float, hi: float) -> int:
    """+1 if the interval lies above 0, −1 if below, 0 if it straddles 0 or is undefined."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0
