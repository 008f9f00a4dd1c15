"""The reproduction report: one section per claim of the paper, generated from a sweep's tables.

    python -m sae_lit.analysis.report --sweep configs/sweeps/cpu.yaml [--out reports]

Reads ``<root>/results.csv`` and ``<root>/curves.csv`` (sae_lit.analysis.sweep) and each run's
``eval/report.json``; writes ``<out>/reproduction.md`` and ``<out>/figures/*.png`` and logs
the figures to TensorBoard under ``<root>/report``. Every verdict is computed from the
table by the rule stated in its section; nothing is tuned to agree with the paper.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from jsonargparse import ArgumentParser

from sae_lit.analysis import fits
from sae_lit.analysis.sweep import read_sweep, read_table
from sae_lit.common import fmt, log_axes, one_line_errors, run_cli, save_figure, write_text_atomic

L1_FAMILIES = ("relu", "prolu", "gated")
LABEL = {"topk": "TopK", "relu": "ReLU+L1", "prolu": "ProLU", "gated": "Gated", "batchtopk": "BatchTopK",
         "matryoshka": "Matryoshka BatchTopK"}


def in_group(rows, group):
    return [r for r in rows if group in str(r.get("groups", "")).split(";")]


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(out)


def _interp_loglog(x, xs, ys):
    """y at x along the polyline (xs, ys) in log-log space; None outside its range."""
    if x is None or x <= 0:
        return None
    order = np.argsort(xs)
    xs, ys = np.log(np.asarray(xs, float)[order]), np.log(np.asarray(ys, float)[order])
    lx = math.log(x)
    if lx < xs[0] or lx > xs[-1]:
        return None
    return float(math.exp(np.interp(lx, xs, ys)))


class Report:
    def __init__(self, spec: dict, out: Path):
        self.spec = spec
        self.root = Path(spec["root"])
        self.out = out
        self.figdir = out / "figures"
        self.results = read_table(self.root / "results.csv")
        curves_path = self.root / "curves.csv"
        self.curves = read_table(curves_path) if curves_path.exists() else []
        self.sections: list[str] = []
        self.verdicts: list[tuple[str, str]] = []
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.root / "report"))
        except ImportError:  # tensorboard is a dependency; keep the report usable without it
            pass

    # -------------------------------------------------------------------- helpers
    def figure(self, fig, name: str) -> str:
        save_figure(fig, self.figdir / f"{name}.png", tb_writer=self.writer, tag=f"report/{name}")
        return f"![{name}](figures/{name}.png)"

    def verdict(self, claim: str, holds: bool | None, why: str) -> str:
        word = "holds" if holds else "does not hold" if holds is not None else "not measured"
        self.verdicts.append((claim, word))
        return f"**Verdict: {word}.** {why}"

    def eval_details(self, row) -> dict:
        path = Path(str(row.get("log_dir", ""))) / "eval" / "report.json"
        return json.loads(path.read_text()).get("details", {}) if path.is_file() else {}

    def add(self, title: str, claim: str, body: list[str]) -> None:
        self.sections.append(f"## {title}\n\n*Claim (paper):* {claim}\n\n" + "\n\n".join(body))

    # -------------------------------------------------------------------- claims
    def baselines(self) -> None:
        rows = in_group(self.results, "baselines")
        topk = sorted(fits.select(rows, activation="topk"), key=lambda r: r["val/l0"])
        claim = "TopK has the best NMSE–L0 frontier and the best ΔCE at equal NMSE among ReLU, ProLU and Gated."
        if len(topk) < 2:
            return self.add("1. TopK against the L1 baselines", claim, [self.verdict(claim, None, "too few TopK runs")])
        n = topk[0]["num_latents"]
        fig, ax = log_axes(f"NMSE vs L0 (n={n})", "L0 (validation)", "NMSE (validation)")
        fig2, ax2 = log_axes(f"Downstream loss vs NMSE (n={n})", "NMSE (validation)", "ΔCE (nats)")
        lines, wins_mse, wins_ce, cmp_mse, cmp_ce = [], 0, 0, 0, 0
        for act in ("topk", *L1_FAMILIES, "batchtopk", "matryoshka"):
            rs = sorted(fits.select(rows, activation=act), key=lambda r: r["val/l0"])
            if not rs:
                continue
            style = "o-" if act in ("topk", *L1_FAMILIES) else "s"
            ax.plot([r["val/l0"] for r in rs], [r["val/nmse"] for r in rs], style, label=LABEL[act])
            ce = [r for r in rs if r.get("eval/delta_ce") is not None]
            ax2.plot([r["val/nmse"] for r in ce], [max(r["eval/delta_ce"], 1e-4) for r in ce], style, label=LABEL[act])
            for r in rs:
                ref_mse = _interp_loglog(r["val/l0"], [t["val/l0"] for t in topk], [t["val/nmse"] for t in topk])
                tce = [t for t in topk if t.get("eval/delta_ce") is not None]
                ref_ce = (_interp_loglog(r["val/nmse"], [t["val/nmse"] for t in tce], [max(t["eval/delta_ce"], 1e-6) for t in tce])
                          if len(tce) >= 2 and r.get("eval/delta_ce") is not None else None)
                if act in L1_FAMILIES:
                    if ref_mse is not None:
                        cmp_mse += 1
                        wins_mse += ref_mse < r["val/nmse"]
                    if ref_ce is not None:
                        cmp_ce += 1
                        wins_ce += ref_ce < r["eval/delta_ce"]
                lines.append([LABEL[act], fmt(r.get("l1_coeff")) if act in L1_FAMILIES else f"k={r['k']}", r["val/l0"],
                              r["val/nmse"], ref_mse if act != "topk" else None, r.get("eval/delta_ce"),
                              ref_ce if act != "topk" else None, r.get("eval/shrinkage"), r.get("val/dead_frac")])
        ax.legend(fontsize=8)
        ax2.legend(fontsize=8)
        body = [
            f"Runs: the `baselines` group, n = {n}, same tokens, data and schedule; L1 runs at several penalty "
            "coefficients. *TopK NMSE at same L0* and *TopK ΔCE at same NMSE* interpolate the TopK k-series "
            "(log-log) at the baseline's L0 or NMSE; empty where the baseline lies outside TopK's range. "
            "ΔCE is on 16 held-out contexts of 128 tokens (BOS excluded).",
            table(["SAE", "setting", "L0", "NMSE", "TopK NMSE at same L0", "ΔCE", "TopK ΔCE at same NMSE",
                   "shrinkage", "dead (val)"], lines),
            self.figure(fig, "baselines_nmse_l0") + " " + self.figure(fig2, "baselines_dce_nmse"),
        ]
        holds = cmp_mse > 0 and wins_mse == cmp_mse and (cmp_ce == 0 or wins_ce == cmp_ce)
        why = (f"TopK has the lower NMSE at equal L0 for {wins_mse} of {cmp_mse} L1-baseline runs inside its L0 range, "
               f"and the lower ΔCE at equal NMSE for {wins_ce} of {cmp_ce}. The rule: holds only if TopK wins every "
               "comparison that can be made.")
        body.append(self.verdict(claim, holds, why))
        self.add("1. TopK against the L1 baselines", claim, body)

    def dead_latents(self) -> None:
        rows = in_group(self.results, "dead_latents")
        claim = "Tied init + AuxK keep dead latents few; without them many latents die."
        if not rows:
            return self.add("2. Dead latents", claim, [self.verdict(claim, None, "no runs")])
        lines, pairs = [], {}
        for r in sorted(rows, key=lambda r: (r["k"], -bool(r["tied_init"]), -r["auxk_alpha"])):
            tied, aux = bool(r["tied_init"]), r["auxk_alpha"] > 0
            lines.append([r["k"], "yes" if tied else "no", "yes" if aux else "no", r["train/dead_frac_end"],
                          r["val/dead_frac"], r["val/nmse"]])
            name = {(True, True): "both", (False, False): "neither", (True, False): "tied only", (False, True): "AuxK only"}
            pairs.setdefault(r["k"], {})[name[(tied, aux)]] = r["train/dead_frac_end"]
        n, dt = rows[0]["num_latents"], rows[0]["dead_tokens"]
        body = [f"n = {n}, {rows[0]['tokens']:,} training tokens. *Dead (train)*: no firing in the last {dt:,} "
                "training tokens at the end of training (the AuxK criterion); *dead (val)*: never fired on the "
                "100k-token validation split.",
                table(["k", "tied init", "AuxK", "dead (train)", "dead (val)", "NMSE"], lines)]
        many = {kk: p for kk, p in pairs.items() if "both" in p and p.get("neither", 0) >= 0.05}
        holds = bool(many) and all(p["both"] <= p["neither"] / 2 for p in many.values())
        detail = "; ".join(f"k={kk}: {p.get('both', float('nan')):.1%} with both, {p.get('neither', float('nan')):.1%} "
                           "with neither" for kk, p in sorted(pairs.items()))
        each = "; ".join(f"k={kk}: AuxK alone (tied init on) {p['tied only']:.1%} → {p['both']:.1%}, tied init alone "
                         f"(AuxK on) {p['AuxK only']:.1%} → {p['both']:.1%}" for kk, p in sorted(pairs.items())
                         if {"both", "tied only", "AuxK only"} <= set(p))
        if each:
            body.append("Each trick on its own, dead (train) without → with it: " + each + ".")
        why = (f"{detail}. The rule: holds if at some k the run without the tricks has ≥ 5% dead, and at every such k "
               "the tricks at least halve it. The paper's contrast (7% vs 90%) is at 16M latents after billions of "
               f"tokens; this is {n} latents after ~1M tokens.")
        body.append(self.verdict(claim, holds, why))
        body.append("Whether a result here is the method's or the implementation's: "
                    "`benchmarks/quality_vs_reference.py` trains a dense reference written from the paper's "
                    "equations (sharing no code with sae_lit) on the same batches and reports its NMSE and dead "
                    "fraction next to ours; its docstring has the command for the k = 8 run above.")
        variants = in_group(self.results, "auxk_settings")
        if variants:
            body.append("AuxK's own settings (tied init on), from the `auxk_settings` group:\n\n" + table(
                ["k", "settings", "dead (train)", "dead (val)", "NMSE"],
                [[r["k"], ", ".join(f"{key.split('.')[-1]}={v}" for key, v in json.loads(r["settings"]).items()
                                    if key in ("model.sae.k_aux", "model.auxk_alpha") and v != 0.03125),
                  r["train/dead_frac_end"], r["val/dead_frac"], r["val/nmse"]] for r in variants]))
        self.add("2. Dead latents: tied init and AuxK", claim, body)

    def progressive(self) -> None:
        rows = in_group(self.results, "multi_topk")
        claim = "Multi-TopK gives a progressive code (good at k' > k and with a JumpReLU threshold); plain TopK does not."
        fig, ax = log_axes("Progressive recovery", "L0 at inference", "NMSE")
        lines, res = [], {}
        for r in sorted(rows, key=lambda r: bool(r["multi_topk"])):
            d = self.eval_details(r).get("progressive", {})
            pts = sorted((int(kp), v["nmse"], v["l0"]) for kp, v in d.get("topk", {}).items())
            name = "Multi-TopK" if r["multi_topk"] else "TopK"
            if pts:
                ax.plot([p[2] for p in pts], [p[1] for p in pts], "o-", label=f"{name} at k'")
            if "jumprelu" in d:
                ax.plot([d["jumprelu"]["l0"]], [d["jumprelu"]["nmse"]], "s", label=f"{name} JumpReLU")
            res[name] = r
            lines.append([name, r.get("eval/progressive_nmse_k"), r.get("eval/progressive_nmse_4k"),
                          r.get("eval/progressive_nmse_jumprelu"), r["val/nmse"]])
        ax.legend(fontsize=8)
        body = [f"n = {rows[0]['num_latents'] if rows else '?'}, k = {rows[0]['k'] if rows else '?'}; NMSE on 4096 "
                "held-out tokens at k' = k and 4k, and with one JumpReLU threshold calibrated on training tokens to "
                "mean L0 = k.",
                table(["SAE", "NMSE at k", "NMSE at 4k", "NMSE JumpReLU", "val NMSE"], lines)]
        if res:
            body.append(self.figure(fig, "progressive"))
        holds, why = None, "a run is missing"
        if "TopK" in res and "Multi-TopK" in res:
            t, m = res["TopK"], res["Multi-TopK"]
            t_up = t["eval/progressive_nmse_4k"] > t["eval/progressive_nmse_k"]
            m_ok = m["eval/progressive_nmse_4k"] <= m["eval/progressive_nmse_k"]
            holds = t_up and m_ok
            why = (f"TopK's NMSE goes from {t['eval/progressive_nmse_k']:.3f} at k to {t['eval/progressive_nmse_4k']:.3f} "
                   f"at 4k; Multi-TopK's from {m['eval/progressive_nmse_k']:.3f} to {m['eval/progressive_nmse_4k']:.3f}. "
                   "The rule: holds if TopK gets worse at 4k and Multi-TopK does not.")
        body.append(self.verdict(claim, holds, why))
        self.add("3. Progressive codes: Multi-TopK", claim, body)

    def shrinkage(self) -> None:
        rows = [r for r in in_group(self.results, "baselines") if r.get("eval/shrinkage") is not None]
        claim = "TopK latents are not shrunk; ReLU+L1 latents are (refitting their values makes them larger)."
        topk = [r["eval/shrinkage"] for r in rows if r["activation"] == "topk"]
        relu = [r["eval/shrinkage"] for r in rows if r["activation"] == "relu"]
        lines = [[LABEL[r["activation"]], fmt(r["l1_coeff"]) if r["activation"] in L1_FAMILIES else f"k={r['k']}",
                  r["val/l0"], r["eval/shrinkage"]] for r in sorted(rows, key=lambda r: (r["activation"], r["val/l0"]))]
        body = ["*Shrinkage*: mean over held-out tokens of ‖refit values‖ / ‖values‖, where the refit keeps the "
                "decoder and each token's active latents and re-solves their values by non-negative least squares. "
                "1 = no shrinkage; > 1 = the encoder's values were too small.",
                table(["SAE", "setting", "L0", "shrinkage ratio"], lines)]
        holds, why = None, "missing TopK or ReLU runs"
        if topk and relu:
            holds = max(abs(t - 1) for t in topk) < min(r - 1 for r in relu)
            why = (f"TopK ratios {min(topk):.3f}–{max(topk):.3f}, ReLU+L1 {min(relu):.3f}–{max(relu):.3f}. The rule: "
                   "holds if every ReLU+L1 run is further above 1 than any TopK run is from 1.")
        body.append(self.verdict(claim, holds, why))
        self.add("4. Activation shrinkage", claim, body)

    def n_series(self) -> None:
        rows = sorted(in_group(self.results, "n_series"), key=lambda r: r["num_latents"])
        claim = "Probe loss and N2G explanation quality improve as the number of latents grows."
        lines = [[r["num_latents"], r["val/nmse"], r.get("eval/probe_loss"), r.get("eval/probe_loss_residual"),
                  r.get("eval/n2g_precision"), r.get("eval/n2g_recall"), r.get("eval/n2g_f1")] for r in rows]
        lrs = ", ".join(f"n={int(r['num_latents'])}: {r['lr']:.3g}" for r in rows)
        body = [f"k = 32; lr {lrs}. Probe loss: mean over the built-in binary tasks of the best single latent's held-out "
                "cross-entropy (chance 0.693; the residual column is the same with raw residual channels). N2G on "
                "32 sampled latents per SAE.",
                table(["n", "NMSE", "probe loss", "probe loss (residual channels)", "N2G precision", "N2G recall",
                       "N2G F1"], lines)]
        holds, why = None, "fewer than 3 sizes measured"
        probe = [(r["num_latents"], r["eval/probe_loss"]) for r in rows if r.get("eval/probe_loss") is not None]
        f1 = [(r["num_latents"], r["eval/n2g_f1"]) for r in rows if r.get("eval/n2g_f1") is not None]
        if len(probe) >= 3 and len(f1) >= 3:
            fig, ax = log_axes("Probe loss and N2G F1 vs n", "latents n", "value", logy=False)
            ax.plot(*zip(*probe), "o-", label="probe loss (lower is better)")
            ax.plot(*zip(*f1), "s-", label="N2G F1 (higher is better)")
            ax.legend(fontsize=8)
            body.append(self.figure(fig, "probe_n2g_vs_n"))
            rho_p, rho_f = _spearman(*zip(*probe)), _spearman(*zip(*f1))
            holds = rho_p < 0 and rho_f > 0
            why = (f"Spearman rank correlation with n: probe loss {rho_p:+.2f}, N2G F1 {rho_f:+.2f}. The rule: holds if "
                   "probe loss falls (ρ < 0) and N2G F1 rises (ρ > 0) with n.")
        body.append(self.verdict(claim, holds, why))
        self.add("5. Probe loss and explainability vs n", claim, body)

    def ablation(self) -> None:
        rows = [r for r in in_group(self.results, "ablation") if r.get("eval/ablation_sparsity") is not None]
        claim = "Ablating one SAE latent has sparser downstream effects than ablating one residual channel."
        if not rows:
            return self.add("6. Ablation sparsity", claim, [self.verdict(claim, None, "no ablation eval in the sweep")])
        r = rows[0]
        s, c = r["eval/ablation_sparsity"], r["eval/ablation_sparsity_residual"]
        body = [f"n = {r['num_latents']}, k = {r['k']}. Sparsity = (‖Δlogits‖₁/‖Δlogits‖₂)² / (V·T) over all later "
                "positions of a 64-token context; lower = sparser.",
                table(["", "SAE latents", "residual channels"], [["ablation sparsity", s, c]]),
                self.verdict(claim, s <= 0.9 * c, f"{s:.3f} for SAE latents against {c:.3f} for channels (paper: "
                             "≈ 0.10–0.14 against ≈ 0.60). The rule: holds if the SAE's is at least 10% lower; a "
                             "smaller gap is within the noise of 64 sampled (latent, token) pairs.")]
        self.add("6. Ablation sparsity", claim, body)

    def scaling(self) -> None:
        rows = [r for r in in_group(self.results, "nk") if r.get("val/nmse")]
        claim = "NMSE follows a power law in n and k with an irreducible term."
        if len(rows) < 7:
            return self.add("7. Scaling laws", claim, [self.verdict(claim, None, f"{len(rows)} runs in the nk group")])
        n = np.array([r["num_latents"] for r in rows], float)
        k = np.array([r["k"] for r in rows], float)
        L = np.array([r["val/nmse"] for r in rows], float)
        fit = fits.fit_nk(n, k, L)
        lrs = ", ".join(f"n={int(nn)}: {lr:.3g}" for nn, lr in sorted({(r["num_latents"], r["lr"]) for r in rows}))
        body = [f"{len(rows)} TopK runs (n × k grid, {rows[0]['tokens']:,} tokens each; lr {lrs}). Joint fit of the paper's form "
                "L(n,k) = exp(α + β_k log k + β_n log n + γ log k log n) + exp(ζ + η log k) in log space:",
                table(["parameter", "ours", "± stderr", "paper (GPT-4)"],
                      [[p, fit.params[p], fit.stderr[p], ref] for p, ref in
                       zip(("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"), (-0.50, 0.26, -0.017, -0.042, -1.32, -0.085))]),
                f"R² (log NMSE) = {fit.r2:.4f} over {fit.n_points} runs; irreducible term at k = 32: "
                f"{float(fit.irreducible(32)):.4f}.",
                self.figure(fits.plot_nk(n, k, L, fit, title="NMSE vs n per k, joint fit"), "scaling_nk")]
        per_k = []
        for kk in sorted(set(k)):
            sel = k == kk
            if sel.sum() >= 4:
                f = fits.fit_power_law_floor(n[sel], L[sel])
                per_k.append([int(kk), f.params["c"], f.params["a"], f.params["b"], f.stderr["b"], f.r2])
        if per_k:
            body += ["Per k, L(n) = c + a·n^(−b):", table(["k", "floor c", "a", "b", "± stderr b", "R² (log)"], per_k)]
        # The law must also say "more latents help": the reducible term's slope in log n,
        # beta_n + gamma log k, negative at every k measured.
        slopes = {int(kk): fit.params["beta_n"] + fit.params["gamma"] * math.log(kk) for kk in sorted(set(k))}
        body.append("Slope of the reducible term in log n at each k (β_n + γ log k; negative = more latents help): "
                    + ", ".join(f"k={kk}: {v:+.3f}" for kk, v in slopes.items()) + ".")
        falling = all(v < 0 for v in slopes.values())
        # ... and the data themselves: NMSE may not rise (beyond 1% noise) as n doubles at fixed k.
        rises = []
        for kk in sorted(set(k)):
            pts = sorted((nn, ll) for nn, ll, kk2 in zip(n, L, k) if kk2 == kk)
            rises += [f"k={int(kk)}: n={int(a[0])}→{int(b[0])} {a[1]:.4f}→{b[1]:.4f}" for a, b in zip(pts, pts[1:])
                      if b[1] > a[1] * 1.01]
        body.append("Measured NMSE rising with n at fixed k (beyond 1%): " + ("; ".join(rises) if rises else "none") + ".")
        holds = fit.r2 >= 0.95 and falling and not rises
        body.append(self.verdict(claim, holds, f"the joint law explains {fit.r2:.1%} of the variance of log NMSE, and the "
                                 f"reducible term {'falls' if falling else 'does not fall'} with n at every k; "
                                 f"{len(rises)} measured step(s) in n go up. The rule: holds if R² ≥ 0.95, the fitted "
                                 "reducible term falls with n at every k and no measured NMSE rises with n. With 4 sizes and ~1M tokens per "
                                 "run the individual coefficients are loosely determined (see the stderrs), and larger "
                                 "dictionaries are further from convergence at a fixed token budget."))
        self.add("7. Scaling laws in n and k", claim, body)
        self.compute_and_lr()

    def compute_and_lr(self) -> None:
        body = []
        topk = [r for r in self.results if r["activation"] == "topk" and not r["multi_topk"] and r["tied_init"]
                and r["auxk_alpha"] > 0 and r["b_dec_init"] == "geometric_median"]
        nk = in_group(topk, "nk")
        fr = fits.compute_frontier(self.curves, nk)
        if fr.fit is not None:
            body += [f"**Compute frontier.** Lower envelope of every validation point of the nk runs (C = 6·d·n·tokens): "
                     f"{fr.fit.summary()}.", self.figure(fits.plot_frontier(fr, title="NMSE vs training compute"), "compute_frontier")]
        conv = [c for c in fits.convergence_table(self.curves, fits.select(nk, k=32)) if c["tokens_to_convergence"]]
        if conv and all(c["censored"] for c in conv):
            body.append(f"**Tokens to convergence** (k = 32): all {len(conv)} runs were still improving at their last "
                        "validation point (within 2% of the final NMSE only there), so no exponent can be measured at "
                        "this token budget.")
        elif len(conv) >= 3:
            cens = sum(bool(c["censored"]) for c in conv)
            x = [c["num_latents"] for c in conv]
            y = [c["tokens_to_convergence"] for c in conv]
            f = fits.fit_power_law(x, y)
            body += [f"**Tokens to convergence** (k = 32; first validation point within 2% of the run's final NMSE, "
                     f"staying there): exponent {f.params['b']:.2f} ± {f.stderr['b']:.2f} (paper ≈ 0.6), R² {f.r2:.3f}; "
                     f"{cens} of {len(conv)} runs met the criterion only at their last point (still improving, so "
                     "the exponent is a lower bound on what full convergence needs).",
                     self.figure(fits.plot_power_law(x, y, f, "latents n", "tokens to convergence"), "tokens_to_convergence")]
        lr = fits.best_lr_per_n(in_group(topk, "lr"))
        if lr.rows:
            body += ["**Best learning rate vs n** (`lr` group, k = 32, lr = multiple × 7e-4·√(2¹⁴/n)):",
                     table(["n", "best lr", "NMSE", "lrs tried", "at edge of range"],
                           [[r["num_latents"], r["best_lr"], r["best_nmse"], r["n_lrs"], "yes" if r["edge"] else "no"]
                            for r in lr.rows])]
            if lr.fit is not None:
                edge = all(r["edge"] for r in lr.rows)
                caveat = (" Every best lr sits at the edge of its range, so this exponent only restates the grid's own "
                          "1/√n scaling: the optimum lies outside the range tried, and the measurement is that at "
                          "~1M tokens the best lr is at least the largest one tried." if edge else "")
                body += [f"Fit best lr ∝ n^b: b = {lr.fit.params['b']:.2f} ± {lr.fit.stderr['b']:.2f} (paper ≈ −0.5), "
                         f"R² {lr.fit.r2:.3f}.{caveat}", self.figure(fits.plot_power_law(
                             [r["num_latents"] for r in lr.rows], [r["best_lr"] for r in lr.rows], lr.fit,
                             "latents n", "best lr"), "best_lr_vs_n")]
        if body:
            self.sections.append("## 8. Compute frontier, convergence and learning rate\n\n*Claim (paper):* L(C) "
                                 "follows a power law with a floor; tokens to convergence grow ~n^0.6; the best lr "
                                 "falls ~1/√n. Measured, no verdict rule (the paper calls these approximate).\n\n"
                                 + "\n\n".join(body))

    def b_pre(self) -> None:
        rows = in_group(self.results, "b_pre")
        if not rows:
            return
        lines = [[r["b_dec_init"], r["val/nmse"], r["val/dead_frac"]] for r in sorted(rows, key=lambda r: r["val/nmse"])]
        self.sections.append("## 9. Ablation: b_pre initialisation\n\n(Not a headline claim; the paper initialises "
                             f"b_pre to the geometric median.) n = {rows[0]['num_latents']}, k = {rows[0]['k']}.\n\n"
                             + table(["b_pre init", "NMSE", "dead (val)"], lines))

    # -------------------------------------------------------------------- output
    def write(self, commands: list[str]) -> Path:
        self.baselines()
        self.dead_latents()
        self.progressive()
        self.shrinkage()
        self.n_series()
        self.ablation()
        self.scaling()
        self.b_pre()
        r0 = self.results[0] if self.results else {}
        head = [
            "# Reproducing Gao et al. (2024) on SmolLM2-135M",
            "Generated by `python -m sae_lit.analysis.report` from the sweep's tables; do not edit by hand. Commands:",
            "```\n" + "\n".join(commands) + "\n```",
            f"Subject: the cache of `{self.spec['base_config']}` (d_in = {r0.get('d_in')}); {len(self.results)} runs, "
            f"{sum(r.get('train_seconds') or 0 for r in self.results) / 60:.0f} min of training in all. Tables, copied "
            f"from `{self.root}/` beside this file: `results.csv` (every metric of every run) and `curves.csv` "
            "(validation NMSE during training).",
            "## Summary\n\n" + table(["claim", "on SmolLM2-135M"], self.verdicts),
        ]
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("results.csv", "curves.csv"):
            if (self.root / name).is_file():
                shutil.copyfile(self.root / name, self.out / name)
        path = self.out / "reproduction.md"
        write_text_atomic(path, "\n\n".join(head + self.sections) + "\n")
        if self.writer is not None:
            self.writer.add_text("report/reproduction", path.read_text())
            self.writer.close()
        return path


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)).astype(float), np.argsort(np.argsort(y)).astype(float)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def reproduction_report(sweep: str, out: str = "reports") -> Path:
    """Write the reproduction report of a finished sweep.

    Args:
        sweep: the sweep YAML whose results to report.
        out: output folder (reproduction.md, figures/).
    """
    spec = read_sweep(sweep)
    if not (Path(spec["root"]) / "results.csv").is_file():
        raise FileNotFoundError(f"{Path(spec['root']) / 'results.csv'} not found: run `python -m sae_lit.analysis.sweep --config "
                                f"{sweep}` first")
    commands = [f"python -m sae_lit.analysis.sweep --config {sweep}", f"python -m sae_lit.analysis.report --sweep {sweep} --out {out}"]
    path = Report(spec, Path(out)).write(commands)
    print(f"Report: {path}")
    return path


def parser() -> ArgumentParser:
    p = one_line_errors(ArgumentParser)(prog="python -m sae_lit.analysis.report", description=__doc__.split("\n\n")[0])
    p.add_function_arguments(reproduction_report, as_group=False)
    return p


def main(argv: list[str] | None = None) -> Path:
    return reproduction_report(**parser().parse_args(argv).as_dict())


if __name__ == "__main__":
    run_cli(main)
