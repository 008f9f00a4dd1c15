"""Loss functions, pure and batch-local.

Training losses are normalised per batch (that is what the optimiser sees). Evaluation
metrics that sum over a whole split live in ``sae_lit.training.metrics``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def total_variance(x: Tensor) -> Tensor:
    """sum ||x_b - mean(x)||^2 over the batch: the MSE of predicting the batch mean, times B."""
    c = x - x.mean(0)
    return torch.dot(c.reshape(-1), c.reshape(-1))  # torch's var over dim 0 is ~6x slower on CPU


def nmse(x: Tensor, x_hat: Tensor, denom: Tensor | None = None) -> Tensor:
    """Normalised MSE (fraction of variance unexplained) of one batch.

    sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, both over the batch.
    """
    if denom is None:
        denom = total_variance(x)
    return (x - x_hat).pow(2).sum() / denom.clamp_min(torch.finfo(denom.dtype).tiny)


def auxk_loss(residual: Tensor, residual_hat: Tensor, n_dead: int, k_aux: int) -> Tensor:
    """AuxK loss (Gao et al. 2024, sec. A.2): the dead latents' top-k_aux model the residual.

    ``residual`` = x - x_hat, detached; ``residual_hat`` = the dead latents' decoding without
    the bias. Normalised by the residual's variance like the main loss, and scaled by
    min(n_dead / k_aux, 1) so that a handful of dead latents does not dominate. Never NaN:
    a zero-variance residual gives zero.
    """
    if n_dead == 0:
        return residual_hat.sum() * 0.0
    denom = total_variance(residual)
    scale = auxk_scale(n_dead, k_aux)
    loss = scale * (residual - residual_hat).pow(2).sum() / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    # No host sync: a non-finite loss (e.g. an inf residual) is zeroed on the device.
    return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))


def auxk_scale(n_dead: int, k_aux: int) -> float:
    """AuxK's weight when few latents are dead: min(n_dead / k_aux, 1)."""
    return min(n_dead / k_aux, 1.0)


def l1_penalty(values: Tensor, decoder_norms: Tensor) -> Tensor:
    """sum_j |z_j| * ||W_dec_j||, averaged over tokens (the ReLU+L1 baseline's penalty).

    ``values`` are dense [B, num_latents] codes. Weighting by the decoder norm stops the model
    from shrinking z while growing W_dec.
    """
    return (values.abs() * decoder_norms).sum(-1).mean()
