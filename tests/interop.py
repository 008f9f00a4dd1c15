"""Shared by the interop tests: random inputs and the comparison of two SAEs' outputs (relative
error of the reconstruction and of the dense codes, and the same active latents)."""
from __future__ import annotations

import torch

TOL = 1e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-30))


def dense_codes(sae, x: torch.Tensor) -> torch.Tensor:
    v, i = sae.encode(x)
    return torch.zeros(x.shape[0], sae.num_latents).scatter_add_(1, i, v.float())


def assert_same_outputs(ours, x: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor, code_scale: float = 1.0) -> None:
    """``ours`` (a TopKSAE) against another library's reconstruction [B, d] and dense codes [B, n].
    ``code_scale``: our codes times it are theirs (an export folds our dataset constant s into the
    biases, so its codes are ours / s: the raw-activation units)."""
    mine = dense_codes(ours, x) * code_scale
    assert torch.equal(mine > 0, codes > 0), "different active latents"
    assert rel_err(mine, codes) < TOL, rel_err(mine, codes)
    assert rel_err(ours.reconstruct(x), recon) < TOL, rel_err(ours.reconstruct(x), recon)
    assert (codes > 0).any(), "degenerate case: nothing fires"


def inputs(d_in: int, n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g) * 3 + 0.5
