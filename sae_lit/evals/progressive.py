"""Progressive recovery (PAPER.md, "Metrics"; Gao et al. sec. 5.3): how a k-trained SAE
reconstructs when run at another sparsity.

- TopK at k' in {k/4, k/2, k, 2k, 4k}: plain TopK degrades past k' = k, Multi-TopK does not.
- JumpReLU at inference: keep every pre-activation above one global threshold theta. A single
  threshold at L0 = k cannot tell TopK from Multi-TopK, so theta is swept: one threshold per
  target L0 from k/2 to 4k (factors of sqrt 2), each calibrated on *training* activations so
  that the mean L0 there equals the target, then NMSE and L0 measured on held-out ones. The
  plot shows NMSE against L0 for both curves, as the paper's figure does.

NMSE as in ``sae_lit.training.metrics.NMSE``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole
eval set. Needs ``encode(x, k=...)`` for the k' sweep and ``pre_acts``/``normalize_input``
(TopKSAE) for JumpReLU; SAEs without them get those parts skipped with a note. The details
give a bootstrap interval (over held-out blocks) of NMSE(4k) − NMSE(k) for TopK and JumpReLU:
the within-SAE change the claim is about.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.result import EvalResult
from sae_lit.evals.stats import bootstrap_ci

log = logging.getLogger(__name__)


def _token_errors(x: Tensor, recon_fn, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared error per token, L0 per token) of recon_fn(xb) -> (recon, l0 per row) over x."""
    sse, l0 = [], []
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo : lo + batch_size]
        recon, active = recon_fn(xb)
        sse.append((xb.double() - recon.double().cpu()).pow(2).sum(-1))
        l0.append(active.double().cpu())
    return torch.cat(sse).numpy(), torch.cat(l0).numpy()


def _deviation(x: Tensor) -> np.ndarray:
    x64 = x.double()
    return (x64 - x64.mean(0)).pow(2).sum(-1).numpy()


def _nmse(x: Tensor, recon_fn, batch_size: int) -> tuple[float, float]:
    """(NMSE, mean L0) of recon_fn over x."""
    sse, l0 = _token_errors(x, recon_fn, batch_size)
    return float(sse.sum() / max(_deviation(x).sum(), 1e-30)), float(l0.mean()) if l0.size else 0.0


@torch.no_grad()
def jumprelu_thresholds(sae, x_train: Tensor, targets: list[float], batch_size: int = 1024) -> list[float]:
    """One global threshold theta per target with mean_t #{j : pre_tj > theta} = target on x_train.

    Only each token's top m pre-activations are kept as candidates (the full [N, n] set would not
    fit); theta is exact as long as no token has m values above it, which is checked, and m
    doubled if not. One pass over x_train serves every target."""
    sae = as_adapter(sae)
    n = sae.num_latents
    m = min(n, max(4 * int(round(max(targets))), 8))
    while True:
        cands, mth = [], []
        for lo in range(0, x_train.shape[0], batch_size):
            top = sae.pre_acts(x_train[lo : lo + batch_size]).topk(m, dim=-1).values
            cands.append(top.flatten().cpu())
            mth.append(top[:, -1].cpu())
        allc, mth = torch.cat(cands), torch.cat(mth)
        out = []
        for target in targets:
            want = int(round(target * x_train.shape[0]))
            if want <= 0:
                out.append(float(allc.max()) + 1.0)
                continue
            top = allc.topk(min(want + 1, allc.numel())).values
            # Midway between the want-th and the next value, so that "pre > theta" counts exactly
            # `want` (ties aside); never below 0, where nonpositive pre-activations would "fire".
            theta = 0.0 if top.numel() <= want else float(top[want - 1] + top[want]) / 2
            out.append(max(theta, 0.0))
        if m >= n or bool((mth <= min(out)).all()):
            return out
        m = min(n, 2 * m)


def jumprelu_threshold(sae, x_train: Tensor, target_l0: float, batch_size: int = 1024) -> float:
    """The threshold of one target L0 (see jumprelu_thresholds)."""
    return jumprelu_thresholds(sae, x_train, [target_l0], batch_size)[0]


