"""Scaling-law fits (sae_lit.analysis.fits): known laws are recovered, the frontier is a lower envelope,
the table helpers follow their documented definitions, and the plots render."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from sae_lit.analysis import fits
from sae_lit.common import save_figure

PAPER_NK = (-0.50, 0.26, -0.017, -0.042, -1.32, -0.085)  # (α, β_k, β_n, γ, ζ, η), PAPER.md


def paper_law(n, k):
    n, k = np.asarray(n, float), np.asarray(k, float)
    a, bk, bn, g, z, e = PAPER_NK
    lk, ln = np.log(k), np.log(n)
    return np.exp(a + bk * lk + bn * ln + g * lk * ln) + np.exp(z + e * lk)


def nk_grid(ks=(8, 16, 32, 64, 128), noise=0.01, seed=0):
    n, k = np.meshgrid(2.0 ** np.arange(10, 18), np.asarray(ks, float))
    n, k = n.ravel(), k.ravel()
    L = paper_law(n, k) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size))
    return n, k, L


def test_fit_nk_recovers_paper_law():
    n, k, L = nk_grid()
    fit = fits.fit_nk(n, k, L)
    assert fit.n_points == 40 and fit.r2_log and fit.r2 > 0.99
    assert fit.stderr_method == "covariance"
    # What the data identify: the surface itself, on the grid and between grid points.
    assert np.max(np.abs(fit.predict(n, k) / paper_law(n, k) - 1)) < 0.03
    n2, k2 = np.array([3e3, 2e4, 9e4]), np.array([12.0, 24.0, 100.0])
    assert np.max(np.abs(fit.predict(n2, k2) / paper_law(n2, k2) - 1)) < 0.03
    # Individual parameters are correlated; the stderrs should at least cover the truth.
    for name, true in zip(fits._NK_NAMES, PAPER_NK):
        se = fit.stderr[name]
        assert 0 < se < math.inf
        assert abs(fit.params[name] - true) < 4 * se, (name, fit.params[name], se)
    assert "R²(log)" in fit.summary()


def test_fit_nk_degenerate_single_k_reports_infinite_stderr():
    # One k: α/β_k, β_n/γ and the floor are not separately identified.
    n, k, L = nk_grid(ks=(32,))
    fit = fits.fit_nk(n, k, L, n_boot=20)
    assert fit.stderr_method == "bootstrap"
    assert all(math.isinf(se) for se in fit.stderr.values())
    assert np.max(np.abs(fit.predict(n, k) / paper_law(n, k) - 1)) < 0.03


def test_fit_power_law_floor_recovers_params_at_flop_scale():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e12, 1e18, 15)
    y = (0.1 + 3e3 * x**-0.3) * np.exp(0.005 * rng.standard_normal(x.size))
    fit = fits.fit_power_law_floor(x, y)
    assert fit.r2 > 0.99 and fit.stderr_method == "covariance"
    assert fit.params["b"] == pytest.approx(0.3, abs=0.02)
    assert fit.params["c"] == pytest.approx(0.1, rel=0.05)
    assert fit.params["a"] == pytest.approx(3e3, rel=0.5)  # a is tied to b by the range of x
    assert abs(fit.params["b"] - 0.3) < 4 * fit.stderr["b"]
    xs = np.geomspace(1e12, 1e18, 7)
    np.testing.assert_allclose(fit.predict(xs), 0.1 + 3e3 * xs**-0.3, rtol=0.02)


def test_fit_power_law_exact_and_noisy():
    x = np.geomspace(1e3, 1e6, 6)
    fit = fits.fit_power_law(x, 2.0 * x**0.6)
    assert fit.params["b"] == pytest.approx(0.6, abs=1e-10)
    assert fit.params["a"] == pytest.approx(2.0, rel=1e-8)
    assert fit.stderr["b"] < 1e-8 and fit.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(2)
    noisy = fits.fit_power_law(x, 2.0 * x**-0.5 * np.exp(0.05 * rng.standard_normal(x.size)))
    assert abs(noisy.params["b"] + 0.5) < 4 * noisy.stderr["b"] and noisy.stderr_method == "ols"
    np.testing.assert_allclose(fit.predict([10.0]), 2.0 * 10**0.6)


def test_too_few_points_raise():
    with pytest.raises(ValueError, match="need at least 7"):
        fits.fit_nk([1024, 2048, 4096] * 2, [8, 8, 8, 16, 16, 16], [0.5, 0.4, 0.3, 0.4, 0.3, 0.2])
    with pytest.raises(ValueError, match="need at least 4"):
        fits.fit_power_law_floor([1, 2, 3], [3, 2, 1])
    with pytest.raises(ValueError, match="need at least 3"):
        fits.fit_power_law([1, 2, 3], [1, float("nan"), 3])  # the NaN point is dropped
    with pytest.raises(ValueError, match="distinct"):
        fits.fit_power_law([2, 2, 2], [1, 2, 3])


def make_sweep(tmp_path):
    """A small sweep written and read back like the real tables (DictReader strings)."""
    rng = np.random.default_rng(3)
    results, curves = [], []
    for n in (256, 1024, 4096):
        for lr in (1e-4, 3e-4):
            run = f"n{n}_lr{lr:g}"
            tokens = np.linspace(1e5, 2e6, 12)
            nmse = 0.1 + 50.0 / np.sqrt(n) * (tokens / 1e5) ** -0.5 * (1 + 0.03 * rng.standard_normal(12))
            curves += [dict(run=run, step=i, tokens=t, **{"val/nmse": v}) for i, (t, v) in enumerate(zip(tokens, nmse))]
            results.append({"run": run, "activation": "topk", "num_latents": n, "k": 32, "lr": lr,
                            "tokens": tokens[-1], "d_in": 64, "val/nmse": nmse[-1], "val/l0": 32,
                            "val/dead_frac": 0.0})
    curves.append({"run": "unfinished", "step": 0, "tokens": 1e5, "val/nmse": 1e-6})  # not in results
    for name, rows in (("results.csv", results), ("curves.csv", curves)):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    read = lambda name: list(csv.DictReader(open(tmp_path / name)))  # noqa: E731
    return read("results.csv"), read("curves.csv")


def test_compute_frontier_is_the_lower_envelope(tmp_path):
    results, curves = make_sweep(tmp_path)
    fr = fits.compute_frontier(curves, results)
    assert "unfinished" not in fr.runs and len(fr.flops) == 6 * 12  # finals are the last curve points
    assert np.all(np.diff(fr.flops) >= 0) and np.all(np.diff(fr.envelope) <= 0)
    assert np.all(np.diff(fr.frontier_flops) > 0) and np.all(np.diff(fr.frontier_nmse) < 0)
    # Brute force: the envelope at each point is the min over all points with no more compute.
    brute = np.array([fr.nmse[fr.flops <= c].min() for c in fr.flops])
    np.testing.assert_array_equal(fr.envelope, brute)
    # and the frontier points are exactly the points that beat everything cheaper.
    record = [i for i, c in enumerate(fr.flops) if np.all(fr.nmse[i] < fr.nmse[fr.flops < c])
              and fr.nmse[i] == fr.nmse[fr.flops == c].min()]
    np.testing.assert_array_equal(fr.frontier_flops, np.unique(fr.flops[record]))
    f0 = float(results[0]["tokens"]) * 6 * 64 * 256
    assert fr.flops.max() == pytest.approx(f0 * 16)
    assert fr.fit is not None and fr.fit.params["b"] > 0 and fr.fit.r2 > 0.9
    # A final result past the last validation adds one point; one at a new best extends the frontier.
    results[0] = dict(results[0], tokens="4e6", **{"val/nmse": "0.01"})
    fr2 = fits.compute_frontier(curves, results)
    assert len(fr2.flops) == 6 * 12 + 1 and fr2.frontier_nmse[-1] == 0.01
    assert len(fits.compute_frontier(curves, results, include_final=False).flops) == 6 * 12


def test_tokens_to_convergence_definitions():
    def curve(vals):
        return [{"tokens": 100.0 * i, "val/nmse": v} for i, v in enumerate(vals)][::-1]  # any order

    dip = curve([1.0, 0.5, 0.2, 0.3, 0.21, 0.2, 0.2])  # final 0.2, line at 0.22 for tol 0.1
    assert fits.tokens_to_convergence(dip, tol=0.1) == 400.0  # stays within from 400 on
    assert fits.tokens_to_convergence(dip, tol=0.1, stay=False) == 200.0  # first touch
    rising = curve([1.0, 0.5, 0.25, 0.2, 0.3])
    assert fits.tokens_to_convergence(rising, tol=0.1, reference="min") == 300.0  # cut at the min
    assert fits.tokens_to_convergence(rising, tol=0.1) == 200.0  # within 0.33 of the final 0.3
    with pytest.raises(ValueError):
        fits.tokens_to_convergence(rising, reference="best")
    results = [{"run": "a", "num_latents": 256, "k": 32, "lr": 1e-3},
               {"run": "b", "num_latents": 512, "k": 32, "lr": 1e-3}]
    curves = [dict(r, run="a") for r in curve([1.0, 0.3, 0.2, 0.2])] + \
             [dict(r, run="b") for r in curve([1.0, 0.5, 0.3, 0.2])]
    table = {r["run"]: r for r in fits.convergence_table(curves, results, tol=0.02)}
    assert table["a"]["tokens_to_convergence"] == 200.0 and not table["a"]["censored"]
    assert table["b"]["tokens_to_convergence"] == 300.0 and table["b"]["censored"]


def test_best_lr_per_n_hand_table():
    rows = [(1024, 1e-4, 0.3), (1024, 3e-4, 0.2), (1024, 1e-3, 0.25),
            (4096, 1e-4, 0.25), (4096, 3e-4, 0.22), (4096, 1e-3, 0.3), (4096, 1e-3, 0.1),  # seeds: mean 0.2
            (4096, 3e-3, float("nan")),  # diverged: dropped
            (16384, 3e-5, 0.3), (16384, 1e-4, 0.2),  # best at the edge of the sweep
            (65536, 1e-4, 0.1)]  # a single lr: skipped
    table = [{"num_latents": n, "lr": lr, "val/nmse": v} for n, lr, v in rows]
    out = fits.best_lr_per_n(table)
    got = {r["num_latents"]: r for r in out.rows}
    assert sorted(got) == [1024, 4096, 16384]
    assert got[1024]["best_lr"] == 3e-4 and not got[1024]["edge"]
    assert got[4096]["best_lr"] == 1e-3 and got[4096]["best_nmse"] == pytest.approx(0.2) and got[4096]["edge"]
    assert got[4096]["n_lrs"] == 3 and got[16384]["edge"]
    assert out.fit is not None and out.fit.n_points == 3

    # Parabola in log lr: the vertex of (0.3, 0.2, 0.25) at lr 1e-4, 1e-3, 1e-2 is 1/6 decade up.
    table = [{"num_latents": 1024, "lr": lr, "val/nmse": v} for lr, v in ((1e-4, 0.3), (1e-3, 0.2), (1e-2, 0.25))]
    r = fits.best_lr_per_n(table, interpolate=True).rows[0]
    assert r["interpolated"] and r["grid_lr"] == 1e-3
    assert r["best_lr"] == pytest.approx(1e-3 * 10 ** (1 / 6), rel=1e-9)
    assert fits.best_lr_per_n(table, interpolate=True).fit is None  # one n: no fit

    # Best lr = 0.01/sqrt(n) exactly, quadratic in log lr around it: the fit finds -0.5.
    table = [{"num_latents": n, "lr": 0.01 / math.sqrt(n) * m, "val/nmse": 0.1 + math.log(m) ** 2 + 0.01 * j}
             for n in (2**10, 2**12, 2**14, 2**16) for j, m in enumerate((0.4, 1.0, 3.0))]
    out = fits.best_lr_per_n(table, interpolate=True)
    assert out.fit.params["b"] == pytest.approx(-0.5, abs=0.01) and out.fit.r2 > 0.999


def test_select_compares_numbers_as_floats():
    rows = [{"activation": "topk", "k": "32"}, {"activation": "relu", "k": "32"}, {"activation": "topk", "k": "64.0"}]
    assert fits.select(rows, activation="topk", k=32) == [rows[0]]
    assert fits.select(rows, k=64) == [rows[2]]


def test_plots_save_png_and_tensorboard(tmp_path):
    n, k, L = nk_grid(ks=(16, 64))
    fig = fits.plot_nk(n, k, L, fits.fit_nk(n, k, L))
    assert save_figure(fig, tmp_path / "nk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    x = np.geomspace(1e3, 1e6, 5)
    save_figure(fits.plot_power_law(x, 3 * x**0.6, xlabel="n", ylabel="tokens"), tmp_path / "pl.png")
    assert (tmp_path / "pl.png").stat().st_size > 1000

    results, curves = make_sweep(tmp_path)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    save_figure(fits.plot_frontier(fits.compute_frontier(curves, results)), tmp_path / "out" / "frontier.png",
                     tb_writer=writer, tag="fits/frontier")
    writer.close()
    assert (tmp_path / "out" / "frontier.png").exists()
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 1000 for p in (tmp_path / "tb").iterdir())
