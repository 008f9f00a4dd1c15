"""The SAE's activation as a small, replaceable piece: the baselines the paper compares TopK
against, and two later TopK variants.

TopK itself lives in sae.py / kernels.py (it has the sparse training kernels). Everything
here is dense by nature: every latent can fire, so these build the [B, n] codes and decode
them with a GEMM. Each activation sees the SAE's weights (``Weights``: W_enc, b_enc, W_dec,
b_dec) and the centred, normalised input x_c = x_norm - b_dec, and returns

- ``z``: dense [B, n] codes used for the reconstruction;
- ``penalty``: its sparsity penalty, unweighted (the module multiplies by ``l1_coeff``);
- ``extra``: any further loss term, already weighted (Gated's auxiliary reconstruction,
  Matryoshka's prefix losses), computed by ``extra_loss`` once the reconstruction exists.

Variants:
- ``relu``: z = ReLU(W_enc x_c + b_enc), L1 on z weighted by decoder norms (the paper's
  baseline, sec. 2.2).
- ``prolu`` (Taggart 2024): m = W_enc x_c; z = m where m > 0 and m + b_enc > 0, else 0. The
  bias only gates, it never shifts the value, so an L1 penalty cannot buy sparsity by
  shrinking. Gradients of the "ReLU" flavour: both m and b receive the gradient of z where
  the gate is open (as if z were ReLU(m + b)), the paper's default comparison.
- ``gated`` (Rajamanoharan et al. 2024): a gate pi = W_enc x_c + b_enc decides which latents
  fire; the magnitude is ReLU((W_enc * exp(r_mag)) x_c + b_mag). The L1 penalty acts on
  ReLU(pi) and an auxiliary loss asks ReLU(pi), decoded by a frozen copy of the decoder, to
  reconstruct x too (so the gate gets a gradient).
- ``batchtopk`` (Bussmann et al. 2024): the top B*k pre-activations of the whole batch fire,
  so L0 is k on average but varies per token. At inference, a threshold theta (an EMA of the
  smallest value selected in training batches) replaces the batch: z = pre where pre > theta
  (a JumpReLU, exported as such).
- ``jumprelu`` (Rajamanoharan et al. 2024; Gemma Scope): z = ReLU(pre) where pre > theta_j, a
  threshold per latent. Loaded from other libraries' files (SAELens jumprelu); its thresholds
  are fixed here (no straight-through estimator), so it is not trained by sae_lit.
- ``matryoshka`` (Bussmann et al. 2025): BatchTopK whose nested prefixes of the dictionary
  (latents [0, m_1), [0, m_2), ..., [0, n)) must each reconstruct x on their own; the loss
  is the sum of the prefix NMSEs, so early latents learn general features.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_lit.model import losses

DENSE_ACTIVATIONS = ("relu", "prolu", "gated", "batchtopk", "matryoshka", "jumprelu")
# Loaded from other libraries' files, not trained here.
LOADED_ONLY = ("jumprelu",)


class Weights(NamedTuple):
    """The SAE's parameters an activation reads (live tensors: gradients flow through them)."""

    W_enc: Tensor
    """[n, d_in] encoder rows."""
    b_enc: Tensor
    """[n] encoder bias."""
    W_dec: Tensor
    """[n, d_in] decoder rows (unit norm)."""
    b_dec: Tensor
    """[d_in] the paper's b_pre."""


def pre_acts(w: Weights, x_c: Tensor) -> Tensor:
    """W_enc x_c + b_enc: dense [B, n] pre-activations of inputs centred by b_dec."""
    return torch.addmm(w.b_enc.to(x_c.dtype), x_c, w.W_enc.t().to(x_c.dtype))


class ActOutput(NamedTuple):
    z: Tensor
    """[B, n] dense latent codes."""
    penalty: Tensor
    """Unweighted sparsity penalty (0 when the variant has none)."""
    pre: Tensor | None = None
    """Detached [B, n] pre-activations the codes were selected from (BatchTopK), for AuxK."""
    gate: Tensor | None = None
    """ReLU of Gated's gate pre-activations, for its auxiliary loss."""


class DenseActivation(nn.Module):
    name = "dense"
    uses_l1 = False
    supports_auxk = False

    def forward(self, w: Weights, x_c: Tensor) -> ActOutput:  # training codes
        raise NotImplementedError

    def infer(self, w: Weights, x_c: Tensor) -> Tensor:
        """Inference codes (differs from training for the batch-level variants)."""
        return self.forward(w, x_c).z

    def extra_loss(self, w: Weights, x_norm: Tensor, x_c: Tensor, out: ActOutput, denom: Tensor) -> Tensor:
        return denom.new_zeros(())


class ReLUActivation(DenseActivation):
    name = "relu"
    uses_l1 = True

    def forward(self, w, x_c):
        z = pre_acts(w, x_c).relu()
        return ActOutput(z, losses.l1_penalty(z, w.W_dec.norm(dim=1)))


class _ProLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: Tensor, b: Tensor) -> Tensor:
        gate = (m > 0) & (m + b > 0)
        ctx.save_for_backward(gate)
        return torch.where(gate, m, torch.zeros_like(m))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (gate,) = ctx.saved_tensors
        g = torch.where(gate, grad, torch.zeros_like(grad))
        return g, g.sum(0) if ctx.needs_input_grad[1] else None


class ProLUActivation(DenseActivation):
    name = "prolu"
    uses_l1 = True

    def forward(self, w, x_c):
        m = x_c @ w.W_enc.t().to(x_c.dtype)
        z = _ProLUFn.apply(m, w.b_enc.to(x_c.dtype))
        return ActOutput(z, losses.l1_penalty(z, w.W_dec.norm(dim=1)))


