"""Activation shrinkage (PAPER.md, "Metrics"): keep the decoder and each token's support
(the latents that fired) fixed, refit the values by non-negative least squares, and compare
norms. An L1 penalty pulls values towards zero, so a ReLU+L1 SAE's refit values come out
larger (ratio > 1); TopK has no such pull (ratio ~ 1).

    eval/shrinkage = mean over tokens of ||z_refit|| / ||z||   (tokens with an empty support skipped)

with a bootstrap interval over held-out blocks (``eval/shrinkage_ci_lo`` / ``_ci_hi``).

The fit is done in raw activation space with the token's own decoder vectors
(``SAEAdapter.decoder_directions``), so it is the same problem for any SAE normalisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.result import EvalResult
from sae_lit.evals.stats import mean_ci


@torch.no_grad()
def nnls(A: Tensor, b: Tensor, x0: Tensor | None = None, max_iter: int = 2000, tol: float = 1e-7) -> Tensor:
    """Batched min_{x >= 0} ||A x - b||^2 for A [B, d, m], b [B, d] by accelerated projected
    gradient (FISTA with restarts) on the [B, m, m] normal equations.

    Projected gradient rather than an active-set method because every token has its own small
    problem: this runs all of them at once as batched matmuls, with no per-token Python loop."""
    out_dtype = b.dtype
    A, b = A.double(), b.double()
    G = A.transpose(1, 2) @ A  # [B, m, m]
    c = (A.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)  # [B, m]
    # Step 1/L with L the largest eigenvalue of G: the gradient's Lipschitz constant.
    L = torch.linalg.eigvalsh(G)[:, -1].clamp_min(1e-12).unsqueeze(-1)
    x = (x0.double() if x0 is not None else torch.zeros_like(c)).clamp_min(0)
    y, t = x.clone(), 1.0
    scale = c.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    for _ in range(max_iter):
        grad = (G @ y.unsqueeze(-1)).squeeze(-1) - c
        x_new = (y - grad / L).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        # Projected-gradient optimality: zero gradient on the free set, >= 0 on the bound set.
        g = (G @ x_new.unsqueeze(-1)).squeeze(-1) - c
        kkt = torch.where(x_new > 0, g.abs(), (-g).clamp_min(0))
        done = bool(((kkt / scale).amax() < tol))
        x, t = x_new, t_new
        if done:
            break
    return x.to(out_dtype)


@torch.no_grad()
def shrinkage(sae, x: Tensor, batch_size: int = 256, max_iter: int = 2000, clusters: Tensor | None = None,
              seed: int = 0) -> EvalResult:
    """``x`` [N, d] raw activations (held-out, BOS excluded); ``clusters`` [N] their blocks."""
    sae = as_adapter(sae)
    ratios, kept, nmse_before, nmse_after, var = [], [], 0.0, 0.0, 0.0
    mean = x.double().mean(0)
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo : lo + batch_size]
        values, indices = sae.encode(xb)
        xs = xb.to(values.device, values.dtype)
        bias = sae.decode(torch.zeros_like(values), indices, xs)  # decoder output at z = 0
        # The support: latents with value > 0. Compacted to the widest row's size, so dense
        # codes (ReLU SAEs: indices = all latents) do not build a [B, d, num_latents] matrix.
        m = max(int((values > 0).sum(-1).max()), 1)
        values, pos = values.topk(m, dim=-1)
        indices = indices.gather(1, pos)
        support = values > 0
        A = sae.decoder_directions(xs, indices).transpose(1, 2) * support.unsqueeze(1)  # [B, d, m]
        refit = nnls(A, xs - bias, x0=values, max_iter=max_iter) * support
        recon_before = bias + (A @ values.unsqueeze(-1)).squeeze(-1)
        recon_after = bias + (A @ refit.to(A.dtype).unsqueeze(-1)).squeeze(-1)
        norm0 = values.double().norm(dim=-1)
        keep = norm0 > 0
        ratios.append((refit.double().norm(dim=-1)[keep] / norm0[keep]).cpu())
        kept.append(keep.cpu())
        xd = xs.double()
        nmse_before += (xd - recon_before.double()).pow(2).sum().item()
        nmse_after += (xd - recon_after.double()).pow(2).sum().item()
        var += (xd - mean.to(xd.device)).pow(2).sum().item()
    r = torch.cat(ratios) if ratios else torch.zeros(0)
    groups = None if clusters is None else clusters[: x.shape[0]][torch.cat(kept)].numpy()
    ci = mean_ci(r.numpy(), groups, n_boot=1000, seed=seed)
    metrics = {"eval/shrinkage": r.mean().item() if r.numel() else float("nan"),
               "eval/shrinkage_ci_lo": ci["lo"], "eval/shrinkage_ci_hi": ci["hi"]}
    details = {
        "tokens": int(x.shape[0]), "tokens_with_support": int(r.numel()), "interval": ci,
        "ratio_median": r.median().item() if r.numel() else float("nan"),
        "ratio_p10": r.quantile(0.1).item() if r.numel() else float("nan"),
        "ratio_p90": r.quantile(0.9).item() if r.numel() else float("nan"),
        # Refitting can only lower the error on the same support; how much it does is the
        # reconstruction cost of the shrinkage.
        "nmse_before": nmse_before / max(var, 1e-30), "nmse_after_refit": nmse_after / max(var, 1e-30),
    }
    return EvalResult(metrics, details)
