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

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from sae_lit.model import kernels, losses, native
from sae_lit.model.activations import DENSE_ACTIVATIONS, compact, make_activation

Normalize = Literal["constant", "layer_norm", "none"]
Activation = Literal["topk", "relu", "prolu", "gated", "batchtopk", "matryoshka"]
BDecInit = Literal["geometric_median", "mean", "zero"]


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
    """AuxK loss of the dead latents (already scaled by min(n_dead/k_aux, 1); not by alpha)."""
    multi_topk_nmse: Tensor
    """Batch FVU when decoding the top 4k (Multi-TopK); 0 when multi_topk is off."""
    l1_loss: Tensor
    """Sparsity penalty of the L1 baselines (ReLU, ProLU, Gated), unweighted; 0 otherwise."""
    extra_loss: Tensor
    """Variant-specific loss, already weighted (Gated's gate reconstruction, Matryoshka's
    prefix NMSEs); 0 for TopK and ReLU."""


class TopKSAE(nn.Module):
    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int = 32,
        *,
        activation: Activation = "topk",
        k_aux: int = 512,
        multi_topk: bool = False,
        normalize: Normalize = "constant",
        tied_init: bool = True,
        auxk_bf16: bool = False,
        b_dec_init: BDecInit = "geometric_median",
        matryoshka_prefixes: list[int] | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if activation != "topk" and activation not in DENSE_ACTIVATIONS:
            raise ValueError(f"activation must be one of topk, {', '.join(DENSE_ACTIVATIONS)}; got {activation!r}")
        if b_dec_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zero', got {b_dec_init!r}")
        if normalize not in ("constant", "layer_norm", "none"):
            raise ValueError(f"normalize must be 'constant', 'layer_norm' or 'none', got {normalize!r}")
        if not 0 < k <= num_latents:
            raise ValueError(f"k must be in [1, num_latents={num_latents}], got {k}")
        self.d_in, self.num_latents, self.k = d_in, num_latents, k
        self.activation = activation
        self.b_dec_init = b_dec_init
        self.k_aux = min(k_aux, num_latents // 2)
        self.multi_topk = multi_topk
        self.normalize = normalize
        # AuxK in bf16: the dead latents' pre-activations and the dense [B, n_dead] GEMMs of
        # its forward and backward (fp32 accumulation), ~4x faster on CPUs with AMX /
        # AVX512-BF16. Only the auxiliary loss of dead latents is affected.
        self.auxk_bf16 = auxk_bf16

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(num_latents, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Tied init (paper sec. 2.4): encoder starts as the decoder's transpose. Both are
        # stored [num_latents, d_in], so "transpose" is equality of the stored tensors.
        W_enc = W_dec.clone() if tied_init else torch.randn(num_latents, d_in, generator=gen) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(num_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        # Dense activations own their extra parameters/buffers (Gated's r_mag, BatchTopK's theta).
        self.act = None if activation == "topk" else make_activation(activation, num_latents, k, matryoshka_prefixes)

    # ---------------------------------------------------------------- normalisation
    def normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Input in the space the SAE works in, plus what is needed to undo it."""
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
            return xc / std, (mu, std)
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
            z = self.act.infer(self, x_norm - self.b_dec.to(x_norm.dtype))
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
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Training forward on raw activations [B, d_in]; losses in the normalised space.

        ``dead_mask`` [num_latents] bool marks the latents that get the AuxK loss.
        """
        x_norm, stats = self.normalize_input(x)
        if self.act is not None:
            return self._forward_dense(x_norm, stats, dead_mask)
        x_c = x_norm - self.b_dec
        k_sel = 4 * self.k if self.multi_topk else self.k
        k_sel = min(k_sel, self.num_latents)
        fused = not x.requires_grad  # one hand-written backward (kernels.TopKTrainStep)
        dead_rows = aux_z = aux_v = aux_local = None
        with torch.no_grad():
            pre, bias = self._encoder_gemm(x_c)  # the one dense GEMM; bias None if already added
            # Sorted (descending) so that the first k of the 4k Multi-TopK latents are the top k.
            top_v, top_i = native.topk(pre, k_sel, bias=bias)
            if dead_mask is not None and self.k_aux > 0:
                dead_rows = dead_mask.nonzero().squeeze(1)
                n_dead = dead_rows.numel()
                if n_dead > 0:
                    k_aux = min(self.k_aux, n_dead)
                    if self.auxk_bf16:
                        # A bf16 GEMM over the dead rows (AMX on recent CPUs) costs less than
                        # gathering their columns from the fp32 result; AuxK is bf16 throughout.
                        src = torch.addmm(
                            self.b_enc[dead_rows].bfloat16(), x_c.bfloat16(), self.W_enc[dead_rows].bfloat16().t()
                        )
                        cols = None
                    else:
                        src, cols = pre, dead_rows  # the dead latents' columns of the GEMM
                    src_bias = bias if cols is not None else None
                    if fused and self._aux_is_dense(k_aux, n_dead):
                        # Dense [B, n_dead] block of ReLU'd top-k_aux values, built in one pass.
                        aux_z = native.aux_select(src, cols, k_aux, dense=True, bias=src_bias)[0]
                    else:
                        _, aux_v, aux_local = native.aux_select(src, cols, k_aux, dense=False, bias=src_bias)
                        aux_v = aux_v.to(self.W_enc.dtype)
                    del src
            del pre
            # Under autocast the GEMM ran in bf16; the sparse part works in the weights' dtype.
            top_v = top_v.to(self.W_enc.dtype)

        has_dead = dead_rows is not None and dead_rows.numel() > 0
        denom = losses.total_variance(x_norm)
        zero = denom.new_zeros(())
        if fused:
            recon_k, recon_all, aux_hat = kernels.TopKTrainStep.apply(
                self.W_enc, self.b_enc, self.W_dec, self.b_dec, x_c.detach(), top_i, top_v, self.k,
                self.multi_topk, dead_rows if has_dead else None, aux_local, aux_v, aux_z,
                torch.bfloat16 if self.auxk_bf16 else None,
            )
            values = top_v.relu()
            aux_scale = losses.auxk_scale(dead_rows.numel(), self.k_aux) if has_dead else 0.0
            nmse, multi, auxk = kernels.ReconLosses.apply(x_norm, denom, recon_k, recon_all, aux_hat, aux_scale)
        else:
            # Composable path (gradients w.r.t. the input too), e.g. for attribution.
            values = kernels.sparse_encode(x_c, self.W_enc, self.b_enc, top_i, top_v).relu()
            recon_k = kernels.sparse_decode(values[:, : self.k], top_i[:, : self.k], self.W_dec) + self.b_dec
            recon_all = kernels.sparse_decode(values, top_i, self.W_dec) + self.b_dec if self.multi_topk else None
            aux_hat = self._aux_reconstruction(x_c.detach(), dead_rows, aux_v, aux_local) if has_dead else None
            nmse = losses.nmse(x_norm, recon_k, denom)
            multi = losses.nmse(x_norm, recon_all, denom) if self.multi_topk else zero
            auxk = zero
            if has_dead:
                auxk = losses.auxk_loss(x_norm - recon_k.detach(), aux_hat, dead_rows.numel(), self.k_aux)
        recon = self.denormalize(recon_k, stats)
        return ForwardOutput(recon, values[:, : self.k], top_i[:, : self.k], nmse, auxk, multi, zero, zero)

    @staticmethod
    def _aux_is_dense(k_aux: int, n_dead: int) -> bool:
        # At >= 1/8 density a dense [B, n_dead] block (GEMMs) beats gathers and scatters.
        return k_aux * 8 >= n_dead

    def _dense_pre_acts(self, x_c: Tensor) -> Tensor:
        """W_enc x_c + b_enc for all latents, into a reused buffer on CPU.

        A fresh [B, n] result costs ~20% of the GEMM in page faults on CPU; CUDA's caching
        allocator has no such cost, and autocast does not allow out=.
        """
        if x_c.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return torch.addmm(self.b_enc, x_c, self.W_enc.t())
        return torch.addmm(self.b_enc, x_c, self.W_enc.t(), out=self._step_buffer(x_c.shape[0], x_c.dtype))

    def _step_buffer(self, batch: int, dtype: torch.dtype) -> Tensor:
        """The reused [batch, n] CPU buffer for the encoder GEMM's output."""
        buf = getattr(self, "_pre_buffer", None)
        if buf is None or buf.shape != (batch, self.num_latents) or buf.dtype != dtype:
            buf = self._pre_buffer = torch.empty(batch, self.num_latents, dtype=dtype)
        return buf

    def release_buffers(self) -> None:
        """Free the reused [B, n] encoder-output buffer of the CPU training step (it comes
        back on the next training forward); SAEModule calls this around validation and at
        the end of training so that evaluation does not hold it next to its own."""
        self.__dict__.pop("_pre_buffer", None)

    def _encoder_gemm(self, x_c: Tensor) -> tuple[Tensor, Tensor | None]:
        """(pre, bias): the encoder GEMM for the training step's selections.

        With the native CPU kernels the bias is left out of the [B, n] result (``bias`` =
        b_enc, added by the selection kernels on the fly), which saves a broadcast pass over
        the whole output; otherwise pre = W_enc x_c + b_enc and ``bias`` is None.
        """
        if x_c.device.type != "cpu" or self.W_enc.dtype != torch.float32 or not native.available():
            return self._dense_pre_acts(x_c), None
        if torch.is_autocast_enabled("cpu"):
            if torch.get_autocast_dtype("cpu") != torch.bfloat16:
                return self._dense_pre_acts(x_c), None
            dt = torch.bfloat16  # what autocast would run the GEMM in (AMX on recent Xeons)
        elif x_c.dtype == torch.float32:
            dt = torch.float32
        else:
            return self._dense_pre_acts(x_c), None
        buf = self._step_buffer(x_c.shape[0], dt)
        with torch.autocast("cpu", enabled=False):  # autocast refuses out=; cast by hand instead
            torch.mm(x_c.detach().to(dt), self.W_enc.detach().to(dt).t(), out=buf)
        return buf, self.b_enc.detach()

    def _aux_reconstruction(self, x_c: Tensor, dead_rows: Tensor, aux_v: Tensor, aux_local: Tensor) -> Tensor:
        """AuxK's reconstruction of the residual from the top-k_aux dead latents (no b_dec).
        The input is detached, so AuxK trains only the dead latents' encoder and decoder
        rows; it never moves b_dec or live latents."""
        if self._aux_is_dense(aux_v.shape[1], dead_rows.numel()):
            z = kernels.subset_encode(x_c, self.W_enc, self.b_enc, dead_rows, aux_local, aux_v)
            return z @ self.W_dec[dead_rows]
        idx = dead_rows[aux_local]
        z = kernels.sparse_encode(x_c, self.W_enc, self.b_enc, idx, aux_v).relu()
        return kernels.sparse_decode(z, idx, self.W_dec)

    def _forward_dense(self, x_norm: Tensor, stats, dead_mask: Tensor | None) -> ForwardOutput:
        # The baselines are dense by nature (every latent can fire): plain autograd.
        x_c = x_norm - self.b_dec
        out = self.act(self, x_c)
        recon_n = out.z @ self.W_dec + self.b_dec
        denom = losses.total_variance(x_norm)
        nmse = losses.nmse(x_norm, recon_n, denom)
        extra = self.act.extra_loss(self, x_norm, x_c, out, denom)
        zero = nmse.new_zeros(())
        auxk = zero
        if dead_mask is not None and self.act.supports_auxk and self.k_aux > 0:
            dead_rows = dead_mask.nonzero().squeeze(1)
            if dead_rows.numel() > 0:
                with torch.no_grad():  # the dead columns of the activation's own GEMM
                    _, aux_v, aux_local = native.aux_select(out.pre, dead_rows, self.k_aux, dense=False)
                aux_hat = self._aux_reconstruction(x_c.detach(), dead_rows, aux_v, aux_local)
                auxk = losses.auxk_loss(x_norm - recon_n.detach(), aux_hat, dead_rows.numel(), self.k_aux)
        idx = torch.arange(self.num_latents, device=out.z.device).expand_as(out.z)
        return ForwardOutput(self.denormalize(recon_n, stats), out.z, idx, nmse, auxk, zero, out.penalty, extra)

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
        if self.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x_norm, max_iter=max_iter))
        elif self.b_dec_init == "mean":
            self.b_dec.copy_(x_norm.mean(0))
        else:
            self.b_dec.zero_()
        self.initialized.fill_(True)

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict:
        return dict(
            d_in=self.d_in, num_latents=self.num_latents, k=self.k, activation=self.activation,
            k_aux=self.k_aux, multi_topk=self.multi_topk, normalize=self.normalize, auxk_bf16=self.auxk_bf16,
            b_dec_init=self.b_dec_init,
            **({"matryoshka_prefixes": self.act.prefixes} if self.activation == "matryoshka" else {}),
        )


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
