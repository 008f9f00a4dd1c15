"""One adapter between the evals and any SAE: built once, it answers in raw activation space.

The evals need: encode (raw activations in), decode (raw activations out), the dense
pre-activations, the decoder directions and the dictionary size. Our TopKSAE works in a
normalised space (a constant scale or a per-token layer norm) and says so by having
``normalize_input`` / ``denormalize``; the adapter undoes it. Any other object with
``encode(x) -> (values, indices)`` and ``decode(values, indices)`` that decodes straight to
raw activations works too (DESIGN.md: evals take any SAE), and so does one with dense codes,
``encode(x) -> [B, n]`` and ``decode(codes)``. A SAELens ``SAE`` or a sparsify ``SparseCoder``
is converted to our TopKSAE once (sae_lit.model.formats: the same outputs, checked against those
libraries), so the evals read its exact pre-activations and decoder directions. What the SAE
offers is looked up once, here, not at every call.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from sae_lit.model.activations import compact
from sae_lit.model.formats import load_sae, object_kind
from sae_lit.model.sae import TopKSAE


class SAEAdapter:
    def __init__(self, sae):
        if isinstance(sae, SAEAdapter):
            raise TypeError("already an SAEAdapter: use as_adapter(sae)")
        self.source = sae
        if not isinstance(sae, TopKSAE) and object_kind(sae) is not None:
            sae = load_sae(sae, device=_device_dtype(sae)[0])
        self.sae = sae
        self.ours = isinstance(sae, TopKSAE)
        # encode gives dense [B, n] codes and decode takes them (SAELens-style, one argument)
        self.dense_codes_api = not self.ours and _takes_one_argument(getattr(sae, "decode", None))
        # decode() lands in a normalised space that normalize_input / denormalize define
        self.normalised = self.ours or (callable(getattr(sae, "normalize_input", None))
                                        and callable(getattr(sae, "denormalize", None)))
        W_dec = getattr(sae, "W_dec", None)
        self.W_dec: Tensor | None = W_dec if isinstance(W_dec, Tensor) else None
        self.device, self.dtype = _device_dtype(sae)
        k = getattr(sae, "k", None)
        self.k: int | None = int(k) if isinstance(k, int) else None
        """Latents per token for TopK SAEs (None when the SAE has no fixed k)."""

    @property
    def num_latents(self) -> int:
        """Dictionary size (asked of the SAE when an eval needs it: some need only encode/decode)."""
        return _num_latents(self.sae)

    def _in(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Raw activations [B, d] -> (values, indices) on the SAE's device. ``k`` only for
        SAEs whose encode accepts it (TopKSAE); others raise."""
        out = self.sae.encode(self._in(x)) if k is None else self.sae.encode(self._in(x), k=k)
        if self.dense_codes_api:
            return compact(out)
        return out[0], out[1]

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor, x: Tensor) -> Tensor:
        """(values, indices) -> raw activations. ``x`` (the raw input) is needed for per-token
        normalisations (layer_norm), whose inverse depends on the token."""
        if self.dense_codes_api:
            out = self.sae.decode(densify(values.to(self.dtype), indices, self.num_latents))
        else:
            out = self.sae.decode(values, indices)
        if self.normalised:
            out = self.sae.denormalize(out, self.sae.normalize_input(self._in(x))[1])
        return out

    @torch.no_grad()
    def reconstruct(self, x: Tensor, k: int | None = None) -> Tensor:
        """Raw in, raw out, in the input's dtype and device."""
        if self.ours:
            xs = self._in(x)
            recon = self.sae.encode_decode(xs)[0] if k is None else self.sae.encode_decode(xs, k)[0]
        else:
            values, indices = self.encode(x, k)
            recon = self.decode(values, indices, x)
        return recon.to(device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def decode_dense(self, z: Tensor, x: Tensor) -> Tensor:
        """Dense codes [B, num_latents] -> raw activations (``x``: the raw input, as in decode)."""
        if self.ours:
            sae = self.sae
            return sae.denormalize(z @ sae.W_dec + sae.b_dec, sae.normalize_input(self._in(x))[1])
        m = max(int((z != 0).sum(-1).max()) if z.numel() else 0, 1)
        values, indices = z.abs().topk(min(m, z.shape[-1]), dim=-1)
        return self.decode(z.gather(1, indices), indices, x)

    @torch.no_grad()
    def pre_acts(self, x: Tensor, latents: slice | Tensor | None = None) -> Tensor:
        """Dense [B, num_latents] pre-activations (the encoder output before the sparsifying
        activation: for TopK, before the top-k) of raw activations; only the columns of
        ``latents`` (a slice or an index tensor) when given, computed from those encoder rows
        alone for our SAEs."""
        if self.ours:
            sae = self.sae
            if latents is None:
                return sae.pre_acts(sae.normalize_input(self._in(x))[0])
            xc = sae.normalize_input(self._in(x))[0] - sae.b_dec.to(self.dtype)
            if isinstance(latents, Tensor):
                latents = latents.to(sae.W_enc.device)
            return torch.addmm(sae.b_enc[latents].to(xc.dtype), xc, sae.W_enc[latents].t().to(xc.dtype))
        for name in ("pre_acts", "encode_pre_act", "pre_activations"):
            fn = getattr(self.sae, name, None)
            if callable(fn):
                pre = fn(self._in(x))
                return pre if latents is None else pre[:, latents]
        raise NotImplementedError(f"{type(self.sae).__name__} exposes no pre-activations (pre_acts)")

    @torch.no_grad()
    def dense_codes(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Dense latent activations [B, num_latents] on the CPU, in chunks so the encoder's
        [chunk, n] pre-activations are the only large temporary."""
        out = []
        for lo in range(0, x.shape[0], chunk):
            v, i = self.encode(x[lo : lo + chunk])
            out.append(densify(v.float(), i, self.num_latents).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_latents)

    @torch.no_grad()
    def decoder_directions(self, x: Tensor, indices: Tensor) -> Tensor:
        """Raw-space decoder vectors of the given latents at the given tokens: [B, m, d], such
        that decode(values) = sum_j values_j * dirs_j + bias for the token's own normalisation.

        Read off W_dec for our SAEs (scaled by the token's normalisation), otherwise by decoding
        unit vectors: decode is affine in the values for every SAE we know of."""
        x = self._in(x)
        if self.W_dec is not None and self.normalised:
            sae = self.sae
            dirs = self.W_dec[indices]  # [B, m, d] in the normalised space
            _, stats = sae.normalize_input(x)
            if stats is None:
                return sae.denormalize(dirs, None)  # constant scale or none: linear, no offset
            return dirs * stats[1][:, None, :]  # layer norm: x = z*std + mu, the linear part is *std
        B, m = indices.shape
        base = self.decode(torch.zeros(B, m, device=x.device, dtype=x.dtype), indices, x)
        dirs = []
        for j in range(m):
            v = torch.zeros(B, m, device=x.device, dtype=x.dtype)
            v[:, j] = 1.0
            dirs.append(self.decode(v, indices, x) - base)
        return torch.stack(dirs, 1)


def as_adapter(sae) -> SAEAdapter:
    """The adapter of ``sae`` (itself if it already is one)."""
    return sae if isinstance(sae, SAEAdapter) else SAEAdapter(sae)


def densify(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """(values, indices) [B, k] -> dense [B, n]. Duplicate indices (none for TopK) add up."""
    dense = values.new_zeros(values.shape[0], n)
    return dense.scatter_add_(1, indices.long(), values)


def _takes_one_argument(fn) -> bool:
    if not callable(fn):
        return False
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


def _device_dtype(sae) -> tuple[torch.device, torch.dtype]:
    for p in getattr(sae, "parameters", lambda: iter(()))():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _num_latents(sae) -> int:
    for name in ("num_latents", "d_sae"):
        n = getattr(sae, name, None)
        if isinstance(n, int):
            return n
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and getattr(cfg, "d_sae", None):
        return int(cfg.d_sae)
    W_dec = getattr(sae, "W_dec", None)
    if isinstance(W_dec, Tensor):
        return W_dec.shape[0]
    raise AttributeError(f"{type(sae).__name__} has none of num_latents, d_sae, cfg.d_sae, W_dec: cannot size the dictionary.")
