"""Split-level metrics as torchmetrics ``Metric``s with sum states.

Sum states are what make these right under DDP and across batches: NMSE is a ratio of
sums over the whole split, not a mean of per-batch ratios (PAPER.md, "Metrics").
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class NMSE(Metric):
    """Normalised MSE over a whole split (a.k.a. FVU).

    sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mu||^2, with mu the split's mean activation.
    The denominator is accumulated as sum ||x||^2 - N ||mu||^2 in float64.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, d_in: int, **kw):
        super().__init__(**kw)
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x = x.double()
        self.sse += (x - x_hat.double()).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_sq += x.pow(2).sum()
        self.count += x.shape[0]

    def compute(self) -> Tensor:
        mu = self.sum_x / self.count.clamp_min(1)
        denom = self.sum_sq - self.count * mu.pow(2).sum()
        return (self.sse / denom.clamp_min(torch.finfo(torch.float64).tiny)).float()


class MeanL0(Metric):
    """Mean number of active latents (value > 0) per token over the split."""

    full_state_update = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        self.active += (values > 0).sum()
        self.count += values.shape[0]

    def compute(self) -> Tensor:
        return (self.active / self.count.clamp_min(1)).float()


class FiringCounts(Metric):
    """How often each latent fired over the split; ``compute`` gives the dead fraction
    (latents that never fired on the split). ``frequencies`` gives per-latent densities."""

    full_state_update = False

    def __init__(self, num_latents: int, **kw):
        super().__init__(**kw)
        self.add_state("fires", torch.zeros(num_latents, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, indices: Tensor) -> None:
        active = indices[values > 0]
        self.fires += torch.bincount(active, minlength=self.fires.shape[0]).to(self.fires.dtype)
        self.count += values.shape[0]

    def frequencies(self) -> Tensor:
        return self.fires / self.count.clamp_min(1)

    def compute(self) -> Tensor:
        return (self.fires == 0).float().mean()
