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


def auxk_loss(residual: Tensor, residual_hat: Tensor) -> Tensor:
    """AuxK loss (Gao et al. 2024, sec. A.2): the dead latents' top-k_aux model the residual.

    ``residual`` = x - x_hat, detached; ``residual_hat`` = the dead latents' decoding. As in
    the reference code, sum ||residual - residual_hat||^2 / total variance of the residual (the
    reference decodes with b_pre against residual + b_pre.detach(): the same value, and the
    caller passes residual_hat + (b_pre - b_pre.detach()) for the same gradient). Never NaN:
    a zero-variance residual or a non-finite decoding gives 0 and a zero gradient.
    """
    denom = total_variance(residual).clamp_min(torch.finfo(residual.dtype).tiny)
    diff = residual - residual_hat
    # No host sync: a non-finite decoding is zeroed on the device before the square, so that
    # its gradient is 0 rather than NaN (inf * 0).
    diff = torch.where(torch.isfinite(diff).all(), diff, torch.zeros_like(diff))
    loss = diff.pow(2).sum() / denom
    return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))


def l1_penalty(values: Tensor, decoder_norms: Tensor) -> Tensor:
    """sum_j |z_j| * ||W_dec_j||, averaged over tokens (the ReLU+L1 baseline's penalty).

    ``values`` are dense [B, num_latents] codes. Weighting by the decoder norm stops the model
    from shrinking z while growing W_dec.
    """
    return (values.abs() * decoder_norms).sum(-1).mean()