@torch.no_grad()
def _jumprelu_errors(sae, x: Tensor, thetas: list[float], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per threshold, (squared error, L0) per token: one encoder pass for all thresholds, each
    decoded sparsely from the values above it."""
    sse = [[] for _ in thetas]
    l0 = [[] for _ in thetas]
    lowest = min(thetas)
    for lo in range(0, x.shape[0], batch_size):
        xb = x[lo : lo + batch_size]
        pre = sae.pre_acts(xb)
        m = max(int((pre > lowest).sum(-1).max()), 1)
        top = pre.topk(min(m, pre.shape[-1]), dim=-1)
        for i, theta in enumerate(thetas):
            keep = top.values > theta
            recon = sae.decode(torch.where(keep, top.values, torch.zeros_like(top.values)), top.indices, xb)
            sse[i].append((xb.double() - recon.double().cpu()).pow(2).sum(-1))
            l0[i].append(keep.sum(-1).double().cpu())
    return [(torch.cat(s).numpy(), torch.cat(c).numpy()) for s, c in zip(sse, l0)]


def _topk_recon(sae, k: int):
    def fn(xb: Tensor):
        values, indices = sae.encode(xb, k=k)
        recon = sae.decode(values, indices, xb)
        return recon, (values > 0).sum(-1)

    return fn


def _difference_ci(a: np.ndarray, b: np.ndarray, dev: np.ndarray, clusters, seed: int) -> dict:
    """NMSE(a) − NMSE(b) (ratios of sums over the same tokens) with a bootstrap interval."""
    lo, hi = bootstrap_ci(lambda sa, sb, d: float((sa.sum() - sb.sum()) / d.sum()), a, b, dev,
                          clusters=clusters, n_boot=1000, seed=seed)
    return {"mean": float((a.sum() - b.sum()) / dev.sum()), "lo": lo, "hi": hi}


@torch.no_grad()
def progressive_recovery(
    sae, x: Tensor, x_train: Tensor | None = None, ks: list[int] | None = None, batch_size: int = 1024,
    l0_factors: list[float] | None = None, clusters: Tensor | None = None, seed: int = 0,
) -> EvalResult:
    """``x`` [N, d] held-out raw activations (``clusters``: their block ids, for the bootstrap);
    ``x_train`` [M, d] training activations for the JumpReLU calibration (skipped when None);
    ``l0_factors``: JumpReLU target L0s as multiples of k (default k/2 .. 4k by sqrt 2)."""
    sae = as_adapter(sae)
    k = sae.k
    act = getattr(sae.sae, "activation", "topk")
    if act != "topk":
        return EvalResult({}, {"skipped": f"progressive recovery is defined for TopK SAEs; this one is {act!r}"})
    if k is None:
        return EvalResult({}, {"skipped": f"{type(sae.sae).__name__} has no integer k"})
    n = sae.num_latents
    ks = ks or sorted({max(1, k // 4), max(1, k // 2), k, min(n, 2 * k), min(n, 4 * k)})
    factors = l0_factors or [2 ** (e / 2) for e in range(-2, 5)]
    dev = _deviation(x)
    denom = max(float(dev.sum()), 1e-30)
    groups = None if clusters is None else clusters.numpy()
    details: dict = {"k": k, "topk": {}, "tokens": int(x.shape[0])}
    errs = {}
    for kp in ks:
        try:
            sse, l0 = _token_errors(x, _topk_recon(sae, kp), batch_size)
        except TypeError:
            details["topk_skipped"] = f"{type(sae.sae).__name__}.encode takes no k argument"
            break
        errs[kp] = sse
        details["topk"][str(kp)] = {"nmse": float(sse.sum() / denom), "l0": float(l0.mean())}
    if k in errs and 4 * k in errs:
        details["topk_4k_minus_k"] = _difference_ci(errs[4 * k], errs[k], dev, groups, seed)
    if x_train is not None and sae.ours:
        targets = [f * k for f in factors]
        thetas = jumprelu_thresholds(sae, x_train, targets, batch_size=batch_size)
        curve = []
        for f, target, theta, (sse, l0) in zip(factors, targets, thetas,
                                               _jumprelu_errors(sae, x, thetas, min(batch_size, 512))):
            curve.append({"target_l0": target, "l0_factor": f, "threshold": theta, "nmse": float(sse.sum() / denom),
                          "l0": float(l0.mean()), "_sse": sse})
        details["jumprelu_curve"] = curve
        details["calibration_tokens"] = int(x_train.shape[0])
        at = {round(c["l0_factor"], 6): c for c in curve}
        if 1.0 in at:
            details["jumprelu"] = {key: at[1.0][key] for key in ("threshold", "nmse", "l0")}
        if 1.0 in at and 4.0 in at:
            details["jumprelu_4k_minus_k"] = _difference_ci(at[4.0]["_sse"], at[1.0]["_sse"], dev, groups, seed)
        for c in curve:
            del c["_sse"]
    elif x_train is not None:
        details["jumprelu_skipped"] = "the JumpReLU threshold needs the pre-activations of one of our SAEs"
    details["interval"] = "95% percentile bootstrap over held-out blocks (tokens when blocks are unknown)"
    metrics = {}
    if str(k) in details["topk"]:
        metrics["eval/progressive_nmse_k"] = details["topk"][str(k)]["nmse"]
    if str(4 * k) in details["topk"]:
        metrics["eval/progressive_nmse_4k"] = details["topk"][str(4 * k)]["nmse"]
    if "jumprelu" in details:
        metrics["eval/progressive_nmse_jumprelu"] = details["jumprelu"]["nmse"]
    for c in details.get("jumprelu_curve", []):
        if round(c["l0_factor"], 6) == 4.0:
            metrics["eval/progressive_nmse_jumprelu_4k"] = c["nmse"]
    for name in ("topk_4k_minus_k", "jumprelu_4k_minus_k"):
        if name in details:
            d = details[name]
            metrics.update({f"eval/progressive_{name}": d["mean"], f"eval/progressive_{name}_ci_lo": d["lo"],
                            f"eval/progressive_{name}_ci_hi": d["hi"]})
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
    curve = details.get("jumprelu_curve", [])
    if curve:
        ax.plot([c["l0"] for c in curve], [c["nmse"] for c in curve], "s--", color="C3", label="JumpReLU (threshold swept)")
    ax.axvline(details.get("k", 0), color="grey", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("L0 on held-out tokens")
    ax.set_ylabel("NMSE")
    ax.set_title(f"Progressive recovery (trained k={details.get('k')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
