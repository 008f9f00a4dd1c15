"""The TopK sparse autoencoder (Gao et al. 2024) as a plain nn.Module.

    z = ReLU(TopK(W_enc (x - b_dec) + b_enc))        x_hat = W_dec^T z + b_dec

``b_dec`` is the paper's b_pre (subtracted before encoding, added after decoding). Inputs
are raw activations: the module multiplies them by one dataset constant ``input_scale``
(E||s x||^2 = d_in, never per batch) or applies a per-token layer norm, and returns
reconstructions in the raw space again. Latents are kept as (values, indices) of shape
[B, k]; the training step never builds a dense [B, num_latents] tensor (see kernels.py).

The activation is replaceable: ``activation="topk"`` is the paper's (with the sparse kernels);
the dense baselines and later variants (ReLU+L1, ProLU, Gated, BatchTopK, Matryoshka) live in
activations.py and share everything else here: normalisation, b_dec, decoder invariants,
export.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from sae_lit.model import kernels, losses, native
from sae_lit.model.activations import DENSE_ACTIVATIONS, Weights, compact, make_activation

Normalize = Literal["constant", "layer_norm", "none"]
Activation = Literal["topk", "relu", "prolu", "gated", "batchtopk", "matryoshka", "jumprelu"]
BDecInit = Literal["geometric_median", "mean", "zero"]
LAYER_NORM_EPS = 1e-5


@dataclass
class SAEConfig:
    """Everything that defines an SAE's architecture and initialisation. TopKSAE is built
    from it, the exported cfg.json stores it (under its ``sae_lit`` key) and the loader reads
    it back; the training module takes it (``model.sae.*`` on the command line)."""

    d_in: int = 0
    """Activation width; filled in from the data (its cache manifest or the subject model)."""
    num_latents: int = 4096
    """Dictionary size n."""
    k: int = 32
    """Active latents per token (TopK; the per-token average for batchtopk / matryoshka)."""
    activation: Activation = "topk"
    """"topk" (the paper's); baselines "relu", "prolu", "gated" (trained with an L1 penalty,
    see the module's l1_coeff); "batchtopk" and "matryoshka" (k per token on average, a
    JumpReLU threshold at inference); "jumprelu" (per-latent thresholds; loaded SAEs only, not
    trained). See sae_lit.model.activations."""
    k_aux: int = 512
    """Dead latents per token that AuxK decodes (capped at num_latents / 2)."""
    multi_topk: bool = False
    """Also decode the top 4k latents, for the loss L(k) + L(4k)/8 (progressive codes)."""
    normalize: Normalize = "constant"
    """"constant": one dataset scale s with E||s x||^2 = d_in (folded into the export);
    "layer_norm": per token (x - mean) / (unbiased std + 1e-5), as openai/sparse_autoencoder and
    SAELens; "none"."""
    tied_init: bool = True
    """Initialise W_enc as W_dec's transpose (paper sec. 2.4)."""
    b_dec_init: BDecInit = "geometric_median"
    """b_dec (the paper's b_pre) from the init sample's "geometric_median" (the paper's),
    "mean", or "zero" (ablations)."""
    matryoshka_prefixes: list[int] | None = None
    """Nested dictionary sizes for "matryoshka" (default n/32, n/16, ..., n)."""
    auxk_bf16: bool = False
    """Run AuxK's dense dead-latent GEMMs in bf16 (fp32 accumulation): ~4x faster for that
    part on CPUs with AMX / AVX512-BF16; the main loss stays fp32."""
    seed: int | None = 0
    """Seed of the random decoder (and untied encoder) init; None uses torch's global RNG."""

    def __post_init__(self):
        if self.activation != "topk" and self.activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"activation must be one of topk, {', '.join(DENSE_ACTIVATIONS)}; got {self.activation!r}")
        if self.b_dec_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zero', got {self.b_dec_init!r}")
        if self.normalize not in ("constant", "layer_norm", "none"):
            raise ValueError(f"normalize must be 'constant', 'layer_norm' or 'none', got {self.normalize!r}")
        if not 0 < self.k <= self.num_latents:
            raise ValueError(f"k must be in [1, num_latents={self.num_latents}], got {self.k}")

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        """From a saved dict (cfg.json's ``sae_lit`` key, checkpoint hparams); keys this
        version does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class EncoderOutput(NamedTuple):
    values: Tensor
    """[B, k] latent activations, >= 0 (ReLU after the top-k selection)."""
    indices: Tensor
    """[B, k] int64 latent ids of the values."""


class ForwardOutput(NamedTuple):
    reconstruction: Tensor
    """[B, d_in] reconstruction of the input, in the input's (raw) space."""
    values: Tensor
    """[B, k] latent activations of the top-k (dense activations: all n latents)."""
    indices: Tensor
    """[B, k] latent ids."""
    nmse: Tensor
    """Batch FVU of the k-sparse reconstruction: sum ||x - x_hat||^2 / sum ||x - mean x||^2."""
    auxk_loss: Tensor
    """AuxK loss of the dead latents (not weighted by alpha)."""
    multi_topk_nmse: Tensor
    """Batch FVU when decoding the top 4k (Multi-TopK); 0 when multi_topk is off."""
    l1_loss: Tensor
    """Sparsity penalty of the L1 baselines (ReLU, ProLU, Gated), unweighted; 0 otherwise."""
    extra_loss: Tensor
    """Variant-specific loss, already weighted (Gated's gate reconstruction, Matryoshka's
    prefix NMSEs); 0 for TopK and ReLU."""
    dead_margin: Tensor | None = None
    """[B] with ``diagnose``: per token, the largest pre-activation among AuxK's dead latents
    minus the token's k-th largest pre-activation (the firing threshold). Always <= 0 (a dead
    latent above it would fire); how close to 0 it gets shows whether AuxK brings the dead
    latents toward firing. None without diagnose or without dead latents (TopK only)."""


