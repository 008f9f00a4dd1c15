"""The reproduction report: one section per claim of the paper, generated from a sweep's tables.

    python -m sae_lit.analysis.report --sweep configs/sweeps/cpu.yaml [--out reports]

Reads ``<root>/results.csv`` and ``<root>/curves.csv`` (sae_lit.analysis.sweep) and each run's
``eval/report.json``; writes ``<out>/reproduction.md`` and ``<out>/figures/*.png`` and logs
the figures to TensorBoard under ``<root>/report``. Every verdict is computed from the
table by the rule stated in its section (sae_lit.analysis.verdicts: a comparison holds only
when its across-seed or bootstrap interval excludes the other side); nothing is tuned to agree
with the paper. Each section says how many runs, seeds and samples its figures rest on.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from jsonargparse import ArgumentParser

from sae_lit.analysis import dead_latents as dl
from sae_lit.analysis import fits
from sae_lit.analysis.sweep import read_sweep, read_table
from sae_lit.analysis.report_evals import EvalClaims
from sae_lit.analysis.verdicts import (FAILS, HOLDS, LABEL, L1_FAMILIES, MISSING, UNSURE, across_seeds, ci_text, combine,
                                       in_group, judge, mean_of, replicates, seed_of, table)
from sae_lit.common import fmt, log_axes, one_line_errors, run_cli, save_figure, write_text_atomic

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


class Report(EvalClaims):
    def __init__(self, spec: dict, out: Path):
        self.spec = spec
        self.root = Path(spec["root"])
        self.out = out
        self.figdir = out / "figures"
        self.results = read_table(self.root / "results.csv")
        curves_path = self.root / "curves.csv"
        self.curves = read_table(curves_path) if curves_path.exists() else []
        train_curves = self.root / "train_curves.csv"
        self.train_curves = read_table(train_curves) if train_curves.exists() else []
        self.sections: list[str] = []
        self.verdicts: list[tuple[str, str, str]] = []
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

    def verdict(self, claim: str, word: str, why: str, samples: str = "") -> str:
        """``word``: holds / does not hold / inconclusive / not measured (verdicts.py)."""
        assert word in (HOLDS, FAILS, UNSURE, MISSING), word
        self.verdicts.append((claim, word, samples or "–"))
        return f"**Verdict: {word}.** {why}" + (f"\n\n*Samples:* {samples}" if samples else "")

    def eval_details(self, row) -> dict:
        path = Path(str(row.get("log_dir", ""))) / "eval" / "report.json"
        return json.loads(path.read_text()).get("details", {}) if path.is_file() else {}

    def add(self, title: str, claim: str, body: list[str]) -> None:
        self.sections.append(f"## {title}\n\n*Claim (paper):* {claim}\n\n" + "\n\n".join(body))

    # -------------------------------------------------------------------- claims
    def baselines(self) -> None:
        rows = in_group(self.results, "baselines")
        claim = "TopK has the best NMSE–L0 frontier and the best ΔCE at equal NMSE among ReLU, ProLU and Gated."
        topk_all = fits.select(rows, activation="topk")
        if len(topk_all) < 2:
            return self.add("1. TopK against the L1 baselines", claim, [self.verdict(claim, MISSING, "too few TopK runs")])
        by_seed: dict[int, list] = {}
        for t in topk_all:
            by_seed.setdefault(seed_of(t), []).append(t)
        seeds = sorted(by_seed)

        def reference(r):  # the TopK k-series trained with the run's seed (seed 0's when it has none)
            return sorted(by_seed.get(seed_of(r), by_seed[seeds[0]]), key=lambda t: t["val/l0"])

        n = topk_all[0]["num_latents"]
        fig, ax = log_axes(f"NMSE vs L0 (n={n})", "L0 (validation)", "NMSE (validation)")
        fig2, ax2 = log_axes(f"Downstream loss vs NMSE (n={n})", "NMSE (validation)", "ΔCE (nats)")
        lines, words, compared = [], [], 0
        for act in ("topk", *L1_FAMILIES, "batchtopk", "matryoshka"):
            rs = sorted(fits.select(rows, activation=act), key=lambda r: r["val/l0"])
            if not rs:
                continue
            style = "o" if act in ("topk", *L1_FAMILIES) else "s"
            ax.plot([r["val/l0"] for r in rs], [r["val/nmse"] for r in rs], style, label=LABEL[act])
            ce = [r for r in rs if r.get("eval/delta_ce") is not None]
            ax2.plot([r["val/nmse"] for r in ce], [max(r["eval/delta_ce"], 1e-4) for r in ce], style, label=LABEL[act])
            for reps in sorted(replicates(rs).values(), key=lambda g: np.mean([r["val/l0"] for r in g])):
                d_mse, d_ce = [], []
                for r in reps:
                    ref = reference(r)
                    m = _interp_loglog(r["val/l0"], [t["val/l0"] for t in ref], [t["val/nmse"] for t in ref])
                    tce = [t for t in ref if t.get("eval/delta_ce") is not None]
                    c = (_interp_loglog(r["val/nmse"], [t["val/nmse"] for t in tce], [max(t["eval/delta_ce"], 1e-6) for t in tce])
                         if len(tce) >= 2 and r.get("eval/delta_ce") is not None else None)
                    d_mse.append(None if m is None else r["val/nmse"] - m)
                    d_ce.append(None if c is None else r["eval/delta_ce"] - c)
                iv_mse, iv_ce = across_seeds(d_mse), across_seeds(d_ce)
                if act in L1_FAMILIES:
                    for iv in (iv_mse, iv_ce):
                        if iv.get("n"):
                            compared += 1
                            words.append(judge(iv, +1))
                r0 = reps[0]
                lines.append([LABEL[act], fmt(r0.get("l1_coeff")) if act in L1_FAMILIES else f"k={r0['k']}", len(reps),
                              np.mean([r["val/l0"] for r in reps]), np.mean([r["val/nmse"] for r in reps]),
                              ci_text(iv_mse) if act != "topk" else "",
                              mean_of([r.get("eval/delta_ce") for r in reps]), ci_text(iv_ce) if act != "topk" else "",
                              mean_of([r.get("eval/shrinkage") for r in reps]), mean_of([r.get("val/dead_frac") for r in reps])])
        ax.legend(fontsize=8)
        ax2.legend(fontsize=8)
        body = [
            f"Runs: the `baselines` group, n = {n}, same tokens, data and schedule; L1 runs at several penalty "
            f"coefficients; seeds {seeds}. *NMSE − TopK's at same L0* and *ΔCE − TopK's at same NMSE* interpolate "
            "the TopK k-series of the same seed (log-log) at the run's L0 or NMSE, then take the mean over seeds "
            "with its 95% t interval (empty where the run lies outside TopK's range; positive = TopK better).",
            table(["SAE", "setting", "seeds", "L0", "NMSE", "NMSE − TopK's at same L0", "ΔCE",
                   "ΔCE − TopK's at same NMSE", "shrinkage", "dead (val)"], lines),
            self.figure(fig, "baselines_nmse_l0") + " " + self.figure(fig2, "baselines_dce_nmse"),
        ]
        word = combine(words) if words else MISSING
        why = (f"Of {compared} comparisons of an L1 baseline with TopK, {words.count(HOLDS)} favour TopK beyond their "
               f"interval, {words.count(FAILS)} favour the baseline and {words.count(UNSURE)} are inconclusive (one seed "
               "gives no interval). The rule: holds if every comparison favours TopK beyond its interval, does not hold "
               "if any favours the baseline beyond it.")
        samples = f"{len(rows)} runs ({len(seeds)} seed(s)); NMSE on the 100k-token validation split, ΔCE on held-out contexts"
        body.append(self.verdict(claim, word, why, samples))
        self.add("1. TopK against the L1 baselines", claim, body)

    def dead_latents(self) -> None:
        rows = in_group(self.results, "dead_latents")
        claim = "Tied init + AuxK keep dead latents few; without them many latents die."
        if not rows:
            return self.add("2. Dead latents", claim, [self.verdict(claim, MISSING, "no runs")])
        name = {(True, True): "both", (False, False): "neither", (True, False): "tied only", (False, True): "AuxK only"}
        lines, per = [], {}
        for reps in sorted(replicates(rows).values(), key=lambda g: (g[0]["k"], -bool(g[0]["tied_init"]), -g[0]["auxk_alpha"])):
            r = reps[0]
            tied, aux = bool(r["tied_init"]), r["auxk_alpha"] > 0
            dead = {seed_of(x): x["train/dead_frac_end"] for x in reps}
            per.setdefault(r["k"], {})[name[(tied, aux)]] = dead
            lines.append([r["k"], "yes" if tied else "no", "yes" if aux else "no", len(reps),
                          ci_text(across_seeds(list(dead.values()))), mean_of([x["val/dead_frac"] for x in reps]),
                          mean_of([x["val/nmse"] for x in reps])])
        n, dt = rows[0]["num_latents"], rows[0]["dead_tokens"]
        body = [f"n = {n}, {rows[0]['tokens']:,} training tokens. *Dead (train)*: no firing in the last {dt:,} "
                "training tokens at the end of training (the AuxK criterion), mean over seeds [95% t interval]; "
                "*dead (val)*: never fired on the 100k-token validation split.",
                table(["k", "tied init", "AuxK", "seeds", "dead (train)", "dead (val)", "NMSE"], lines)]
        many, halved, notes = {}, {}, []
        for kk, p in sorted(per.items()):
            if "both" not in p or "neither" not in p:
                continue
            common = sorted(set(p["both"]) & set(p["neither"]))
            many[kk] = across_seeds([p["neither"][s] - 0.05 for s in common])
            halved[kk] = across_seeds([p["neither"][s] / 2 - p["both"][s] for s in common])
            notes.append(f"k={kk}: neither − 5% = {ci_text(many[kk], 3)}, neither/2 − both = {ci_text(halved[kk], 3)}")
        k_many = [kk for kk in many if judge(many[kk], +1) == HOLDS]
        k_few = [kk for kk in many if judge(many[kk], +1) == FAILS]
        unsure = [kk for kk in many if kk not in k_many and kk not in k_few]
        if not many:
            word = MISSING
        elif any(judge(halved[kk], +1) == FAILS for kk in k_many) or len(k_few) == len(many):
            word = FAILS
        elif k_many and all(judge(halved[kk], +1) == HOLDS for kk in k_many) and \
                not any(judge(halved[kk], +1) == FAILS for kk in unsure):
            word = HOLDS
        else:
            word = UNSURE
        each = []
        for kk, p in sorted(per.items()):
            if {"both", "tied only", "AuxK only"} <= set(p):
                m = {key: np.mean(list(v.values())) for key, v in p.items()}
                each.append(f"k={kk}: AuxK alone (tied init on) {m['tied only']:.1%} → {m['both']:.1%}, tied init alone "
                            f"(AuxK on) {m['AuxK only']:.1%} → {m['both']:.1%}")
        if each:
            body.append("Each trick on its own, mean dead (train) without → with it: " + "; ".join(each) + ".")
        why = ("; ".join(notes) + ". The rule: holds if at some k the run without the tricks has more than 5% dead "
               "beyond its interval, and at every such k the tricks at least halve it beyond its interval; does not hold "
               "if at such a k they clearly do not, or if no k has many dead. The paper's contrast (7% vs 90%) is at 16M "
               f"latents after billions of tokens; this is {n} latents after ~1M tokens.")
        seeds = sorted({seed_of(r) for r in rows})
        body.append(self.verdict(claim, word, why, f"{len(rows)} runs, seeds {seeds}; across-seed t intervals"))
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
        body += self.dead_latent_study(rows + variants)
        self.add("2. Dead latents: tied init and AuxK", claim, body)

    def dead_latent_study(self, rows: list[dict]) -> list[str]:
        """Before/after the training-exactness fixes, the one-change ablations at k = 8, the
        dead fraction and the dead latents' distance to the firing threshold over training."""
        body = []
        before_path = self.out / "dead_latents_before.csv"
        if before_path.exists():
            before = {r["run"]: r for r in read_table(before_path)}
            lines = []
            for r in sorted(rows, key=lambda r: (r["k"], -bool(r["tied_init"]), -r["auxk_alpha"], r["run"])):
                b = before.get(r["run"])  # run names spell out the settings
                if b is None:
                    continue
                lines.append([r["run"], r["k"], "yes" if r["tied_init"] else "no", fmt(r["auxk_alpha"], 3),
                              f"{b['train/dead_frac_end']:.1%} → {r['train/dead_frac_end']:.1%}",
                              f"{b['val/dead_frac']:.1%} → {r['val/dead_frac']:.1%}",
                              f"{fmt(b['val/nmse'])} → {fmt(r['val/nmse'])}"])
            if lines:
                body.append("Before → after the training-exactness fixes (dead mask after this batch's firings, AuxK "
                            "reaching b_pre, no extra n_dead/k_aux scale, bias-corrected EMA; same cache, same "
                            "batches):\n\n" + table(["run", "k", "tied init", "AuxK α", "dead (train)", "dead (val)", "NMSE"],
                                                      lines))
        base = next((r for r in in_group(rows, "dead_latents") if r["k"] == 8 and r["tied_init"] and r["auxk_alpha"] > 0),
                    None)
        pairs = dl.paired_ablations(in_group(self.results, "dead_latent_ablations") + rows)
        if base is not None and pairs:
            lines = []
            for p in pairs:
                on, off = p["on"], p["off"]
                lines.append([dl.describe(on, base), int(on["tokens"]),
                              f"{on['train/dead_frac_end']:.1%}", "–" if off is None else f"{off['train/dead_frac_end']:.1%}",
                              f"{on['val/dead_frac']:.1%}", "–" if off is None else f"{off['val/dead_frac']:.1%}",
                              fmt(on["val/nmse"]), "–" if off is None else fmt(off["val/nmse"])])
            body.append("One change at a time against the k = 8 run (n 8192, tied init, 200k-token dead window, "
                        f"lr {fmt(base['lr'], 3)}), AuxK on and off:\n\n" + table(
                            ["change", "tokens", "dead (train) AuxK on", "off", "dead (val) on", "off", "NMSE on", "off"],
                            lines))
            paired = [p for p in pairs if p["off"] is not None]
            higher = [p for p in paired if p["on"]["train/dead_frac_end"] > p["off"]["train/dead_frac_end"] + 0.02]
            lower = [p for p in paired if p["on"]["train/dead_frac_end"] < p["off"]["train/dead_frac_end"] - 0.02]
            body.append(f"*Does AuxK lower the dead fraction here?* In {len(higher)} of {len(paired)} paired settings AuxK "
                        f"leaves more latents dead (by more than 2 points, AuxK criterion), in {len(lower)} fewer; one "
                        "seed per setting, so no intervals. " + (
                            "No CPU-sized setting measured here shows the paper's effect." if paired and not lower else
                            "Settings where it helps: " + "; ".join(dl.describe(p["on"], base) for p in lower) + "."))
        k8 = {}
        for r in in_group(rows, "dead_latents"):
            if r["k"] == 8:
                k8[f"{'tied' if r['tied_init'] else 'untied'} init, AuxK {'on' if r['auxk_alpha'] > 0 else 'off'}"] = r["run"]
        if self.train_curves and k8:
            body.append(self.figure(dl.dead_fraction_figure(self.train_curves, k8), "dead_fraction_k8"))
            on = {k: v for k, v in k8.items() if k.endswith("on")}
            if any(c.get("train/dead_margin_median") is not None for c in self.train_curves):
                body.append(self.figure(dl.margin_figure(self.train_curves, on), "dead_margin_k8"))
        return body

    def scaling(self) -> None:
        rows = [r for r in in_group(self.results, "nk") if r.get("val/nmse")]
        claim = "NMSE follows a power law in n and k with an irreducible term."
        if len(rows) < 7:
            return self.add("7. Scaling laws", claim, [self.verdict(claim, MISSING, f"{len(rows)} runs in the nk group")])
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
        # beta_n + gamma log k, negative at every k measured. Its stderr is bounded without the
        # fit's covariance (se(a + b c) <= se(a) + |c| se(b) whatever their correlation), so the
        # interval is conservative.
        slopes = {}
        for kk in sorted(set(k)):
            v = fit.params["beta_n"] + fit.params["gamma"] * math.log(kk)
            se = fit.stderr["beta_n"] + abs(math.log(kk)) * fit.stderr["gamma"]
            slopes[int(kk)] = {"mean": v, "lo": v - 1.96 * se, "hi": v + 1.96 * se}
        body.append("Slope of the reducible term in log n at each k (β_n + γ log k; negative = more latents help), with "
                    "a conservative 95% interval: " + ", ".join(f"k={kk}: {ci_text(v, 3)}" for kk, v in slopes.items()) + ".")
        # ... and the data themselves: NMSE may not rise as n doubles at fixed k (judged across
        # seeds where the grid has replicates; a single run's step is listed, not judged).
        rises, rise_words = [], []
        for kk in sorted(set(k)):
            by_n: dict[float, dict[int, float]] = {}
            for r in rows:
                if r["k"] == kk:
                    by_n.setdefault(r["num_latents"], {})[seed_of(r)] = r["val/nmse"]
            ns = sorted(by_n)
            for a, b in zip(ns, ns[1:]):
                common = sorted(set(by_n[a]) & set(by_n[b]))
                iv = across_seeds([by_n[b][s] - by_n[a][s] for s in common])
                if iv.get("mean", 0) > 0:
                    rises.append(f"k={int(kk)}: n={int(a)}→{int(b)} {ci_text(iv, 3)}")
                rise_words.append(judge(iv, -1) if len(common) >= 2 else None)
        body.append("Measured NMSE rising with n at fixed k: " + ("; ".join(rises) if rises else "none") + ".")
        slope_words = [judge(v, -1) for v in slopes.values()]
        judged = [w for w in rise_words if w is not None]
        if fit.r2 < 0.95 or FAILS in slope_words or FAILS in judged:
            word = FAILS
        else:
            word = combine(slope_words + [w for w in judged if w != UNSURE])
        body.append(self.verdict(claim, word, f"the joint law explains {fit.r2:.1%} of the variance of log NMSE; the "
                                 f"reducible term's slope in log n is below 0 beyond its interval at {slope_words.count(HOLDS)} "
                                 f"of {len(slope_words)} k; {len(rises)} measured step(s) in n go up. The rule: holds if "
                                 "R² ≥ 0.95 (the law describes the data) and the fitted reducible term falls with n at every "
                                 "k beyond its interval; does not hold if R² < 0.95, a slope is above 0 beyond its interval, "
                                 "or a measured step in n goes up beyond its across-seed interval. With 4 sizes and ~1M "
                                 "tokens per run the coefficients are loosely determined, and larger dictionaries are "
                                 "further from convergence at a fixed token budget.",
                                 f"{len(rows)} runs ({len(set(n))} sizes × {len(set(k))} k), "
                                 f"{len({seed_of(r) for r in rows})} seed(s)"))
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
    def write(self, commands: list[str], provenance: str | None = None) -> Path:
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
            *([f"*Where the rows come from:* {Path(provenance).read_text().strip()}"] if provenance else []),
            "## Summary\n\nA verdict holds or fails only when the comparison's interval (across seeds, or the eval's "
            "bootstrap) excludes the other side; otherwise it is inconclusive.\n\n"
            + table(["claim", "on SmolLM2-135M", "rests on"], self.verdicts),
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


def reproduction_report(sweep: str, out: str = "reports", provenance: str | None = None) -> Path:
    """Write the reproduction report of a finished sweep.

    Args:
        sweep: the sweep YAML whose results to report.
        out: output folder (reproduction.md, figures/).
        provenance: a markdown file saying where the table's rows come from, when they were not all
            produced by one run of the sweep (e.g. some groups rerun after a fix); quoted under the header.
    """
    spec = read_sweep(sweep)
    if not (Path(spec["root"]) / "results.csv").is_file():
        raise FileNotFoundError(f"{Path(spec['root']) / 'results.csv'} not found: run `python -m sae_lit.analysis.sweep --config "
                                f"{sweep}` first")
    commands = [f"python -m sae_lit.analysis.sweep --config {sweep}",
                f"python -m sae_lit.analysis.report --sweep {sweep} --out {out}"
                + (f" --provenance {provenance}" if provenance else "")]
    path = Report(spec, Path(out)).write(commands, provenance)
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
