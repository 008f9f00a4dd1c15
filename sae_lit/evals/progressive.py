"""Progressive recovery (PAPER.md, "Metrics"; Gao et al. sec. 5.3): how a k-trained SAE
reconstructs when run at another sparsity.

- TopK at k' in {k/4, k/2, k, 2k, 4k}: plain TopK degrades past k' = k, Multi-TopK does not.
- JumpReLU at inference: keep every pre-activation above one global threshold theta,
  calibrated on *training* activations so that the mean L0 there equals k, then measured on
  held-out ones.

NMSE as in ``sae_lit.training.metrics.NMSE``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole
eval set. Needs ``encode(x, k=...)`` for the k' sweep and ``pre_acts``/``normalize_input``
(TopKSAE) for JumpReLU; SAEs without them get those parts skipped with a note.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.result import EvalResult

log = logging.getLogger(__name__)


def _nmse(x: Tensor, recon_fn, batch_size: int) -> tuple[float, float]:
    """(NMSE, mean L0) of recon_fn(xb) -> (recon, l0 per row) over x."""
    x64 = x.double()
    denom = (x64 - x64.mean(0)).pow(2).sum().item()
    sse, l0 = 0.0, 0.0
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo : lo + batch_size]
        recon, active = recon_fn(xb)
        sse += (xb.double() - recon.double().cpu()).pow(2).sum().item()
        l0 += active.double().sum().item()
    return sse / max(denom, 1e-30), l0 / max(x.shape[0], 1)


@torch.no_grad()
def jumprelu_threshold(sae, x_train: Tensor, target_l0: float, batch_size: int = 1024) -> float:
    """One global threshold theta with mean_t #{j : pre_tj > theta} = target_l0 on x_train.

    Only each token's top m pre-activations are kept as candidates (the full [N, n] set would not
    fit); theta is exact as long as no token has m values above it, which is checked, and m
    doubled if not."""
    sae = as_adapter(sae)
    n = sae.num_latents
    m = min(n, max(4 * int(round(target_l0)), 8))
    want = int(round(target_l0 * x_train.shape[0]))
    while True:
        cands, mth = [], []
        for lo in range(0, x_train.shape[0], batch_size):
            pre = sae.pre_acts(x_train[lo : lo + batch_size])
            top = pre.topk(m, dim=-1).values
            cands.append(top.flatten().cpu())
            mth.append(top[:, -1].cpu())
        allc = torch.cat(cands)
        if want <= 0:
            return float(allc.max()) + 1.0
        top = allc.topk(min(want + 1, allc.numel())).values
        # Midway between the want-th and the next value, so that "pre > theta" counts exactly
        # `want` (ties aside); never below 0, where nonpositive pre-activations would "fire".
        theta = 0.0 if top.numel() <= want else float(top[want - 1] + top[want]) / 2
        theta = max(theta, 0.0)
        if m >= n or bool((torch.cat(mth) <= theta).all()):
            return theta
        m = min(n, 2 * m)


def _jumprelu_recon(sae, theta: float):
    def fn(xb: Tensor):
        pre = sae.pre_acts(xb)
        z = torch.where(pre > theta, pre, torch.zeros_like(pre))
        return sae.decode_dense(z, xb), (z > 0).sum(-1)

    return fn


def _topk_recon(sae, k: int):
    def fn(xb: Tensor):
        values, indices = sae.encode(xb, k=k)
        recon = sae.decode(values, indices, xb)
        return recon, (values > 0).sum(-1)

    return fn


@torch.no_grad()
def progressive_recovery(
    sae, x: Tensor, x_train: Tensor | None = None, ks: list[int] | None = None, batch_size: int = 1024,
) -> EvalResult:
    """``x`` [N, d] held-out raw activations; ``x_train`` [M, d] training activations for the
    JumpReLU calibration (skipped when None)."""
    sae = as_adapter(sae)
    k = sae.k
    act = getattr(sae.sae, "activation", "topk")
    if act != "topk":
        return EvalResult({}, {"skipped": f"progressive recovery is defined for TopK SAEs; this one is {act!r}"})
    if k is None:
        return EvalResult({}, {"skipped": f"{type(sae.sae).__name__} has no integer k"})
    n = sae.num_latents
    ks = ks or sorted({max(1, k // 4), max(1, k // 2), k, min(n, 2 * k), min(n, 4 * k)})
    details: dict = {"k": k, "topk": {}}
    for kp in ks:
        try:
            nmse, l0 = _nmse(x, _topk_recon(sae, kp), batch_size)
        except TypeError:
            details["topk_skipped"] = f"{type(sae.sae).__name__}.encode takes no k argument"
            break
        details["topk"][str(kp)] = {"nmse": nmse, "l0": l0}
    if x_train is not None and sae.ours:
        theta = jumprelu_threshold(sae, x_train, target_l0=k, batch_size=batch_size)
        nmse, l0 = _nmse(x, _jumprelu_recon(sae, theta), min(batch_size, 512))
        details["jumprelu"] = {"threshold": theta, "nmse": nmse, "l0": l0, "calibration_tokens": int(x_train.shape[0])}
    elif x_train is not None:
        details["jumprelu_skipped"] = "the JumpReLU threshold needs the pre-activations of one of our SAEs"
    metrics = {}
    if str(k) in details["topk"]:
        metrics["eval/progressive_nmse_k"] = details["topk"][str(k)]["nmse"]
    if str(4 * k) in details["topk"]:
        metrics["eval/progressive_nmse_4k"] = details["topk"][str(4 * k)]["nmse"]
    if "jumprelu" in details:
        metrics["eval/progressive_nmse_jumprelu"] = details["jumprelu"]["nmse"]
    return EvalResult(metrics, details, {"eval/progressive_recovery": plot_progressive(details)})


def plot_progressive(details: dict):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = sorted((int(kp), r["nmse"], r["l0"]) for kp, r in details.get("topk", {}).items())
    if pts:
        ax.plot([p[2] for p in pts], [p[1] for p in pts], "o-", label="TopK at k'")
        for kp, nmse, l0 in pts:
            ax.annotate(f"k'={kp}", (l0, nmse), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if "jumprelu" in details:
        j = details["jumprelu"]
        ax.plot([j["l0"]], [j["nmse"]], "s", color="C3", label=f"JumpReLU (theta={j['threshold']:.3g})")
    ax.axvline(details.get("k", 0), color="grey", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("L0 on held-out tokens")
    ax.set_ylabel("NMSE")
    ax.set_title(f"Progressive recovery (trained k={details.get('k')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