class _Selection(NamedTuple):
    """What the no-grad part of a TopK training step selected (see TopKSAE._select)."""

    top_v: Tensor
    """[B, k or 4k] pre-activations of the selected latents, sorted descending (not ReLU'd)."""
    top_i: Tensor
    """[B, k or 4k] their latent ids."""
    dead_rows: Tensor | None
    """Ids of the dead latents AuxK draws from (None: AuxK off or nobody dead)."""
    aux_z: Tensor | None
    """Dense [B, n_dead] block of ReLU'd top-k_aux values (the fused step's dense AuxK path)."""
    aux_v: Tensor | None
    """[B, k_aux] AuxK pre-activations (gather path)."""
    aux_local: Tensor | None
    """[B, k_aux] positions of aux_v in dead_rows."""
    dead_margin: Tensor | None = None
    """See ForwardOutput.dead_margin."""


class TopKSAE(nn.Module):
    def __init__(self, *args, **fields):
        """``TopKSAE(cfg)`` with an SAEConfig, or the config's fields directly:
        ``TopKSAE(d_in, num_latents, k, activation=..., ...)``."""
        super().__init__()
        if len(args) == 1 and not fields and isinstance(args[0], SAEConfig):
            cfg = args[0]
        else:
            cfg = SAEConfig(*args, **fields)
        if cfg.d_in <= 0:
            raise ValueError(f"d_in must be positive, got {cfg.d_in}")
        self.cfg = cfg
        n, d = cfg.num_latents, cfg.d_in
        W_dec, W_enc = init_rows(cfg, 0, n)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        # Dense activations own their extra parameters/buffers (Gated's r_mag, BatchTopK's theta).
        self.act = None if cfg.activation == "topk" else make_activation(cfg.activation, n, cfg.k, cfg.matryoshka_prefixes)
        self.step_buffer = kernels.StepBuffer()

    # Read-only views of the config, for callers that treat the SAE as the source of truth.
    d_in = property(lambda self: self.cfg.d_in)
    num_latents = property(lambda self: self.cfg.num_latents)
    k = property(lambda self: self.cfg.k)
    activation = property(lambda self: self.cfg.activation)
    normalize = property(lambda self: self.cfg.normalize)
    multi_topk = property(lambda self: self.cfg.multi_topk)
    auxk_bf16 = property(lambda self: self.cfg.auxk_bf16)

    @property
    def k_aux(self) -> int:
        return min(self.cfg.k_aux, self.cfg.num_latents // 2)

    def weights(self) -> Weights:
        return Weights(self.W_enc, self.b_enc, self.W_dec, self.b_dec)

    # ---------------------------------------------------------------- normalisation
    def normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Input in the space the SAE works in, plus what is needed to undo it."""
        if self.normalize == "layer_norm":
            # openai/sparse_autoencoder's LN (SAELens copies it): the *unbiased* std, with eps
            # added to the std rather than the variance. Ours matches it exactly so that our
            # layer_norm exports and their files compute the same thing. The inverse multiplies
            # by the std alone (without eps), as theirs does.
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
            return xc / (std + LAYER_NORM_EPS), (mu, std)
        if self.normalize == "constant":
            return x * self.input_scale.to(x.dtype), None
        return x, None

    def denormalize(self, x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.normalize == "layer_norm":
            assert stats is not None
            return x * stats[1] + stats[0]
        if self.normalize == "constant":
            return x / self.input_scale.to(x.dtype)
        return x

    # ---------------------------------------------------------------- inference API
    def pre_acts(self, x_norm: Tensor) -> Tensor:
        """Dense [B, num_latents] pre-activations of already-normalised inputs."""
        return self.centred_pre_acts(x_norm - self.b_dec.to(x_norm.dtype))

    def centred_pre_acts(self, x_c: Tensor) -> Tensor:
        """W_enc x_c + b_enc for inputs already centred by b_dec (differentiable)."""
        return torch.addmm(self.b_enc.to(x_c.dtype), x_c, self.W_enc.t().to(x_c.dtype))

    def select(self, pre: Tensor, k: int | None = None) -> EncoderOutput:
        """TopK of dense pre-activations (TopK SAEs only; see ``encode`` for the others)."""
        v, i = native.topk(pre, k or self.k)
        return EncoderOutput(v.relu(), i)

    def _encode_norm(self, x_norm: Tensor, k: int | None) -> EncoderOutput:
        if self.act is not None:
            # Dense codes compacted to the batch's largest L0 (zero-padded): k is ignored.
            z = self.act.infer(self.weights(), x_norm - self.b_dec.to(x_norm.dtype))
            return EncoderOutput(*compact(z))
        return self.select(self.pre_acts(x_norm), k)

    @torch.no_grad()
    def encode(self, x: Tensor, k: int | None = None) -> EncoderOutput:
        """Raw activations [B, d_in] -> (values, indices), each [B, k] (dense activations:
        [B, m] with m the batch's largest L0, zero-padded)."""
        x_norm, _ = self.normalize_input(x)
        return self._encode_norm(x_norm, k)

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """(values, indices) -> reconstruction in the SAE's normalised space (constant or
        none: divide by ``input_scale`` for raw space; use ``reconstruct`` for raw in, raw out)."""
        return kernels.gather_sum(indices, values, self.W_dec) + self.b_dec

    @torch.no_grad()
    def encode_decode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, EncoderOutput]:
        """Raw activations in; (raw reconstruction, latents) out."""
        x_norm, stats = self.normalize_input(x)
        latents = self._encode_norm(x_norm, k)
        return self.denormalize(self.decode(*latents), stats), latents

    def reconstruct(self, x: Tensor, k: int | None = None) -> Tensor:
        """Raw activations in, raw reconstruction out."""
        return self.encode_decode(x, k)[0]

    # ---------------------------------------------------------------- training forward
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, diagnose: bool = False) -> ForwardOutput:
        """Training forward on raw activations [B, d_in]; losses in the normalised space.

        ``dead_mask`` [num_latents] bool marks the latents that count as dead once this batch
        is counted (tokens since they last fired, this batch included, reach the window);
        those that fire in this batch are taken out of it before AuxK selects, as in the
        reference code ("has to go after stats update"). TopK runs
        one no-grad GEMM + selection, then either the fused step (one hand-written backward,
        kernels.TopKTrainStep) or, when the input itself requires grad (e.g. attribution),
        the composable autograd path with the same values.
        """
        x_norm, stats = self.normalize_input(x)
        if self.act is not None:
            return self._forward_dense(x_norm, stats, dead_mask)
        x_c = x_norm - self.b_dec
        fused = not x.requires_grad
        sel = self._select(x_c, dead_mask, fused, diagnose)
        step = self._fused_step if fused else self._autograd_step
        recon_k, values, nmse, multi, auxk = step(x_norm, x_c, sel)
        zero = nmse.new_zeros(())
        recon = self.denormalize(recon_k, stats)
        return ForwardOutput(recon, values[:, : self.k], sel.top_i[:, : self.k], nmse, auxk, multi, zero, zero,
                             sel.dead_margin)

    @torch.no_grad()
    def _select(self, x_c: Tensor, dead_mask: Tensor | None, fused: bool, diagnose: bool = False) -> _Selection:
        """The one dense GEMM, the top-k (4k with Multi-TopK) and AuxK's top-k_aux of the dead."""
        k_sel = min(4 * self.k if self.multi_topk else self.k, self.num_latents)
        pre, bias = kernels.encoder_gemm(x_c, self.W_enc, self.b_enc, self.step_buffer)  # bias None if added
        # Sorted (descending) so that the first k of the 4k Multi-TopK latents are the top k.
        top_v, top_i = native.topk(pre, k_sel, bias=bias)
        dead_rows = aux_z = aux_v = aux_local = margin = None
        if dead_mask is not None and self.k_aux > 0:
            dead_rows = (dead_mask & ~_fired(top_i[:, : self.k], top_v[:, : self.k], self.num_latents)).nonzero().squeeze(1)
            n_dead = dead_rows.numel()
            if n_dead == 0:
                dead_rows = None
            else:
                if diagnose:
                    cols = pre.index_select(1, dead_rows).float()
                    if bias is not None:
                        cols += bias[dead_rows].float()
                    margin = cols.max(1).values - top_v[:, self.k - 1].float()
                    del cols
                k_aux = min(self.k_aux, n_dead)
                if self.auxk_bf16:
                    # A bf16 GEMM over the dead rows (AMX on recent CPUs) costs less than
                    # gathering their columns from the fp32 result; AuxK is bf16 throughout.
                    src = torch.addmm(
                        self.b_enc[dead_rows].bfloat16(), x_c.bfloat16(), self.W_enc[dead_rows].bfloat16().t()
                    )
                    cols, src_bias = None, None
                else:
                    src, cols, src_bias = pre, dead_rows, bias  # the dead latents' columns of the GEMM
                if fused and _aux_is_dense(k_aux, n_dead):
                    # Dense [B, n_dead] block of ReLU'd top-k_aux values, built in one pass.
                    aux_z = native.aux_select(src, cols, k_aux, dense=True, bias=src_bias)[0]
                else:
                    _, aux_v, aux_local = native.aux_select(src, cols, k_aux, dense=False, bias=src_bias)
                    aux_v = aux_v.to(self.W_enc.dtype)
                del src
        del pre
        # Under autocast the GEMM ran in bf16; the sparse part works in the weights' dtype.
        return _Selection(top_v.to(self.W_enc.dtype), top_i, dead_rows, aux_z, aux_v, aux_local, margin)

    def _fused_step(self, x_norm: Tensor, x_c: Tensor, sel: _Selection):
        """Reconstructions and losses through kernels.TopKTrainStep / ReconLosses (hand-written
        backward; the input is data)."""
        recon_k, recon_all, aux_hat = kernels.TopKTrainStep.apply(
            self.W_enc, self.b_enc, self.W_dec, self.b_dec, x_c.detach(), sel.top_i, sel.top_v, self.k,
            self.multi_topk, sel.dead_rows, sel.aux_local, sel.aux_v, sel.aux_z,
            torch.bfloat16 if self.auxk_bf16 else None,
        )
        denom = losses.total_variance(x_norm)
        nmse, multi, auxk = kernels.ReconLosses.apply(x_norm, denom, recon_k, recon_all, aux_hat)
        return recon_k, sel.top_v.relu(), nmse, multi, auxk

    def _autograd_step(self, x_norm: Tensor, x_c: Tensor, sel: _Selection):
        """The same step from composable autograd functions (gradients w.r.t. the input too)."""
        values = kernels.sparse_encode(x_c, self.W_enc, self.b_enc, sel.top_i, sel.top_v).relu()
        recon_k = kernels.sparse_decode(values[:, : self.k], sel.top_i[:, : self.k], self.W_dec) + self.b_dec
        denom = losses.total_variance(x_norm)
        nmse = losses.nmse(x_norm, recon_k, denom)
        multi = auxk = nmse.new_zeros(())
        if self.multi_topk:
            multi = losses.nmse(x_norm, kernels.sparse_decode(values, sel.top_i, self.W_dec) + self.b_dec, denom)
        if sel.dead_rows is not None:
            aux_hat = self._aux_reconstruction(x_norm.detach() - self.b_dec, sel.dead_rows, sel.aux_v, sel.aux_local)
            auxk = losses.auxk_loss((x_norm - recon_k).detach(), aux_hat)
        return recon_k, values, nmse, multi, auxk

    def _aux_reconstruction(self, x_c: Tensor, dead_rows: Tensor, aux_v: Tensor, aux_local: Tensor) -> Tensor:
        """AuxK's reconstruction of the residual x - x_hat from the top-k_aux dead latents.

        As in the reference code, it trains the dead latents' rows and b_dec (the paper's
        b_pre): ``x_c`` = x - b_dec carries b_dec's gradient through the encoder, and the
        decode adds b_dec - b_dec.detach() (value 0): the reference decodes with b_pre against
        a target holding a detached b_pre. Live latents get nothing."""
        if _aux_is_dense(aux_v.shape[1], dead_rows.numel()):
            z = kernels.subset_encode(x_c, self.W_enc, self.b_enc, dead_rows, aux_local, aux_v)
            decoded = z @ self.W_dec[dead_rows]
        else:
            idx = dead_rows[aux_local]
            z = kernels.sparse_encode(x_c, self.W_enc, self.b_enc, idx, aux_v).relu()
            decoded = kernels.sparse_decode(z, idx, self.W_dec)
        return decoded + (self.b_dec - self.b_dec.detach())

    def _forward_dense(self, x_norm: Tensor, stats, dead_mask: Tensor | None) -> ForwardOutput:
        # The baselines are dense by nature (every latent can fire): plain autograd.
        x_c = x_norm - self.b_dec
        w = self.weights()
        out = self.act(w, x_c)
        recon_n = out.z @ self.W_dec + self.b_dec
        denom = losses.total_variance(x_norm)
        nmse = losses.nmse(x_norm, recon_n, denom)
        extra = self.act.extra_loss(w, x_norm, x_c, out, denom)
        zero = nmse.new_zeros(())
        auxk = zero
        if dead_mask is not None and self.act.supports_auxk and self.k_aux > 0:
            fired = (out.z.detach() > 0).any(0)  # this batch's firings count first (see forward)
            dead_rows = (dead_mask & ~fired).nonzero().squeeze(1)
            if dead_rows.numel() > 0:
                with torch.no_grad():  # the dead columns of the activation's own GEMM
                    _, aux_v, aux_local = native.aux_select(out.pre, dead_rows, self.k_aux, dense=False)
                aux_hat = self._aux_reconstruction(x_norm.detach() - self.b_dec, dead_rows, aux_v, aux_local)
                auxk = losses.auxk_loss((x_norm - recon_n).detach(), aux_hat)
        idx = torch.arange(self.num_latents, device=out.z.device).expand_as(out.z)
        return ForwardOutput(self.denormalize(recon_n, stats), out.z, idx, nmse, auxk, zero, out.penalty, extra)

    def release_buffers(self) -> None:
        """Free the CPU training step's reused [B, n] buffer (it comes back on the next step)."""
        self.step_buffer.release()

    # ---------------------------------------------------------------- invariants
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise every decoder row (latent direction) to unit norm."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of each decoder row's gradient its component along the row.

        With unit-norm rows renormalised after each step, that component is undone anyway;
        left in, it corrupts Adam's second-moment estimates (paper sec. A.2).
        """
        if self.W_dec.grad is None:
            return
        native.project_rows_(self.W_dec.grad, self.W_dec.detach())

    @torch.no_grad()
    def init_from_data(self, sample: Tensor, scale: float | None = None, max_iter: int = 100) -> None:
        """Data-dependent init from raw activations [N, d_in]: the normalisation constant
        (unless given, s = sqrt(d / E||x||^2)) and b_dec = geometric median of the sample."""
        sample = sample.to(self.W_dec.device, torch.float32)
        if self.normalize == "constant":
            if scale is None:
                scale = math.sqrt(self.d_in / sample.pow(2).sum(1).mean().item())
            self.input_scale.fill_(scale)
        x_norm, _ = self.normalize_input(sample)
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x_norm, max_iter=max_iter))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(x_norm.mean(0))
        else:
            self.b_dec.zero_()
        self.initialized.fill_(True)


# Rows per chunk of the initial draw: a multiple of 16, as torch's CPU normal sampler fills
# 16 values at a time (see init_rows).
_INIT_CHUNK_ROWS = 4096


def init_rows(cfg: SAEConfig, lo: int, hi: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Rows [lo, hi) of the initial (W_dec, W_enc), float32, on ``device`` (default CPU).

    The values are those of one ``torch.randn(n, d)`` per matrix (W_dec first, then W_enc when
    untied) from the config's seed, but drawn in row chunks and kept only where they fall in
    [lo, hi): a latent shard gets exactly its slice of the unsharded init without ever holding
    the whole dictionary. Chunked and one-shot draws agree because the CPU sampler turns
    uniforms into normals 16 at a time, in order, redrawing only a tail that is not a multiple
    of 16: every chunk but the last is a multiple of 16 values, and the last holds >= 16
    (tests/test_latent_parallel.py checks the equality)."""
    n, d = cfg.num_latents, cfg.d_in
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    bounds = list(range(0, n, _INIT_CHUNK_ROWS)) + [n]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * d < 16:
        del bounds[-2]  # a tail under 16 values would be drawn differently: merge it

    def draw(last: bool) -> Tensor:
        keep = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a >= hi and last and gen is not None:
                break  # nothing after this draws from a private generator
            chunk = torch.randn(b - a, d, generator=gen, dtype=torch.float32)
            if b > lo and a < hi:
                keep.append(chunk[max(lo, a) - a : min(hi, b) - a].to(device))
        return torch.cat(keep) if keep else torch.empty(0, d, device=device)

    W_dec = draw(last=cfg.tied_init)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    # Tied init (paper sec. 2.4): encoder starts as the decoder's transpose. Both are
    # stored [num_latents, d_in], so "transpose" is equality of the stored tensors.
    W_enc = W_dec.clone() if cfg.tied_init else draw(last=True) / math.sqrt(d)
    return W_dec.contiguous(), W_enc.contiguous()


def _fired(indices: Tensor, values: Tensor, n: int) -> Tensor:
    """[n] bool: the latents with a positive value somewhere in this batch."""
    fired = torch.zeros(n, dtype=torch.bool, device=indices.device)
    fired[indices[values > 0]] = True
    return fired


def _aux_is_dense(k_aux: int, n_dead: int) -> bool:
    # At >= 1/8 density a dense [B, n_dead] block (GEMMs) beats gathers and scatters.
    return k_aux * 8 >= n_dead


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    pts = points.double()
    guess = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - guess).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        if (new - guess).norm() <= tol * max(1.0, guess.norm().item()):
            guess = new
            break
        guess = new
    return guess.to(points.dtype)