class GatedActivation(DenseActivation):
    name = "gated"
    uses_l1 = True

    def __init__(self, num_latents: int):
        super().__init__()
        # r_mag = 0 and b_mag = 0 start the magnitude path equal to the gate's weights.
        self.r_mag = nn.Parameter(torch.zeros(num_latents))
        self.b_mag = nn.Parameter(torch.zeros(num_latents))

    def forward(self, w, x_c):
        W = w.W_enc.to(x_c.dtype)
        pi = pre_acts(w, x_c)
        mag = torch.addmm(self.b_mag.to(x_c.dtype), x_c, (W * self.r_mag.exp().to(x_c.dtype)[:, None]).t()).relu()
        z = (pi > 0).to(mag.dtype) * mag
        gate = pi.relu()
        return ActOutput(z, losses.l1_penalty(gate, w.W_dec.norm(dim=1)), gate=gate)

    def extra_loss(self, w, x_norm, x_c, out, denom):
        # The gate's own reconstruction through a frozen decoder: trains W_enc / b_enc to
        # open the gate where the latent helps, without moving the decoder.
        recon = out.gate @ w.W_dec.detach() + w.b_dec.detach()
        return losses.nmse(x_norm, recon, denom)


class BatchTopKActivation(DenseActivation):
    name = "batchtopk"
    supports_auxk = True

    def __init__(self, k: int, threshold_decay: float = 0.99):
        super().__init__()
        self.k = k
        self.threshold_decay = threshold_decay
        # theta < 0 means "not estimated yet": inference then falls back to per-token TopK.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, w, x_c):
        raw = pre_acts(w, x_c)
        pre = raw.relu()
        flat = pre.flatten()
        keep = min(self.k * pre.shape[0], flat.numel())
        with torch.no_grad():
            vals, idx = flat.topk(keep, sorted=False)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[idx] = True
            mask &= flat > 0
            if self.training:
                pos = vals[vals > 0]
                if pos.numel():
                    low = pos.min().float()
                    t = self.threshold
                    t.copy_(low if t < 0 else t * self.threshold_decay + low * (1 - self.threshold_decay))
        z = pre * mask.view_as(pre)
        return ActOutput(z, pre.new_zeros(()), pre=raw.detach())

    def infer(self, w, x_c):
        pre = pre_acts(w, x_c)
        if float(self.threshold) < 0:
            v, i = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(1, i, v.relu())
        return torch.where(pre > self.threshold.to(pre.dtype), pre, torch.zeros_like(pre)).relu()


class JumpReLUActivation(DenseActivation):
    name = "jumprelu"

    def __init__(self, num_latents: int):
        super().__init__()
        self.register_buffer("threshold", torch.zeros(num_latents))

    def forward(self, w, x_c):
        raise NotImplementedError(
            "activation 'jumprelu' is for loaded SAEs (fixed per-latent thresholds); sae_lit does not train it: "
            "train 'batchtopk' (exported as a JumpReLU) instead"
        )

    def infer(self, w, x_c):
        pre = pre_acts(w, x_c)
        return pre.relu() * (pre > self.threshold.to(pre.dtype))


class MatryoshkaActivation(BatchTopKActivation):
    name = "matryoshka"

    def __init__(self, k: int, num_latents: int, prefixes: list[int] | None = None, threshold_decay: float = 0.99):
        super().__init__(k, threshold_decay)
        prefixes = sorted(set(prefixes or default_prefixes(num_latents)) | {num_latents})
        if prefixes[0] < 1 or prefixes[-1] != num_latents:
            raise ValueError(f"matryoshka_prefixes must lie in [1, num_latents={num_latents}], got {prefixes}")
        self.prefixes = prefixes

    def extra_loss(self, w, x_norm, x_c, out, denom):
        # Prefix reconstructions built up block by block: one dense decode in all.
        z, total = out.z, denom.new_zeros(())
        recon, lo = w.b_dec.expand_as(x_norm), 0
        for hi in self.prefixes[:-1]:
            recon = recon + z[:, lo:hi] @ w.W_dec[lo:hi]
            total = total + losses.nmse(x_norm, recon, denom)
            lo = hi
        return total


def default_prefixes(num_latents: int) -> list[int]:
    """n/32, n/16, n/8, n/4, n/2, n: nested dictionaries doubling in size."""
    return sorted({max(1, num_latents >> s) for s in range(5, 0, -1)} | {num_latents})


def make_activation(name: str, num_latents: int, k: int, matryoshka_prefixes: list[int] | None = None) -> DenseActivation:
    if name == "relu":
        return ReLUActivation()
    if name == "prolu":
        return ProLUActivation()
    if name == "gated":
        return GatedActivation(num_latents)
    if name == "batchtopk":
        return BatchTopKActivation(k)
    if name == "matryoshka":
        return MatryoshkaActivation(k, num_latents, matryoshka_prefixes)
    if name == "jumprelu":
        return JumpReLUActivation(num_latents)
    raise ValueError(f"activation must be one of topk, {', '.join(DENSE_ACTIVATIONS)}; got {name!r}")


def compact(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense [B, n] codes -> (values, indices) [B, m] with m the largest L0 in the batch
    (zero-padded), so that sparse consumers (decode, evals) never see all n latents."""
    m = max(int((z > 0).sum(-1).max()) if z.numel() else 0, 1)
    v, i = z.topk(min(m, z.shape[-1]), dim=-1)
    return v, i

