"""Scaling-law fits for the sweep report (PAPER.md, "Scaling laws").

Inputs are plain rows (dicts, e.g. from ``csv.DictReader``) of the sweep tables:

* ``results.csv``: one row per finished run; ``run, activation, num_latents, k, lr, tokens,
  d_in, val/nmse, val/l0, val/dead_frac`` (at least).
* ``curves.csv``: periodic validation; ``run, step, tokens, val/nmse``, joined on ``run``.

Numeric fields go through ``float()``, so raw DictReader strings work as well as floats.

Compute convention: ``flops = 6 * d_in * num_latents * tokens``. The encoder GEMM dominates a
TopK step: 2·d·n flops per token forward and about twice that backward. The decoder only
touches the k active latents per token (sparse kernels), so it is left out.

The nonlinear laws are fitted in log space (residuals log L - log L̂): losses and compute span
decades, and a relative error is what a log-log plot shows. Every R² here is therefore of
log y (``r2_log=True``). Points with a non-finite or non-positive value are dropped (a diverged
run logs NaN). Standard errors come from the curve_fit covariance (delta method for derived
parameters) or, when that covariance is singular, from a pairs bootstrap, with an infinite
stderr for parameters the data leave undetermined. A parameter sitting on one of the (wide)
bounds has a meaningless stderr, so read them as indicative.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import curve_fit

from sae_lit.common import log_axes

Row = Mapping[str, object]


def select(rows: Iterable[Row], **equal) -> list[Row]:
    """Rows whose fields equal the given values, numbers compared as floats.

    ``select(results, activation="topk", k=32)``; keys with a ``/`` go through a dict:
    ``select(rows, **{"val/nmse": 0.1})``."""
    def same(value, want) -> bool:
        if isinstance(want, (int, float)):
            try:
                return float(value) == float(want)
            except (TypeError, ValueError):
                return False
        return value == want
    return [r for r in rows if all(same(r.get(key), want) for key, want in equal.items())]


def run_flops(d_in: float, num_latents: float, tokens: float) -> float:
    """Training compute of a TopK run, 6·d·n·tokens (see the module docstring)."""
    return 6.0 * float(d_in) * float(num_latents) * float(tokens)


# ----------------------------------------------------------------------------- fit results

@dataclass
class _Fit:
    params: dict[str, float]
    stderr: dict[str, float]
    r2: float  # coefficient of determination of the fitted quantity
    r2_log: bool  # True: R² of log y (every fit in this module)
    n_points: int
    stderr_method: str  # "covariance" | "bootstrap" | "ols"
    formula = ""  # class attribute, not a field

    def summary(self) -> str:
        ps = ", ".join(f"{k} = {v:.4g} ± {self.stderr[k]:.2g}" for k, v in self.params.items())
        r2 = "R²(log)" if self.r2_log else "R²"
        return f"{self.formula}; {ps}; {r2} = {self.r2:.4f}, {self.n_points} points ({self.stderr_method})"


@dataclass
class NKFit(_Fit):
    """The paper's joint law; params alpha, beta_k, beta_n, gamma, zeta, eta."""
    formula = "L = exp(α + β_k log k + β_n log n + γ log k log n) + exp(ζ + η log k)"

    def predict(self, n, k) -> np.ndarray:
        return np.exp(_nk_log(np.log(np.stack(np.broadcast_arrays(n, k)).astype(float)), *self.params.values()))

    def irreducible(self, k) -> np.ndarray:
        """The n-independent term exp(ζ + η log k): the loss an infinitely wide SAE would keep."""
        return np.exp(self.params["zeta"] + self.params["eta"] * np.log(np.asarray(k, float)))


@dataclass
class PowerLawFloorFit(_Fit):
    """L = c + a·x^(-b); params c, a, b."""
    formula = "L = c + a·x^(-b)"

    def predict(self, x) -> np.ndarray:
        c, a, b = self.params.values()
        return c + np.exp(np.log(a) - b * np.log(np.asarray(x, float)))


