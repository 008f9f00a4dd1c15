"""What the evals need from an SAE, for any object with ``encode``/``decode``.

The evals take ``encode(x_raw) -> (values [B, k], indices [B, k])`` and ``decode(values,
indices)`` as the contract (DESIGN.md: a loaded SAELens or sparsify SAE works too). Our
TopKSAE decodes into its *normalised* space, so where it is present we use its own
``encode_decode`` / ``normalize_input`` / ``denormalize`` to stay in raw space; other objects
are assumed to decode straight to raw activations.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sae_device_dtype(sae) -> tuple[torch.device, torch.dtype]:
    for p in getattr(sae, "parameters", lambda: iter(()))():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def num_latents(sae) -> int:
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


def sae_k(sae) -> int | None:
    k = getattr(sae, "k", None)
    return int(k) if isinstance(k, int) else None


def _to_sae(sae, x: Tensor) -> Tensor:
    device, dtype = sae_device_dtype(sae)
    return x.to(device=device, dtype=dtype)


@torch.no_grad()
def encode(sae, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Raw activations [B, d] -> (values, indices) on the SAE's device. ``k`` only for SAEs
    whose encode accepts it (TopKSAE); others raise."""
    x = _to_sae(sae, x)
    out = sae.encode(x) if k is None else sae.encode(x, k=k)
    values, indices = out[0], out[1]
    return values, indices


@torch.no_grad()
def decode_raw(sae, values: Tensor, indices: Tensor, x: Tensor) -> Tensor:
    """Decode into raw activation space. ``x`` (the raw input) is needed for per-token
    normalisations (layer_norm), whose inverse depends on the token."""
    out = sae.decode(values, indices)
    if hasattr(sae, "normalize_input") and hasattr(sae, "denormalize"):
        _, stats = sae.normalize_input(_to_sae(sae, x))
        out = sae.denormalize(out, stats)
    return out


@torch.no_grad()
def reconstruct(sae, x: Tensor, k: int | None = None) -> Tensor:
    """Raw in, raw out, in the input's dtype and device."""
    if hasattr(sae, "encode_decode"):
        xs = _to_sae(sae, x)
        recon = sae.encode_decode(xs)[0] if k is None else sae.encode_decode(xs, k)[0]
    else:
        values, indices = encode(sae, x, k)
        recon = decode_raw(sae, values, indices, x)
    return recon.to(device=x.device, dtype=x.dtype)


def densify(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """(values, indices) [B, k] -> dense [B, n]. Duplicate indices (none for TopK) add up."""
    dense = values.new_zeros(values.shape[0], n)
    return dense.scatter_add_(1, indices.long(), values)


@torch.no_grad()
def dense_codes(sae, x: Tensor, chunk: int = 4096) -> Tensor:
    """Dense latent activations [B, num_latents] on the CPU, in chunks so the encoder's
    [chunk, n] pre-activations are the only large temporary."""
    n = num_latents(sae)
    out = []
    for lo in range(0, x.shape[0], chunk):
        v, i = encode(sae, x[lo : lo + chunk])
        out.append(densify(v.float(), i, n).cpu())
    return torch.cat(out) if out else torch.zeros(0, n)


@torch.no_grad()
def decoder_directions(sae, x: Tensor, indices: Tensor) -> Tensor:
    """Raw-space decoder vectors of the given latents at the given tokens: [B, m, d], such that
    decode_raw(values) = sum_j values_j * dirs_j + bias for the token's own normalisation.

    Read off W_dec when the SAE has one (scaled by the token's normalisation), otherwise by
    decoding unit vectors: decode is affine in the values for every SAE we know of."""
    x = _to_sae(sae, x)
    W_dec = getattr(sae, "W_dec", None)
    if isinstance(W_dec, Tensor) and hasattr(sae, "normalize_input") and hasattr(sae, "denormalize"):
        dirs = W_dec[indices]  # [B, m, d] in the normalised space
        _, stats = sae.normalize_input(x)
        if stats is None:
            return sae.denormalize(dirs, None)  # constant scale or none: linear, no offset
        return dirs * stats[1][:, None, :]  # layer norm: x = z*std + mu, the linear part is *std
    B, m = indices.shape
    base = decode_raw(sae, torch.zeros(B, m, device=x.device, dtype=x.dtype), indices, x)
    dirs = []
    for j in range(m):
        v = torch.zeros(B, m, device=x.device, dtype=x.dtype)
        v[:, j] = 1.0
        dirs.append(decode_raw(sae, v, indices, x) - base)
    return torch.stack(dirs, 1)
