"""The reproduction report's sections on the evaluation suite's claims: progressive codes,
shrinkage, probe loss and N2G against n, ablation sparsity (a mixin of analysis.report.Report,
which provides ``results``, ``figure``, ``verdict``, ``add`` and ``eval_details``)."""
from __future__ import annotations

import math

import numpy as np

from sae_lit.analysis.verdicts import (FAILS, HOLDS, LABEL, L1_FAMILIES, MISSING, UNSURE, ci_text, combine, in_group,
                                       judge, mean_of, metric_interval, replicates, run_ci, slope_text, table, trend)
from sae_lit.common import fmt, log_axes


class EvalClaims:
    def progressive(self) -> None:
        rows = in_group(self.results, "multi_topk")
        claim = "Multi-TopK gives a progressive code (good at k' > k and with a JumpReLU threshold); plain TopK does not."
        fig, ax = log_axes("Progressive recovery", "L0 at inference", "NMSE")
        lines, ivs, words = [], {}, []
        for reps in sorted(replicates(rows).values(), key=lambda g: bool(g[0]["multi_topk"])):
            name = "Multi-TopK" if reps[0]["multi_topk"] else "TopK"
            d = self.eval_details(reps[0]).get("progressive", {})
            pts = sorted((int(kp), v["nmse"], v["l0"]) for kp, v in d.get("topk", {}).items())
            if pts:
                ax.plot([p[2] for p in pts], [p[1] for p in pts], "o-", label=f"{name}, TopK at k'")
            curve = d.get("jumprelu_curve", [])
            if curve:
                ax.plot([c["l0"] for c in curve], [c["nmse"] for c in curve], "s--", label=f"{name}, JumpReLU swept")
            for r in reps:
                if r.get("eval/progressive_topk_4k_minus_k") is None and r.get("eval/progressive_nmse_4k") is not None:
                    r["eval/progressive_topk_4k_minus_k"] = r["eval/progressive_nmse_4k"] - r["eval/progressive_nmse_k"]
            ivs[name] = {what: metric_interval(reps, f"eval/progressive_{what}_4k_minus_k") for what in ("topk", "jumprelu")}
            lines.append([name, len(reps), mean_of([r.get("eval/progressive_nmse_k") for r in reps]),
                          mean_of([r.get("eval/progressive_nmse_4k") for r in reps]), ci_text(ivs[name]["topk"]),
                          mean_of([r.get("eval/progressive_nmse_jumprelu") for r in reps]),
                          mean_of([r.get("eval/progressive_nmse_jumprelu_4k") for r in reps]), ci_text(ivs[name]["jumprelu"]),
                          mean_of([r["val/nmse"] for r in reps])])
        ax.legend(fontsize=7)
        how = sorted({iv.get("how", "") for v in ivs.values() for iv in v.values() if iv})
        body = [f"n = {rows[0]['num_latents'] if rows else '?'}, k = {rows[0]['k'] if rows else '?'}; NMSE on held-out "
                "tokens at k' = k and 4k, and with a JumpReLU threshold swept so that L0 runs from k/2 to 4k (each "
                "threshold calibrated on training tokens). *4k − k*: the change of NMSE from L0 = k to 4k, mean "
                f"[95% interval: {', '.join(how) or '–'}].",
                table(["SAE", "seeds", "NMSE at k", "NMSE at 4k", "TopK 4k − k", "JumpReLU NMSE at L0 k",
                       "at L0 4k", "JumpReLU 4k − k", "val NMSE"], lines)]
        if rows:
            body.append(self.figure(fig, "progressive"))
        word, why = MISSING, "a run is missing"
        if "TopK" in ivs and "Multi-TopK" in ivs:
            t, m = ivs["TopK"], ivs["Multi-TopK"]
            words = [judge(t["topk"], +1), judge(m["topk"], -1)] + ([judge(m["jumprelu"], -1)] if m["jumprelu"] else [])
            word = combine(words)
            why = (f"TopK's NMSE changes by {ci_text(t['topk'], 3)} from k to 4k, Multi-TopK's by {ci_text(m['topk'], 3)}; "
                   f"with the JumpReLU threshold Multi-TopK's changes by {ci_text(m['jumprelu'], 3)} from L0 = k to 4k. "
                   "The rule: holds if TopK gets worse at 4k and Multi-TopK gets better (at k' = 4k and, where measured, "
                   "with JumpReLU at L0 = 4k), each beyond its interval.")
        toks = {self.eval_details(r).get("progressive", {}).get("tokens") for r in rows} - {None}
        samples = f"{len(rows)} runs; {', '.join(map(str, sorted(toks))) or '?'} held-out tokens each"
        body.append(self.verdict(claim, word, why, samples))
        self.add("3. Progressive codes: Multi-TopK", claim, body)

    def shrinkage(self) -> None:
        rows = [r for r in in_group(self.results, "baselines") if r.get("eval/shrinkage") is not None]
        claim = "TopK latents are not shrunk; ReLU+L1 latents are (refitting their values makes them larger)."
        groups = sorted(replicates(rows).values(), key=lambda g: (g[0]["activation"], np.mean([r["val/l0"] for r in g])))
        lines, topk, relu = [], [], []
        for reps in groups:
            r = reps[0]
            iv = metric_interval(reps, "eval/shrinkage")
            lines.append([LABEL[r["activation"]], fmt(r["l1_coeff"]) if r["activation"] in L1_FAMILIES else f"k={r['k']}",
                          len(reps), mean_of([x["val/l0"] for x in reps]), ci_text(iv)])
            (topk if r["activation"] == "topk" else relu if r["activation"] == "relu" else []).append(iv)
        body = ["*Shrinkage*: mean over held-out tokens of ‖refit values‖ / ‖values‖, where the refit keeps the "
                "decoder and each token's active latents and re-solves their values by non-negative least squares. "
                "1 = no shrinkage; > 1 = the encoder's values were too small. [95% interval: across seeds where the "
                "group has replicates, else the bootstrap over held-out blocks.]",
                table(["SAE", "setting", "seeds", "L0", "shrinkage ratio"], lines)]
        word, why = MISSING, "missing TopK or ReLU runs"
        if topk and relu and all(iv.get("lo") is not None for iv in topk + relu):
            far = [max(abs(iv["lo"] - 1), abs(iv["hi"] - 1)) for iv in topk]  # TopK: at most this far from 1
            near = [0.0 if iv["lo"] <= 1 <= iv["hi"] else min(abs(iv["lo"] - 1), abs(iv["hi"] - 1)) for iv in topk]
            if not all(map(math.isfinite, far + [iv["lo"] for iv in relu])):
                word = UNSURE
            elif max(far) < min(iv["lo"] - 1 for iv in relu):
                word = HOLDS
            elif max(near) > min(iv["hi"] - 1 for iv in relu):
                word = FAILS
            else:
                word = UNSURE
            why = (f"TopK is at most {max(far):.3f} from 1 within its intervals; ReLU+L1 is at least "
                   f"{min(iv['lo'] - 1 for iv in relu):.3f} above 1. The rule: holds if every ReLU+L1 interval lies "
                   "further above 1 than any TopK interval reaches from 1; does not hold if some TopK run is surely "
                   "further from 1 than some ReLU+L1 run can be above it.")
        toks = {self.eval_details(r).get("shrinkage", {}).get("tokens_with_support") for r in rows} - {None}
        samples = f"{len(rows)} runs; {', '.join(map(str, sorted(toks))) or '?'} held-out tokens each"
        body.append(self.verdict(claim, word, why, samples))
        self.add("4. Activation shrinkage", claim, body)

    def n_series(self) -> None:
        rows = sorted(in_group(self.results, "n_series"), key=lambda r: r["num_latents"])
        claim = "Probe loss and N2G explanation quality improve as the number of latents grows."
        claim2 = "The best SAE latent is a better 1-D probe than the best residual channel."
        title = "5. Probe loss and explainability vs n"
        current = [r for r in rows if r.get("eval/probe_loss_heldout") is not None]
        if rows and not current:
            msg = ("these runs' probe results predate the pre-activation probes (issue 13); rerun the sweep, which "
                   "re-evaluates them")
            return self.add(title, claim, [self.verdict(claim, MISSING, msg), self.verdict(claim2, MISSING, msg)])
        lines = []
        for r in current:
            lines.append([r["num_latents"], r["val/nmse"], r["eval/probe_loss"], r.get("eval/probe_loss_residual"),
                          ci_text(run_ci(r, "eval/probe_loss_gap")), r["eval/probe_loss_heldout"],
                          r.get("eval/probe_loss_heldout_residual"), ci_text(run_ci(r, "eval/probe_loss_heldout_gap")),
                          r.get("eval/n2g_precision"), r.get("eval/n2g_recall"), ci_text(run_ci(r, "eval/n2g_f1"))])
        lrs = ", ".join(f"n={int(r['num_latents'])}: {r['lr']:.3g}" for r in current)
        body = [f"k = 32; lr {lrs}. Probe loss: a 1-D logistic probe on each latent's pre-activation (before the "
                "top-k), the best latent per task, mean over the built-in binary tasks (chance 0.693). *In-sample* is "
                "the paper's (the best latent's training CE); *held-out* is that latent's CE on other snippets (the "
                "in-sample minimum over n latents improves with n by selection alone). *Channels*: the same with raw "
                "residual channels; *gap* = SAE − channels with its two-level bootstrap interval (tasks, examples). "
                "N2G as in OpenAI's explanations.py, F1 with its bootstrap interval over latents.",
                table(["n", "NMSE", "probe (in-sample)", "channels", "gap", "probe (held-out)", "channels", "gap",
                       "N2G precision", "N2G recall", "N2G F1"], lines)]
        slopes = {key: trend([(r["num_latents"], r.get(key)) for r in current])
                  for key in ("eval/probe_loss", "eval/probe_loss_heldout", "eval/n2g_f1")}
        if len(current) >= 3:
            fig, ax = log_axes("Probe loss and N2G F1 vs n", "latents n", "value", logy=False)
            ax.plot([r["num_latents"] for r in current], [r["eval/probe_loss"] for r in current], "o-", label="probe loss, in-sample")
            ax.plot([r["num_latents"] for r in current], [r["eval/probe_loss_heldout"] for r in current], "o--", label="probe loss, held-out")
            ax.plot([r["num_latents"] for r in current], [r.get("eval/n2g_f1") for r in current], "s-", label="N2G F1")
            ax.legend(fontsize=8)
            body.append(self.figure(fig, "probe_n2g_vs_n"))
        words = [judge(slopes["eval/probe_loss"], -1), judge(slopes["eval/probe_loss_heldout"], -1),
                 judge(slopes["eval/n2g_f1"], +1)]
        word = combine(words) if len(current) >= 3 else MISSING
        why = (f"Slope against log2 n with its 95% t interval: probe loss in-sample {slope_text(slopes['eval/probe_loss'])}, "
               f"held-out {slope_text(slopes['eval/probe_loss_heldout'])}; N2G F1 {slope_text(slopes['eval/n2g_f1'])}. "
               "The rule: holds if both probe losses fall and N2G F1 rises with n, each beyond its interval; does not "
               "hold if any moves the other way beyond it.")
        d = self.eval_details(current[-1]) if current else {}
        probes, n2g = d.get("probes", {}), d.get("n2g", {})
        per_class = probes.get("examples_per_class_per_split", {})
        samples = (f"{len(current)} sizes, one run each; {probes.get('num_tasks', '?')} probe tasks with "
                   f"{per_class.get('min', '?')}–{per_class.get('max', '?')} examples per class and split (median "
                   f"{per_class.get('median', '?')}); N2G on {n2g.get('latents', '?')} latents per SAE "
                   f"({n2g.get('latents_with_precision', '?')} with a precision, {n2g.get('latents_with_recall', '?')} "
                   "with a recall)")
        body.append(self.verdict(claim, word, why, samples))
        gaps = [judge(run_ci(r, key), -1) for r in current for key in ("eval/probe_loss_gap", "eval/probe_loss_heldout_gap")]
        why2 = ("SAE − channels at each n, in-sample and held-out: "
                + "; ".join(f"n={r['num_latents']}: {ci_text(run_ci(r, 'eval/probe_loss_gap'), 3)}, "
                            f"{ci_text(run_ci(r, 'eval/probe_loss_heldout_gap'), 3)}" for r in current)
                + ". The rule: holds if every gap is below 0 beyond its interval, does not hold if any is above.")
        body.append(self.verdict(claim2, combine(gaps), why2, samples))
        self.add(title, claim, body)

    def ablation(self) -> None:
        rows = [r for r in in_group(self.results, "ablation") if r.get("eval/ablation_sparsity") is not None]
        claim = "Ablating one SAE latent has sparser downstream effects than ablating one residual channel."
        title = "6. Ablation sparsity"
        if not rows:
            return self.add(title, claim, [self.verdict(claim, MISSING, "no ablation eval in the sweep")])
        r = rows[0]
        if r.get("eval/ablation_sparsity_diff_ci_lo") is None:
            return self.add(title, claim, [self.verdict(claim, MISSING, "this run's ablation result predates the paper's "
                                                        "definition (T = 16, median removed; issue 13): rerun the sweep")])
        d = self.eval_details(r).get("ablation", {})
        measures = {}
        for suffix, name in (("", "paper's (concatenated)"), ("_per_position", "per position")):
            if r.get(f"eval/ablation_sparsity{suffix}") is not None:
                measures[name] = [run_ci(r, f"eval/ablation_sparsity{suffix}{part}") for part in ("", "_residual", "_diff")]
        body = [f"n = {r['num_latents']}, k = {r['k']}. At a position t of a {d.get('context_length', '?')}-token context, "
                "one active latent's contribution z·d is subtracted from the residual (the SAE's error stays in), or "
                "one residual channel is zeroed; the logit differences at t and the next 15 positions, each position's "
                "median removed. *Paper's (concatenated)*: the 16 × V numbers as one vector, (‖Δ‖₁/‖Δ‖₂)² / (V·16). "
                "*Per position*: each position's (‖Δ_t‖₁/‖Δ_t‖₂)² / V, averaged over the 16 (positions weighted alike; "
                "the concatenated measure also counts an effect concentrated at t as sparse). Lower = sparser; mean "
                "[95% bootstrap interval over contexts].",
                table(["measure", "SAE latents", "residual channels", "SAE − channels"],
                      [[name, *map(ci_text, ivs)] for name, ivs in measures.items()])]
        paper = "paper's (concatenated)"
        # The verdict is on the paper's measure only, and only once its channel baseline is believable.
        sane = 0.45 <= measures[paper][1]["mean"] <= 0.75
        others = "; ".join(f"{name}: channels {ivs[1]['mean']:.3f}, SAE − channels {ci_text(ivs[2], 3)}"
                           for name, ivs in measures.items() if name != paper)
        if not sane:
            word = UNSURE
            why = (f"The paper's measure puts the channel baseline at {measures[paper][1]['mean']:.3f}, outside 0.45–0.75 "
                   "around the paper's ≈ 0.6 (a dense random effect gives 2/π ≈ 0.64), so the SAE's figure on it is not "
                   "believed and no verdict is drawn. On this model an ablation's effect is concentrated at the ablated "
                   "position, which the concatenated measure counts as sparsity."
                   + (f" Reported beside it, not judged: {others}." if others else ""))
        else:
            diff = measures[paper][2]
            word = judge(diff, -1)
            why = (f"SAE − channels = {ci_text(diff, 3)}; the paper has ≈ 0.10–0.14 for latents against ≈ 0.60 for "
                   "channels. The rule: judged only when the channel figure lies in 0.45–0.75; holds if the difference "
                   "is below 0 beyond its interval, does not hold if above.")
        samples = (f"one run; {d.get('pairs', '?')} (latent, position) pairs at {d.get('positions', '?')} positions of "
                   f"{d.get('contexts', '?')} contexts, as many channel ablations")
        body.append(self.verdict(claim, word, why, samples))
        self.add(title, claim, body)