@dataclass
class PowerLawFit(_Fit):
    """y = a·x^b (no floor), from a linear regression of log y on log x; params a, b."""
    formula = "y = a·x^b"

    def predict(self, x) -> np.ndarray:
        return self.params["a"] * np.asarray(x, float) ** self.params["b"]


# ----------------------------------------------------------------------------- fitting core

def _clean(*cols) -> list[np.ndarray]:
    arrs = [np.asarray(c, float).ravel() for c in cols]
    if len({a.size for a in arrs}) != 1:
        raise ValueError(f"inputs differ in length: {[a.size for a in arrs]}")
    keep = np.logical_and.reduce([np.isfinite(a) & (a > 0) for a in arrs])
    return [a[keep] for a in arrs]


def _make(cls, names, theta, se, r2, n_points, method):
    return cls(dict(zip(names, map(float, theta))), dict(zip(names, map(float, se))), r2, True, int(n_points), method)


def _need(n_points: int, n_params: int, what: str) -> None:
    if n_points < n_params + 1:
        raise ValueError(f"{what}: {n_points} usable points for {n_params} parameters; "
                         f"need at least {n_params + 1}")


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def _jac(f: Callable, p: np.ndarray) -> np.ndarray:
    """Central-difference Jacobian of a parameter transform (for the delta method)."""
    cols = []
    for i in range(p.size):
        h = 1e-6 * max(1.0, abs(p[i]))
        e = np.zeros_like(p)
        e[i] = h
        cols.append((f(p + e) - f(p - e)) / (2 * h))
    return np.stack(cols, axis=1)


def _null_directions(cov: np.ndarray) -> np.ndarray | None:
    """Eigenvectors (columns) of the parameter correlation matrix that the data do not
    constrain, or None if the covariance is usable as is.

    curve_fit returns a pseudo-inverse for a rank-deficient Jacobian (finite, but blind to the
    unconstrained directions), and its finite-difference Jacobian blurs exact rank deficiency,
    so look at the correlation matrix (scale-free): its condition number is ~1e5 for a weakly
    identified fit and ~1e16 for a degenerate one."""
    sd = np.sqrt(np.abs(np.diag(cov))) if np.all(np.isfinite(cov)) else None
    if sd is None or np.any(sd == 0):
        return np.zeros((cov.shape[0], 0))  # unusable, but no direction to name
    w, V = np.linalg.eigh(cov / np.outer(sd, sd))
    null = w < 1e-10 * w.max()
    return V[:, null] if null.any() else None


