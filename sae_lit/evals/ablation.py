"""Ablation sparsity (PAPER.md "Metrics"; Gao et al. sec. 4.5): how many output logits one
latent at one token moves.

For a sampled (latent j, token t) with the latent active, the hookpoint activation at t becomes
x_t - z_tj d_j (d_j the latent's raw-space decoder vector): the SAE's error term stays in, so
only that latent's contribution is removed and everything else is the clean forward. With
Delta the change of the logits [T - t, V] at t and every later position,

    sparsity = (||Delta||_1 / ||Delta||_2)^2 / (V (T - t))

which is 1/(V (T - t)) when a single logit moves and 1 when all move equally. The details
also give the same measure after removing each position's mean logit change
(``*_centered``): softmax ignores a uniform shift, which the plain measure counts as dense.
``eval/ablation_sparsity`` averages it over pairs; the baseline ablates raw hookpoint channels
(x_tc -> 0) at the same kind of tokens (``eval/ablation_sparsity_residual``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import edit_hookpoint, hook_acts, logits
from sae_lit.evals.result import EvalResult


def sparsity_of(delta: Tensor, center: bool = False) -> float:
    """(||D||_1 / ||D||_2)^2 / numel for one Delta-logits tensor [T', V]; nan if nothing moved.
    center: subtract each position's mean over the vocabulary first."""
    d = delta.double()
    if center:
        d = d - d.mean(-1, keepdim=True)
    l2 = d.norm()
    if l2 == 0:
        return float("nan")
    return float((d.abs().sum() / l2) ** 2 / d.numel())


@torch.no_grad()
def _ablate(model, hookpoint, ids: Tensor, positions: list[int], deltas: Tensor) -> list[tuple[float, float]]:
    """Run ids [1, T] once clean and once per ablation (h[t_r] -= deltas[r]) in one batch."""
    m = len(positions)
    batch = ids.expand(m + 1, -1)
    edit = torch.zeros(m + 1, ids.shape[1], deltas.shape[-1], dtype=deltas.dtype, device=deltas.device)
    for r, t in enumerate(positions):
        edit[r + 1, t] = deltas[r]

    def apply(h: Tensor) -> Tensor:
        return h - edit.to(h.device, h.dtype)

    with edit_hookpoint(model, hookpoint, apply):
        out = logits(model, batch)
    diffs = [out[r + 1, t:] - out[0, t:] for r, t in enumerate(positions)]
    return [(sparsity_of(d), sparsity_of(d, center=True)) for d in diffs]


@torch.no_grad()
def ablation_sparsity(sae, model: nn.Module, hookpoint: str, contexts: Tensor, pairs_per_context: int = 8,
                      baseline: bool = True, exclude_bos: bool = True, seed: int = 0) -> EvalResult:
    """``contexts`` [N, T] token ids (BOS first). Costs (pairs_per_context + 1) full forwards per
    context, twice with the baseline."""
    sae = as_adapter(sae)
    g = torch.Generator().manual_seed(seed)
    start = 1 if exclude_bos else 0
    sae_vals, res_vals, pairs = [], [], []
    for ids in contexts:
        ids = ids[None]
        h = hook_acts(model, hookpoint, ids)[0].float().cpu()  # [T, d]
        x = h[start:]
        values, indices = sae.encode(x)
        active = (values > 0).nonzero().cpu()  # [(row, slot)]
        if active.shape[0] == 0:
            continue
        pick = active[torch.randperm(active.shape[0], generator=g)[:pairs_per_context]]
        rows, slots = pick[:, 0], pick[:, 1]
        lat = indices.cpu()[rows, slots]
        dirs = sae.decoder_directions(x[rows], lat[:, None].to(indices.device))[:, 0].float().cpu()
        deltas = values.float().cpu()[rows, slots, None] * dirs
        positions = (rows + start).tolist()
        sae_vals += _ablate(model, hookpoint, ids, positions, deltas)
        pairs += [{"position": p, "latent": int(j)} for p, j in zip(positions, lat.tolist())]
        if baseline:
            chans = torch.randint(0, h.shape[1], (len(positions),), generator=g)
            deltas = torch.zeros(len(positions), h.shape[1])
            deltas[torch.arange(len(positions)), chans] = h[positions, chans]
            res_vals += _ablate(model, hookpoint, ids, positions, deltas)

    def mean(v, i):
        v = torch.tensor([a[i] for a in v if a[i] == a[i]], dtype=torch.float64)  # nan: nothing moved
        return float(v.mean()) if v.numel() else float("nan")

    metrics = {"eval/ablation_sparsity": mean(sae_vals, 0)}
    details = {"pairs": len(sae_vals), "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
               "no_effect_pairs": sum(a[0] != a[0] for a in sae_vals), "exclude_bos": exclude_bos,
               "sparsity_centered": mean(sae_vals, 1)}
    if baseline:
        metrics["eval/ablation_sparsity_residual"] = mean(res_vals, 0)
        details["residual_sparsity_centered"] = mean(res_vals, 1)
    return EvalResult(metrics, details)