def _fit_log(model, X, logy, starts, bounds, transform=lambda p: p, n_boot=100, seed=0):
    """Least squares of log y against model(X, *p) from several starts, keeping the best.

    Returns (natural params transform(p), their stderr, method, R² of log y). Several starts
    because the sum-of-exponentials laws have a flat valley between "all floor" and "no
    floor"; a single start can stop on the wrong side of it."""
    lo, hi = (np.asarray(b, float) for b in bounds)
    best = None
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, float), lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo))
        try:
            p, cov = curve_fit(model, X, logy, p0=p0, bounds=(lo, hi), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        ssr = float(np.sum((logy - model(X, *p)) ** 2))
        if best is None or ssr < best[0]:
            best = (ssr, p, cov)
    if best is None:
        raise RuntimeError("the fit did not converge from any starting point")
    _, p, cov = best
    theta, J = transform(p), _jac(transform, p)
    null = _null_directions(cov)
    if null is None:
        se, method = np.sqrt(np.clip(np.diag(J @ cov @ J.T), 0, None)), "covariance"
    else:
        # Singular covariance: resample points with replacement and refit from the solution.
        # A refit cannot move along an exactly flat direction, so the bootstrap would call
        # such parameters precise; they get an infinite stderr instead.
        rng, m, samples = np.random.default_rng(seed), logy.size, []
        for _ in range(n_boot):
            idx = rng.integers(0, m, m)
            try:
                pb, _ = curve_fit(model, X[..., idx], logy[idx], p0=p, bounds=(lo, hi), maxfev=5000)
            except (RuntimeError, ValueError):
                continue
            samples.append(transform(pb))
        se = np.std(samples, axis=0, ddof=1) if len(samples) >= 10 else np.full(theta.shape, np.nan)
        # theta_j is undetermined if it moves along a null direction: |J v| not ~0.
        unconstrained = np.any(np.abs(J @ null) > 1e-6 * (np.abs(J).max(1, keepdims=True) + 1e-300), axis=1)
        se, method = np.where(unconstrained, np.inf, se), "bootstrap"
    return theta, se, method, _r2(logy, model(X, *p))


def _nk_log(X, alpha, beta_k, beta_n, gamma, zeta, eta):
    logn, logk = X
    return np.logaddexp(alpha + beta_k * logk + beta_n * logn + gamma * logk * logn, zeta + eta * logk)


_NK_NAMES = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")


def fit_nk(n, k, L, n_boot: int = 100) -> NKFit:
    """Fit the paper's L(n, k) (formula on NKFit) to points (n_i, k_i, L_i), in log space.

    Starts: the floor exp(ζ) at a few fractions of min L (η = 0), and α, β_k, β_n, γ from a
    linear fit of log(L - floor) on [1, log k, log n, log k log n]. With only a few n or k
    values the floor and γ trade off against each other; the stderr shows it."""
    n, k, L = _clean(n, k, L)
    _need(L.size, 6, "fit_nk")
    X, logL = np.log(np.stack([n, k])), np.log(L)
    design = np.stack([np.ones_like(L), X[1], X[0], X[0] * X[1]], axis=1)
    starts = []
    for frac in (0.05, 0.3, 0.6, 0.9):
        floor = frac * L.min()
        coef = np.linalg.lstsq(design, np.log(L - floor), rcond=None)[0]
        starts.append([*coef, np.log(floor), 0.0])
    lmin, lmax = np.log(L.min()), np.log(L.max())
    bounds = ([-30, -5, -5, -2, lmin - 20, -5], [30, 5, 5, 2, lmax, 5])
    theta, se, method, r2 = _fit_log(_nk_log, X, logL, starts, bounds, n_boot=n_boot)
    return _make(NKFit, _NK_NAMES, theta, se, r2, L.size, method)


def fit_power_law_floor(x, L, n_boot: int = 100) -> PowerLawFloorFit:
    """Fit L = c + a·x^(-b) (b in [0, 10], c > 0) in log space.

    Internally x is measured from its geometric mean x0 (log L̂ = logaddexp(log c,
    log a0 - b log(x/x0))) so that a stays O(L) even when x is a flop count near 1e18; the
    reported a = a0·x0^b and its stderr follow by the delta method."""
    x, L = _clean(x, L)
    _need(L.size, 3, "fit_power_law_floor")
    logx0 = float(np.log(x).mean())
    u, logL = np.log(x) - logx0, np.log(L)

    def model(u, logc, loga0, b):
        return np.logaddexp(logc, loga0 - b * u)

    starts = []
    for frac in (0.0, 0.3, 0.6, 0.9):
        slope, icpt = np.polyfit(u, np.log(L - frac * L.min()), 1)
        starts.append([np.log(max(frac, 1e-3) * L.min()), icpt, np.clip(-slope, 0, 10)])
    lmin, lmax = np.log(L.min()), np.log(L.max())
    bounds = ([lmin - 20, lmin - 30, 0.0], [lmax, lmax + 10, 10.0])

    def natural(p):
        return np.array([np.exp(p[0]), np.exp(p[1] + p[2] * logx0), p[2]])

    theta, se, method, r2 = _fit_log(model, u, logL, starts, bounds, natural, n_boot=n_boot)
    return _make(PowerLawFloorFit, ("c", "a", "b"), theta, se, r2, L.size, method)


def fit_power_law(x, y) -> PowerLawFit:
    """Fit y = a·x^b by ordinary least squares of log y on log x.

    stderr(b) = s/sqrt(Sxx) with s² = SSR/(m - 2); stderr(a) = a·stderr(log a) (delta method)."""
    x, y = _clean(x, y)
    _need(y.size, 2, "fit_power_law")
    lx, ly = np.log(x), np.log(y)
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    if sxx == 0:
        raise ValueError("fit_power_law: x must take at least 2 distinct values")
    b = float(np.sum((lx - lx.mean()) * (ly - ly.mean())) / sxx)
    loga = float(ly.mean() - b * lx.mean())
    s2 = float(np.sum((ly - loga - b * lx) ** 2)) / (y.size - 2)
    se_b, se_loga = np.sqrt(s2 / sxx), np.sqrt(s2 * (1 / y.size + lx.mean() ** 2 / sxx))
    a = np.exp(loga)
    return _make(PowerLawFit, ("a", "b"), (a, b), (a * se_loga, se_b), _r2(ly, loga + b * lx), y.size, "ols")


# ----------------------------------------------------------------------------- sweep analyses

@dataclass
class Frontier:
    flops: np.ndarray  # every curve point, sorted by (flops, nmse)
    nmse: np.ndarray
    runs: list[str]  # the run of each point
    envelope: np.ndarray  # min nmse over points with flops <= this point's (same order)
    frontier_flops: np.ndarray  # the points that set a new minimum: the Pareto frontier
    frontier_nmse: np.ndarray
    fit: PowerLawFloorFit | None  # L(C) = c + a·C^(-b) on the frontier; None if < 4 points


def compute_frontier(curves: Iterable[Row], results: Iterable[Row], include_final: bool = True) -> Frontier:
    """Compute-efficient frontier of NMSE over all runs' validation points.

    Each curve point costs 6·d_in·num_latents·tokens_at_point (d_in, num_latents from the run's
    results row; curve rows of runs not in results, and points at 0 tokens, are skipped). With
    ``include_final`` the results rows' own (tokens, val/nmse) are added where the curve has no
    point at that token count, in case the last periodic validation came before the end.
    Filter runs first with ``select`` (e.g. TopK only: the flop convention is TopK's)."""
    by_run = {str(r["run"]): r for r in results}
    pts = [(str(c["run"]), float(c["tokens"]), float(c["val/nmse"])) for c in curves if str(c["run"]) in by_run]
    if include_final:  # unless the curve already has a point at the final token count
        have = {(run, t) for run, t, _ in pts}
        pts += [(run, float(r["tokens"]), float(r["val/nmse"])) for run, r in by_run.items()
                if (run, float(r["tokens"])) not in have]
    pts = [(run, run_flops(by_run[run]["d_in"], by_run[run]["num_latents"], t), v)
           for run, t, v in pts if t > 0 and np.isfinite(v)]
    runs = [p[0] for p in pts]
    C, L = np.array([p[1] for p in pts], float), np.array([p[2] for p in pts], float)
    order = np.lexsort((L, C))  # by flops, ties by nmse, so a tie's best point comes first
    C, L, runs = C[order], L[order], [runs[i] for i in order]
    env = np.minimum.accumulate(L) if L.size else L
    is_record = np.r_[True, L[1:] < env[:-1]] if L.size else np.zeros(0, bool)
    fc, fl = C[is_record], L[is_record]
    fit = fit_power_law_floor(fc, fl) if fc.size >= 4 else None
    return Frontier(C, L, runs, env, fc, fl, fit)


def tokens_to_convergence(curve: Sequence[Row], tol: float = 0.02, reference: str = "final",
                          stay: bool = True) -> float:
    """Tokens at which a run's val NMSE gets within ``tol`` (relative) of its reference value.

    Definition: ref = the last point's NMSE (``reference="final"``) or the curve minimum
    (``"min"``; the curve is then cut at the minimum, so a later rise does not count). The
    answer is the tokens of the first point with NMSE <= (1 + tol)·ref and, if ``stay``, with
    every later point (up to the cut) also below that line, which keeps a noisy early dip from
    counting. If it is the last point, the run was still improving: the value is censored
    (``convergence_table`` flags it)."""
    pts = sorted((float(r["tokens"]), float(r["val/nmse"])) for r in curve)
    pts = [(t, v) for t, v in pts if np.isfinite(v)]
    if not pts:
        raise ValueError("tokens_to_convergence: empty curve")
    t, v = np.array(pts).T
    if reference == "min":
        t, v = t[: int(np.argmin(v)) + 1], v[: int(np.argmin(v)) + 1]
    elif reference != "final":
        raise ValueError(f"reference must be 'final' or 'min', not {reference!r}")
    ok = v <= (1 + tol) * v[-1]  # after the cut, the last point is the reference either way
    if stay:  # ok from here to the end: a reversed cumulative AND
        ok = np.logical_and.accumulate(ok[::-1])[::-1]
    return float(t[int(np.argmax(ok))])


def convergence_table(curves: Iterable[Row], results: Iterable[Row], **kw) -> list[dict]:
    """tokens_to_convergence for every results run with >= 2 curve points (kw passed on).

    Rows: run, num_latents, k, lr, tokens_to_convergence, final_tokens, censored (the
    criterion was first met at the last point, so the true value is at least this)."""
    grouped = defaultdict(list)
    for c in curves:
        grouped[str(c["run"])].append(c)
    rows = []
    for r in results:
        curve = grouped.get(str(r["run"]), [])
        if len(curve) < 2:
            continue
        t_conv = tokens_to_convergence(curve, **kw)
        last = max(float(c["tokens"]) for c in curve)
        rows.append(dict(run=str(r["run"]), num_latents=float(r["num_latents"]), k=float(r["k"]),
                         lr=float(r["lr"]), tokens_to_convergence=t_conv, final_tokens=last,
                         censored=bool(t_conv >= last)))
    return rows


@dataclass
class BestLR:
    rows: list[dict]  # per n: num_latents, best_lr, best_nmse, grid_lr, n_lrs, edge, interpolated
    fit: PowerLawFit | None  # best_lr = a·n^b over the rows; None with fewer than 3 n values


def best_lr_per_n(results: Iterable[Row], interpolate: bool = False) -> BestLR:
    """For each num_latents with >= 2 learning rates, the lr with the lowest val/nmse.

    Repeated (n, lr) runs (seeds) are averaged; NaN (diverged) runs are dropped. ``edge``
    marks a best lr at the end of the swept range: the optimum may lie outside it. With
    ``interpolate``, an interior best is refined by the vertex of the parabola through the best
    three points in (log lr, nmse), clipped to their range (only if the parabola opens upward);
    best_nmse is then the parabola's value there. Filter with ``select`` first (one k, TopK)."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in results:
        v = float(r["val/nmse"])
        if np.isfinite(v):
            groups[float(r["num_latents"])][float(r["lr"])].append(v)
    rows = []
    for n in sorted(groups):
        lrs = np.array(sorted(groups[n]))
        if lrs.size < 2:
            continue
        vals = np.array([np.mean(groups[n][lr]) for lr in lrs])
        i = int(np.argmin(vals))
        best_lr, best_v, interp = float(lrs[i]), float(vals[i]), False
        edge = i in (0, lrs.size - 1)
        if interpolate and not edge:
            xs = np.log(lrs[i - 1 : i + 2])
            c2, c1, c0 = np.polyfit(xs, vals[i - 1 : i + 2], 2)
            if c2 > 0:
                xv = float(np.clip(-c1 / (2 * c2), xs[0], xs[-1]))
                best_lr, best_v, interp = float(np.exp(xv)), float(np.polyval([c2, c1, c0], xv)), True
        rows.append(dict(num_latents=n, best_lr=best_lr, best_nmse=best_v, grid_lr=float(lrs[i]),
                         n_lrs=int(lrs.size), edge=edge, interpolated=interp))
    fit = fit_power_law([r["num_latents"] for r in rows], [r["best_lr"] for r in rows]) if len(rows) >= 3 else None
    return BestLR(rows, fit)


# ----------------------------------------------------------------------------- plots

def _finish(ax, xlabel: str, ylabel: str) -> Figure:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7)
    return ax.figure


def plot_nk(n, k, L, fit: NKFit | None = None, title: str | None = None) -> Figure:
    """L vs n on log-log axes, one colour per k: data points and (if given) the fitted law."""
    n, k, L = _clean(n, k, L)
    fig, ax = log_axes(title or (f"L(n, k) fit, R²(log) = {fit.r2:.4f}" if fit else "L(n, k)"))
    ks = np.unique(k)
    cmap = matplotlib.colormaps["viridis"]
    grid = np.geomspace(n.min(), n.max(), 100)
    for j, kv in enumerate(ks):
        color = cmap(j / max(ks.size - 1, 1) * 0.9)
        m = k == kv
        ax.plot(n[m], L[m], "o", color=color, ms=4, label=f"k = {kv:g}")
        if fit is not None:
            ax.plot(grid, fit.predict(grid, kv), "-", color=color, lw=1)
    return _finish(ax, "latents n", "normalized MSE")


def plot_frontier(fr: Frontier, title: str | None = None) -> Figure:
    """All validation points (faint), the lower envelope, and the L(C) fit on it."""
    fig, ax = log_axes(title or "compute frontier")
    ax.plot(fr.flops, fr.nmse, ".", color="0.6", alpha=0.3, ms=3, label="validation points")
    ax.step(fr.frontier_flops, fr.frontier_nmse, where="post", color="C0", lw=1.2, label="frontier")
    ax.plot(fr.frontier_flops, fr.frontier_nmse, "o", color="C0", ms=3)
    if fr.fit is not None:
        p, se = fr.fit.params, fr.fit.stderr
        grid = np.geomspace(fr.frontier_flops.min(), fr.frontier_flops.max(), 200)
        ax.plot(grid, fr.fit.predict(grid), "--", color="C3",
                label=f"{p['c']:.3g} + {p['a']:.3g}·C^-{p['b']:.3g}±{se['b']:.2g}, R²(log) {fr.fit.r2:.3f}")
    return _finish(ax, "training compute C (flops = 6·d·n·tokens)", "normalized MSE")


def plot_power_law(x, y, fit: PowerLawFit | PowerLawFloorFit | None = None, xlabel: str = "x",
                   ylabel: str = "y", title: str | None = None) -> Figure:
    """y vs x on log-log axes with a power-law fit (y = a·x^b fitted here if none given); the
    title shows the exponent ± stderr and R²."""
    x, y = _clean(x, y)
    if fit is None:
        fit = fit_power_law(x, y)
    sign = "-" if isinstance(fit, PowerLawFloorFit) else ""
    desc = f"exponent {sign}{fit.params['b']:.3g} ± {fit.stderr['b']:.2g}, R²(log) = {fit.r2:.3f}, {fit.n_points} points"
    fig, ax = log_axes(f"{title}: {desc}" if title else desc)
    ax.plot(x, y, "o", ms=4, label="data")
    grid = np.geomspace(x.min(), x.max(), 100)
    ax.plot(grid, fit.predict(grid), "-", color="C3", label=fit.formula)
    return _finish(ax, xlabel, ylabel)
